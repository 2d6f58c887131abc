"""Benchmark of the LAReQA evaluation: where the time goes, and what scoring costs in memory.

Measured side by side in one run, on the same model, texts and batch size:
  (a) texts and distinct texts of the evaluation;
  (b) one plain `SentenceTransformer.encode` call over the distinct prefixed texts;
  (c) the project's `evaluate_task` on the task `prepare_task` built (total wall time, its own
      encode and score times), with ratios total/own-encode and total/plain-encode;
  (d) peak memory (tracemalloc; numpy reports its buffers to it), time and query block of
      `score_task` on the real pool, on a pool N x larger (each language's candidate embeddings
      repeated, answers in the first copy) and on N x more queries (repeated), all from the
      embeddings of (b), so nothing is encoded again. With the default block (--block unset:
      lareqa.SCORE_BUDGET // pool size queries a block) the peak should stay about flat in
      all three cases; a fixed --block makes it grow with the pool.

Run from the repository root, after `dvc repro fetch` (data/raw/<dataset>/):
    .venv/bin/python benchmarks/eval_speed.py --model models/base              # full XQuAD-R: ~20 min on 2 CPU cores
    .venv/bin/python benchmarks/eval_speed.py --model models/base --limit 6 --repeat 2   # quick check, ~1 min

--limit N keeps the first N candidates of each language and the questions answered by them
(a question's translation answered further on simply has no answer in that language).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from dataclasses import replace

import numpy as np
import pandas as pd

from pipeline import evaluate, lareqa
from pipeline.common import load_params, param
from pipeline.encoding import load_model
from pipeline.lareqa import RetrievalTask, headline_figures, score_task


def limited(questions: pd.DataFrame, candidates: pd.DataFrame, limit: int | None):
    if limit is None:
        return questions, candidates
    return questions[questions["answer_candidate"] < limit], candidates[candidates["candidate"] < limit]


def bigger_pool(task: RetrievalTask, pool: np.ndarray, factor: int) -> tuple[RetrievalTask, np.ndarray]:
    """Each language's candidates repeated `factor` times; answers point into the first copy."""
    sizes = np.diff(task.pool_offsets)
    parts = [np.tile(pool[lo:hi], (factor, 1)) for lo, hi in zip(task.pool_offsets[:-1], task.pool_offsets[1:])]
    offsets = np.concatenate([[0], np.cumsum(sizes * factor)])
    shift = offsets[:-1] - task.pool_offsets[:-1]  # per language
    answers = np.where(task.answers >= 0, task.answers + shift[None, :], -1)
    texts = [t for y in range(len(sizes)) for t in task.candidate_text[task.pool_offsets[y] : task.pool_offsets[y + 1]] * factor]
    return replace(task, candidate_text=texts, pool_offsets=offsets, answers=answers), np.concatenate(parts)


def more_queries(task: RetrievalTask, queries: np.ndarray, factor: int) -> tuple[RetrievalTask, np.ndarray]:
    return (
        replace(
            task,
            query_lang=np.tile(task.query_lang, factor),
            query_text=task.query_text * factor,
            answers=np.tile(task.answers, (factor, 1)),
        ),
        np.tile(queries, (factor, 1)),
    )


def block_used(pool: np.ndarray, block: int | None) -> int:
    """The query block score_task uses: `block`, else the budget rule."""
    return block or max(1, lareqa.SCORE_BUDGET // max(1, len(pool)))


def measure_scoring(task: RetrievalTask, queries: np.ndarray, pool: np.ndarray, block: int | None) -> tuple[float, float]:
    """(peak MiB allocated during score_task beyond what was live before, seconds)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    started = time.perf_counter()
    score_task(task, queries, pool, block=block)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return peak / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--dataset", default="xquad_r")
    parser.add_argument("--langs", help="comma-separated language codes (default: all)")
    parser.add_argument("--limit", type=int, help="first N candidates per language (and the questions they answer)")
    parser.add_argument("--factor", type=int, default=10, help="how much larger the scaled pool / query set is")
    parser.add_argument("--block", type=int, default=None, help="queries scored at a time (default: lareqa.SCORE_BUDGET // pool size)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="alternate plain / evaluate this many times (ABBA order) and keep the fastest of each"
    )
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    prefixes = (param(params, "model.query_prefix"), param(params, "model.passage_prefix"))
    batch_size = param(params, "evaluate.batch_size")
    langs = args.langs.split(",") if args.langs else None

    questions, candidates, folder = evaluate.read_source_tables(args.dataset)
    questions, candidates = limited(questions, candidates, args.limit)
    task = evaluate.prepare_task(questions, candidates, langs, args.dataset, str(folder))  # as main does
    chosen = task.langs
    texts = [prefixes[0] + t for t in task.query_text] + [prefixes[1] + t for t in task.candidate_text]
    index, unique = pd.factorize(pd.Series(texts, dtype=object))
    unique = list(unique)

    model = load_model(args.model, param(params, "model.max_length"))
    import torch

    print(
        f"model {args.model}  dataset {args.dataset}  langs {len(chosen)}  limit {args.limit}  "
        f"batch {batch_size}  torch threads {torch.get_num_threads()}",
        flush=True,
    )
    model.encode(unique[: 2 * batch_size], batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)

    def run_plain():
        started = time.perf_counter()
        out = model.encode(unique, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return time.perf_counter() - started, out

    def run_evaluate():
        started = time.perf_counter()
        result = evaluate.evaluate_task(model, task, prefixes, batch_size)
        return time.perf_counter() - started, result

    plain_runs, eval_runs = [], []
    for r in range(args.repeat):  # ABBA: neither side always runs first on a shared, busy CPU
        for which in ("plain", "eval") if r % 2 == 0 else ("eval", "plain"):
            if which == "plain":
                plain_runs.append(run_plain())
            else:
                eval_runs.append(run_evaluate())
    plain_seconds, plain = min(plain_runs, key=lambda run: run[0])
    total_seconds, best = min(eval_runs, key=lambda run: run[0])
    summary, timing = best.summary, best.timing
    spread = (
        f"    runs: plain {', '.join(f'{s:.2f}' for s, _ in plain_runs)} s; "
        f"evaluate {', '.join(f'{s:.2f}' for s, _ in eval_runs)} s (fastest of each shown)"
    )

    embeddings = np.asarray(plain, dtype=np.float32)[index]
    n_queries = len(task.query_text)
    queries, pool = embeddings[:n_queries], embeddings[n_queries:]
    check = headline_figures(score_task(task, queries, pool, block=args.block))
    same = all(abs(check[k] - summary[k]) < 1e-4 for k in ("mono_map", "cross_map", "multi_map"))

    print()
    print("(a) texts")
    print(
        f"    {len(texts)} texts ({n_queries} queries + {len(pool)} candidates), {len(unique)} unique "
        f"(evaluate: {timing['unique_texts']} of {timing['texts']})"
    )
    print("(b)-(c) time                               seconds   texts/s")
    rows = [
        ("plain SentenceTransformer.encode", plain_seconds),
        ("evaluate_task: its encode", timing["encode_seconds"]),
        ("evaluate_task: its scoring", timing["score_seconds"]),
        ("evaluate_task: total (texts..summary)", total_seconds),
    ]
    for name, seconds in rows:
        print(f"    {name:<38}{seconds:>9.2f}{len(unique) / seconds:>10.1f}")
    if args.repeat > 1:
        print(spread)
    print(
        f"    total / own encode = {total_seconds / timing['encode_seconds']:.3f}   "
        f"total / plain encode = {total_seconds / plain_seconds:.3f}   "
        f"(metrics from the plain embeddings match evaluate's: {'yes' if same else 'NO'})"
    )

    cases = [("real pool", task, queries, pool)]
    big_task, big_pool = bigger_pool(task, pool, args.factor)
    cases.append((f"{args.factor}x pool", big_task, queries, big_pool))
    many_task, many_queries = more_queries(task, queries, args.factor)
    cases.append((f"{args.factor}x queries", many_task, many_queries, pool))
    rule = (
        f"block {args.block} (fixed)"
        if args.block
        else f"default block = SCORE_BUDGET // pool (SCORE_BUDGET {lareqa.SCORE_BUDGET} scores, "
        f"{lareqa.SCORE_BUDGET * 4 / 2**20:.0f} MiB of float32)"
    )
    print(f"(d) score_task, {rule}")
    print(
        f"    {'case':<14}{'queries':>9}{'pool':>9}{'block':>8}{'emb MiB':>9}{'Q x P MiB':>11}"
        f"{'blk x P MiB':>13}{'peak MiB':>10}{'seconds':>9}"
    )
    for name, case_task, case_queries, case_pool in cases:
        peak, seconds = measure_scoring(case_task, case_queries, case_pool, args.block)
        block = block_used(case_pool, args.block)
        emb = (case_queries.nbytes + case_pool.nbytes) / 2**20
        full = len(case_queries) * len(case_pool) * 4 / 2**20  # an unblocked float32 score matrix
        one_block = min(block, len(case_queries)) * len(case_pool) * 4 / 2**20  # one block's score matrix
        print(
            f"    {name:<14}{len(case_queries):>9}{len(case_pool):>9}{block:>8}{emb:>9.1f}{full:>11.1f}"
            f"{one_block:>13.1f}{peak:>10.1f}{seconds:>9.2f}"
        )
    print("    peak: allocated during scoring beyond the embeddings; Q x P: one unblocked float32 score matrix;")
    print("    blk x P: one block's (min(block, Q) rows). Blocking bounds the peak by the block, not by Q;")
    if args.block:
        print("    with a fixed block it still grows with the pool.")
    else:
        print("    the budget rule shrinks the block as the pool grows, so the peak stays about flat")
        print("    (until Q x P fits the budget, the whole matrix is one block and the peak is below it).")


if __name__ == "__main__":
    main()
