"""Benchmark of the LAReQA evaluation: encoding speed per precision and batch size, bf16's accuracy, where the time goes, and what scoring costs in memory.

Measured side by side in one run, on the same model:
  (a) texts and distinct texts of the evaluation and of its candidate pool;
  (b) encoding speed: the distinct prefixed candidate-pool texts (--texts all: every distinct
      text of the evaluation) encoded by the project's `encode_unique` at each precision of
      --precisions and batch size of --batch-sizes, interleaved: round 1 runs fp32/16,
      bf16/16, fp32/32, bf16/32, ..., every later round the same again, so that a busy,
      shared CPU slows every cell alike. Best-of-rounds texts/s per cell, the bf16/fp32
      ratio at each batch size and at each precision's best batch size (target >= 1.8x);
  (c) accuracy and where the time goes: the full evaluation (`evaluate_task` on the task
      `prepare_task` built, as the `evaluate` stage does) once per precision, on the same
      model and task at --eval-batch-size (default: params.yaml's evaluate.batch_size):
      Mo./Cr./Mul. mAP bf16 - fp32 (target: within 0.002) and the relative difference of
      rank distance (target: within 1%), with PASS/FAIL; the cosine between each text's
      fp32 and bf16 embedding; encode, score and total seconds of each evaluation;
  (d) peak memory (tracemalloc; numpy reports its buffers to it), time and query block of
      `score_task` on the real pool, on a pool N x larger (each language's candidate embeddings
      repeated, answers in the first copy) and on N x more queries (repeated), all from the
      embeddings of the first evaluation of (c), so nothing is encoded again. With the default
      block (--block unset: lareqa.SCORE_BUDGET // pool size queries a block) the peak should
      stay about flat in all three cases; a fixed --block makes it grow with the pool.
A compact summary table closes the output.

Run from the repository root, after `dvc repro fetch base_model` (data/raw/<dataset>/, models/base):
    .venv/bin/python benchmarks/eval_speed.py --model models/base                       # full XQuAD-R pool, fp32 and bf16 x 16, 32, 64, 2 rounds
    .venv/bin/python benchmarks/eval_speed.py --model models/base --limit 6 --rounds 1  # quick check, about a minute

--limit N keeps the first N candidates of each language and the questions answered by them
(a question's translation answered further on simply has no answer in that language).
Without native bf16 units (AVX-512 BF16 or AMX on CPU, or CUDA) bf16 is emulated: it still runs, to show
how much slower it is there, and the summary says which precision `precision: auto` picks on this
machine and whether that is the faster of the two (within 5%).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from dataclasses import replace

import numpy as np
import pandas as pd

from pipeline import evaluate
from pipeline.machine import describe, machine_record, resolve_precision
from pipeline.params import execution, load_params
from pipeline.scoring import lareqa
from pipeline.scoring.encoding import encode_unique, load_model
from pipeline.scoring.lareqa import RetrievalTask, score_task

PRECISIONS = ("fp32", "bf16")
MAP_TOLERANCE = 0.002  # bf16 - fp32, absolute, for Mo./Cr./Mul. mAP
RANK_DISTANCE_TOLERANCE = 0.01  # bf16 vs fp32, relative
ENCODE_TARGET = 1.8  # bf16 / fp32 texts/s, each at its best batch size, where bf16 is native
AUTO_TOLERANCE = 0.05  # auto may be at most 5% slower than the faster of fp32 and bf16


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
    paragraphs = np.concatenate(
        [np.tile(task.candidate_paragraph[lo:hi], factor) for lo, hi in zip(task.pool_offsets[:-1], task.pool_offsets[1:])]
    )
    bigger = replace(task, candidate_text=texts, pool_offsets=offsets, answers=answers, candidate_paragraph=paragraphs)
    return bigger, np.concatenate(parts)


def more_queries(task: RetrievalTask, queries: np.ndarray, factor: int) -> tuple[RetrievalTask, np.ndarray]:
    return (
        replace(
            task,
            query_lang=np.tile(task.query_lang, factor),
            query_id=np.tile(task.query_id, factor),
            query_paragraph=np.tile(task.query_paragraph, factor),
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


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def precision_list(text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    for p in chosen:
        if p not in PRECISIONS:
            raise argparse.ArgumentTypeError(f"{p!r} is not one of {', '.join(PRECISIONS)}")
    return sorted(set(chosen), key=PRECISIONS.index)


def time_encoding(model, texts: list[str], batch_size: int, bf16: bool) -> float:
    """Seconds `encode_unique` takes for `texts` (already distinct) at this batch size and precision."""
    started = time.perf_counter()
    encode_unique(model, texts, batch_size, bf16)
    return time.perf_counter() - started


def compare_figures(fp32: dict, bf16: dict) -> list[tuple[str, float, float, str, bool]]:
    """(name, fp32, bf16, difference as shown, within target) for the headline figures the targets name."""
    rows = []
    for key, name in (("mono_map", "Mo. mAP"), ("cross_map", "Cr. mAP"), ("multi_map", "Mul. mAP")):
        diff = bf16[key] - fp32[key]
        ok = bool(abs(diff) <= MAP_TOLERANCE) if np.isfinite(diff) else bool(np.isnan(fp32[key]) and np.isnan(bf16[key]))
        rows.append((name, fp32[key], bf16[key], f"{diff:+.4f}", ok))
    a, b = fp32["rank_distance"], bf16["rank_distance"]
    rel = (b - a) / a if a else (0.0 if a == b else float("inf"))
    rows.append(("rank distance", a, b, f"{100 * rel:+.2f}%", bool(abs(rel) <= RANK_DISTANCE_TOLERANCE)))
    return rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--dataset", default="xquad_r")
    parser.add_argument("--langs", help="comma-separated language codes (default: all)")
    parser.add_argument("--limit", type=int, help="first N candidates per language (and the questions they answer)")
    parser.add_argument(
        "--precisions", type=precision_list, default=list(PRECISIONS), help="comma-separated, of fp32, bf16 (default: both)"
    )
    parser.add_argument(
        "--batch-sizes", type=int_list, default=[16, 32, 64], help="comma-separated encoding batch sizes (default: 16,32,64)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="times the whole (precision, batch size) grid is run, interleaved; best of them kept"
    )
    parser.add_argument(
        "--texts", choices=("pool", "all"), default="pool", help="what (b) encodes: the candidate pool, or every text of the evaluation"
    )
    parser.add_argument(
        "--eval-batch-size", type=int, help="batch size of the evaluations of (c) (default: HYBRIDIR_EVAL_BATCH_SIZE, else 16)"
    )
    parser.add_argument("--factor", type=int, default=10, help="how much larger the scaled pool / query set is")
    parser.add_argument("--block", type=int, default=None, help="queries scored at a time (default: lareqa.SCORE_BUDGET // pool size)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    if not args.precisions or not args.batch_sizes or args.rounds < 1:
        parser.error("--precisions, --batch-sizes and --rounds must not be empty or zero")
    params = load_params(args.params)
    prefixes = (params.model.query_prefix, params.model.passage_prefix)
    eval_batch_size = args.eval_batch_size or execution().eval_batch_size
    langs = args.langs.split(",") if args.langs else None

    questions, candidates, folder = evaluate.read_source_tables(args.dataset, params.data)
    questions, candidates = limited(questions, candidates, args.limit)
    task = evaluate.prepare_task(questions, candidates, langs, args.dataset, str(folder))  # as main does
    query_texts = [prefixes[0] + t for t in task.query_text]
    pool_texts = [prefixes[1] + t for t in task.candidate_text]
    all_unique = list(pd.unique(pd.Series(query_texts + pool_texts, dtype=object)))
    pool_unique = list(pd.unique(pd.Series(pool_texts, dtype=object)))
    bench_texts = pool_unique if args.texts == "pool" else all_unique

    model = load_model(args.model, params.model.max_length)
    device = model.device.type
    bf16_of = {p: resolve_precision(p, device, "--precisions") == "bf16" for p in args.precisions}
    auto = resolve_precision("auto", device, "auto")
    print(f"machine: {describe(machine_record(device, f'auto = {auto}'))}")
    print(f"model {args.model}  dataset {args.dataset}  langs {len(task.langs)}  limit {args.limit}", flush=True)
    print("(a) texts")
    print(
        f"    {len(query_texts) + len(pool_texts)} texts ({len(query_texts)} queries + {len(pool_texts)} candidates), "
        f"{len(all_unique)} distinct; the pool alone: {len(pool_unique)} distinct",
        flush=True,
    )

    # (b) the grid, interleaved across rounds; each (precision, batch size) warmed up once first
    cells = [(p, b) for b in args.batch_sizes for p in args.precisions]
    for p, b in cells:
        encode_unique(model, bench_texts[:b], b, bf16_of[p])
    runs: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    for r in range(args.rounds):
        for p, b in cells:
            seconds = time_encoding(model, bench_texts, b, bf16_of[p])
            runs[p, b].append(seconds)
            print(f"    round {r + 1}: {p}/{b}: {seconds:.1f} s, {len(bench_texts) / seconds:.1f} texts/s", flush=True)
    speed = {cell: len(bench_texts) / min(seconds) for cell, seconds in runs.items()}
    best_batch = {p: max(args.batch_sizes, key=lambda b, p=p: speed[p, b]) for p in args.precisions}
    both = all(p in args.precisions for p in PRECISIONS)

    print(
        f"(b) encoding {len(bench_texts)} distinct {'candidate-pool' if args.texts == 'pool' else 'evaluation'} texts, best of {args.rounds} round(s), texts/s"
    )
    print("    batch" + "".join(f"{p:>10}" for p in args.precisions) + ("   bf16/fp32" if both else ""))
    for b in args.batch_sizes:
        ratio = f"{speed['bf16', b] / speed['fp32', b]:>11.2f}x" if both else ""
        print(f"    {b:>5}" + "".join(f"{speed[p, b]:>10.1f}" for p in args.precisions) + ratio)
    encode_ratio = speed["bf16", best_batch["bf16"]] / speed["fp32", best_batch["fp32"]] if both else None
    ratio = f"{encode_ratio:>11.2f}x  (each at its best batch size)" if both else ""
    print("    best " + "".join(f"{speed[p, best_batch[p]]:>10.1f}" for p in args.precisions) + ratio)
    print("    best batch size: " + ", ".join(f"{p} {best_batch[p]}" for p in args.precisions))
    print("    runs (s): " + "; ".join(f"{p}/{b} " + ", ".join(f"{s:.1f}" for s in runs[p, b]) for p, b in cells), flush=True)

    # (c) the full evaluation once per precision, on the same model and task
    results = {}
    for p in args.precisions:
        started = time.perf_counter()
        results[p] = evaluate.evaluate_task(model, task, prefixes, eval_batch_size, bf16_of[p])
        results[p].timing["total_seconds"] = time.perf_counter() - started
    print(f"(c) evaluate_task at batch size {eval_batch_size}")
    print(
        f"    {'precision':<10}{'encode s':>10}{'texts/s':>9}{'score s':>9}{'total s':>9}{'Mo. mAP':>9}{'Cr. mAP':>9}{'Mul. mAP':>9}{'rank dist':>10}"
    )
    for p, result in results.items():
        t, s = result.timing, result.summary
        print(
            f"    {p:<10}{t['encode_seconds']:>10.1f}{t['unique_texts'] / t['encode_seconds']:>9.1f}{t['score_seconds']:>9.2f}"
            f"{t['total_seconds']:>9.1f}{s['mono_map']:>9.4f}{s['cross_map']:>9.4f}{s['multi_map']:>9.4f}{s['rank_distance']:>10.3f}"
        )
    accuracy = None
    if both:
        a, b = results["fp32"], results["bf16"]
        accuracy = compare_figures(a.summary, b.summary)
        for name, _, _, diff, ok in accuracy:
            target = f"|diff| <= {MAP_TOLERANCE}" if "mAP" in name else f"|rel| <= {RANK_DISTANCE_TOLERANCE:.0%}"
            print(f"    bf16 - fp32 {name:<14}{diff:>9}   {target:<16}{verdict(ok)}")
        cosine = np.concatenate([np.sum(a.queries * b.queries, axis=1), np.sum(a.pool * b.pool, axis=1)])
        norms = np.linalg.norm(np.concatenate([b.queries, b.pool]), axis=1)
        print(
            f"    cosine(fp32, bf16) per text: min {cosine.min():.5f}, mean {cosine.mean():.6f}; "
            f"bf16 embeddings {b.pool.dtype}, max |norm - 1| {np.abs(norms - 1).max():.1e}",
            flush=True,
        )

    # (d) scoring memory, from the first evaluation's embeddings
    first = results[args.precisions[0]]
    queries, pool = first.queries, first.pool
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

    # the compact summary
    print()
    print(
        f"summary ({device}, {len(bench_texts)} distinct {args.texts} texts, best of {args.rounds} round(s); evaluation at batch {eval_batch_size})"
    )
    print(f"    {'':<26}" + "".join(f"{p:>13}" for p in args.precisions) + f"{'bf16 vs fp32':>15}   target")
    enc = "".join(f"{f'{speed[p, best_batch[p]]:.1f} @{best_batch[p]}':>13}" for p in args.precisions)
    target = f">= {ENCODE_TARGET}x  {verdict(encode_ratio >= ENCODE_TARGET)}" if auto == "bf16" else "(bf16 emulated here)"
    tail = f"{encode_ratio:>14.2f}x   {target}" if both else ""
    print(f"    {'encode texts/s @best batch':<26}{enc}{tail}")
    if both:
        best = {p: speed[p, best_batch[p]] for p in PRECISIONS}
        fastest = max(best, key=best.get)
        ok = best[auto] >= (1 - AUTO_TOLERANCE) * best[fastest]
        print(f"    {'auto picks ' + auto:<26}{'the faster is ' + fastest:>26}{'':>15}   within {AUTO_TOLERANCE:.0%}  {verdict(ok)}")
    if accuracy:
        for name, fp32_value, bf16_value, diff, ok in accuracy:
            target = f"|diff| <= {MAP_TOLERANCE}" if "mAP" in name else f"|rel| <= {RANK_DISTANCE_TOLERANCE:.0%}"
            print(f"    {name:<26}{fp32_value:>13.4f}{bf16_value:>13.4f}{diff:>15}   {target}  {verdict(ok)}")
    evals = "".join(f"{results[p].timing['total_seconds']:>13.1f}" for p in args.precisions)
    print(f"    {'evaluate_task total s':<26}{evals}")


if __name__ == "__main__":
    main()
