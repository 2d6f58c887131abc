"""The `evaluate` stage: LAReQA retrieval in monolingual, cross-lingual and multilingual settings.

Protocol (Roy et al. 2020, as used by the hybrid-batch paper):
- candidates of a language = every sentence of every paragraph in it (passage prefix);
  queries = every question (query prefix); cosine similarity of normalized embeddings;
- a question's relevant candidate in language Y is its own answer sentence in Y; a
  question is scored against Y only where its id exists in Y (MLQA-R);
- Mo.: X queries against X's pool; Cr.: X against Y's pool, X != Y; a pair's score is
  the mean over its queries, a setting's the macro-average over pairs;
- Mul.: X queries against one pool of every language, all answer sentences relevant;
  macro-averaged over query languages; rank distance (language bias) = highest minus
  lowest rank among a query's relevant candidates.

Every distinct text is encoded once; one score matrix per block of queries against the
whole multilingual pool serves all three settings, so scoring is nearly free and memory
stays flat as pools grow.

Robustness (`evaluate.noise`): a seeded sample of queries per language is perturbed
(pipeline/noise.py) and scored again in all three settings against the same pool
embeddings; only the queries a noise changed are re-encoded. MTEB tasks
(`evaluate.mteb_tasks`) run through `mteb` on the same model (pipeline/mteb_tasks.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.common import PipelineError, atomic_path, first_line, load_params, param, read_parquet, run_stage, write_json
from pipeline.metrics import average_precision, ndcg_at_k, rank_distance, ranks_of, recall_at_k
from pipeline.mteb_tasks import resolve_tasks, run_tasks
from pipeline.noise import Noise, perturb
from pipeline.sources import CANDIDATES_SCHEMA, LAREQA_SOURCES, QUESTIONS_SCHEMA

RAW_DIR = Path("data/raw")
# Scores held at once (64 MiB of float32): queries are scored in blocks of
# SCORE_BUDGET // pool size against the whole multilingual pool, so a pool 10x
# larger gets blocks 10x smaller and peak memory stays flat.
SCORE_BUDGET = 2**24
SETTINGS = ("mono_map", "cross_map", "multi_map")  # the headline figure of each setting


@dataclass
class RetrievalTask:
    """A dataset ready to score: queries and the multilingual candidate pool, row-aligned with embeddings."""

    langs: list[str]
    query_lang: np.ndarray  # [Q] index into langs
    query_text: list[str]
    candidate_text: list[str]  # pool ordered by language, then candidate index
    pool_offsets: np.ndarray  # [L + 1] slice of each language in the pool
    answers: np.ndarray  # [Q, L] pool index of the query's answer in each language, -1 if absent


@dataclass
class TaskScores:
    pair_map: pd.DataFrame  # [L, L] mean AP of X queries against Y's pool (NaN: no queries)
    pair_recall_at_1: pd.DataFrame
    languages: pd.DataFrame  # per query language: multi_map, multi_recall_at_10, multi_ndcg_at_10, rank_distance


def build_task(questions: pd.DataFrame, candidates: pd.DataFrame, langs: list[str], origin: str) -> RetrievalTask:
    """Line up questions and candidates of `langs`; fail if a question's answer sentence is missing."""
    lang_index = {lang: i for i, lang in enumerate(langs)}
    candidates = candidates[candidates["lang"].isin(langs)]
    candidates = candidates.assign(lang_order=candidates["lang"].map(lang_index))
    candidates = candidates.sort_values(["lang_order", "candidate"])  # the pool in `langs` order
    questions = questions[questions["lang"].isin(langs)]
    sizes = candidates.groupby("lang")["candidate"].count().reindex(langs, fill_value=0).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for lang, size in zip(langs, sizes):
        got = candidates.loc[candidates["lang"] == lang, "candidate"].to_numpy()
        if size == 0 or not np.array_equal(got, np.arange(size)):
            raise PipelineError(f"{origin}/candidates.parquet: language '{lang}' has no candidates 0..n-1")
    q_lang = questions["lang"].map(lang_index).to_numpy()
    bad = (questions["answer_candidate"].to_numpy() < 0) | (
        questions["answer_candidate"].to_numpy() >= sizes[q_lang]
    )
    if bad.any():
        row = questions[bad].iloc[0]
        raise PipelineError(
            f"{origin}/questions.parquet: answer_candidate {row.answer_candidate} of question "
            f"{row.group_id} ({row.lang}) is not a candidate of that language"
        )
    group_codes, groups = pd.factorize(questions["group_id"])
    answer_of_group = np.full((len(groups), len(langs)), -1, dtype=np.int64)
    answer_of_group[group_codes, q_lang] = offsets[q_lang] + questions["answer_candidate"].to_numpy()
    return RetrievalTask(
        langs=langs,
        query_lang=q_lang,
        query_text=questions["question"].tolist(),
        candidate_text=candidates["sentence"].tolist(),
        pool_offsets=offsets,
        answers=answer_of_group[group_codes],
    )


def encode_unique(model, texts: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode each distinct text once (one call; sentence-transformers sorts it by length).

    Returns (embeddings of the distinct texts, index of each input text into them).
    """
    index, unique = pd.factorize(pd.Series(texts, dtype=object))
    embeddings = model.encode(
        list(unique),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=True,
    )
    return np.asarray(embeddings, dtype=np.float32), index


def score_task(task: RetrievalTask, queries: np.ndarray, pool: np.ndarray, block: int | None = None) -> TaskScores:
    """All three settings from one [block, pool] score matrix per block of queries."""
    block = block or max(1, SCORE_BUDGET // max(1, len(pool)))
    n_langs = len(task.langs)
    ap_sum = np.zeros((n_langs, n_langs))
    r1_sum = np.zeros((n_langs, n_langs))
    count = np.zeros((n_langs, n_langs))
    multi = {"multi_map": [], "multi_recall_at_10": [], "multi_ndcg_at_10": [], "rank_distance": []}
    for start in range(0, len(queries), block):
        rows = slice(start, start + block)
        scores = queries[rows] @ pool.T
        answers = task.answers[rows]
        q_lang = task.query_lang[rows]
        ranks = ranks_of(scores, answers)
        multi["multi_map"].append(average_precision(ranks))
        multi["multi_recall_at_10"].append(recall_at_k(ranks, 10))
        multi["multi_ndcg_at_10"].append(ndcg_at_k(ranks, 10))
        multi["rank_distance"].append(rank_distance(ranks))
        for y in range(n_langs):
            lo, hi = task.pool_offsets[y], task.pool_offsets[y + 1]
            has = answers[:, y] >= 0
            pair_ranks = ranks_of(scores[has, lo:hi], answers[has, y : y + 1] - lo)
            np.add.at(ap_sum[:, y], q_lang[has], average_precision(pair_ranks))
            np.add.at(r1_sum[:, y], q_lang[has], recall_at_k(pair_ranks, 1))
            np.add.at(count[:, y], q_lang[has], 1)
        del scores, ranks  # free this block's matrix before the next one is computed
    with np.errstate(invalid="ignore"):
        pair_map = pd.DataFrame(ap_sum / count, index=task.langs, columns=task.langs)
        pair_r1 = pd.DataFrame(r1_sum / count, index=task.langs, columns=task.langs)
    per_query = pd.DataFrame({k: np.concatenate(v) for k, v in multi.items()})
    per_query["lang"] = np.asarray(task.langs)[task.query_lang]
    languages = per_query.groupby("lang").mean().reindex(task.langs)
    return TaskScores(pair_map=pair_map, pair_recall_at_1=pair_r1, languages=languages)


def summarize(scores: TaskScores) -> dict:
    """Headline figures: macro-averages over language pairs (Mo., Cr.) and query languages (Mul.)."""
    diagonal = np.eye(len(scores.pair_map), dtype=bool)
    pair_map, pair_r1 = scores.pair_map.to_numpy(), scores.pair_recall_at_1.to_numpy()
    summary = {
        "mono_map": np.nanmean(pair_map[diagonal]),
        "mono_recall_at_1": np.nanmean(pair_r1[diagonal]),
        "cross_map": np.nanmean(pair_map[~diagonal]) if len(pair_map) > 1 else float("nan"),
        "cross_recall_at_1": np.nanmean(pair_r1[~diagonal]) if len(pair_map) > 1 else float("nan"),
        "multi_map": scores.languages["multi_map"].mean(),
        "multi_recall_at_10": scores.languages["multi_recall_at_10"].mean(),
        "multi_ndcg_at_10": scores.languages["multi_ndcg_at_10"].mean(),
        "rank_distance": scores.languages["rank_distance"].mean(),
    }
    summary = {k: round(float(v), 6) for k, v in summary.items()}
    summary["lang"] = {
        lang: {
            "mono_map": round(float(scores.pair_map.loc[lang, lang]), 6),
            **{k: round(float(v), 6) for k, v in row.items()},
        }
        for lang, row in scores.languages.iterrows()
    }
    return summary


def load_model(name: str, max_length: int):
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(name, device=None)
    except Exception as err:  # a bad directory fails in many library-specific ways
        raise PipelineError(f"{name}: cannot load a sentence-transformers model ({first_line(err)})") from None
    model.max_seq_length = max_length
    return model


def load_dataset(name: str, raw_dir: Path = RAW_DIR) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    if name not in LAREQA_SOURCES:
        raise PipelineError(f"unknown evaluation dataset '{name}' (known: {', '.join(sorted(LAREQA_SOURCES))})")
    folder = raw_dir / name
    if not (folder / "questions.parquet").exists():
        raise PipelineError(f"{folder}: not fetched yet; add it to data.eval and run `dvc repro fetch`")
    questions = read_parquet(folder / "questions.parquet", QUESTIONS_SCHEMA).to_pandas()
    candidates = read_parquet(folder / "candidates.parquet", CANDIDATES_SCHEMA).to_pandas()
    return questions, candidates, folder


def select_langs(available: list[str], wanted: list[str] | None, dataset: str) -> list[str]:
    if not wanted:
        return available
    repeated = sorted({lang for lang in wanted if wanted.count(lang) > 1})
    if repeated:
        raise PipelineError(f"{dataset}: language code(s) repeated: {', '.join(repeated)}")
    unknown = [lang for lang in wanted if lang not in available]
    if unknown:
        raise PipelineError(
            f"{dataset}: unknown language code(s) {', '.join(unknown)} (available: {', '.join(available)})"
        )
    return list(wanted)


def prepare_task(name: str, langs: list[str] | None) -> RetrievalTask:
    """Load and check one dataset, before any model is loaded, so bad input fails fast."""
    questions, candidates, folder = load_dataset(name)
    langs = select_langs(sorted(candidates["lang"].unique()), langs, name)
    return build_task(questions, candidates, langs, str(folder))


@dataclass
class Evaluation:
    summary: dict
    scores: TaskScores
    timing: dict
    queries: np.ndarray  # [Q, D] embeddings, reused by the noise report
    pool: np.ndarray  # [C, D]


def evaluate_task(model, task: RetrievalTask, prefixes: tuple[str, str], batch_size: int) -> Evaluation:
    """Encode (each distinct text once) and score one dataset."""
    query_prefix, passage_prefix = prefixes
    texts = [query_prefix + t for t in task.query_text] + [passage_prefix + t for t in task.candidate_text]
    started = time.perf_counter()
    unique_embeddings, index = encode_unique(model, texts, batch_size)
    encoded = time.perf_counter()
    embeddings = unique_embeddings[index]
    n_queries = len(task.query_text)
    queries, pool = embeddings[:n_queries], embeddings[n_queries:]
    scores = score_task(task, queries, pool)
    timing = {
        "texts": len(texts),
        "unique_texts": len(unique_embeddings),
        "encode_seconds": encoded - started,
        "score_seconds": time.perf_counter() - encoded,
    }
    return Evaluation(summarize(scores), scores, timing, queries, pool)


def sample_queries(task: RetrievalTask, per_lang: int | None, seed: int) -> np.ndarray:
    """Rows of up to `per_lang` queries of each language (all if None), in task order.

    Each language's sample depends on (seed, language) only, so it is the same for every
    model, noise and language subset: noisy scores are compared on the same questions.
    """
    if per_lang is None:
        return np.arange(len(task.query_text))
    picks = []
    for x, lang in enumerate(task.langs):
        rng = np.random.default_rng([seed, zlib.crc32(lang.encode())])
        picks.append(rng.permutation(np.flatnonzero(task.query_lang == x))[:per_lang])
    return np.sort(np.concatenate(picks))


def subset_queries(task: RetrievalTask, rows: np.ndarray) -> RetrievalTask:
    """The same pool, with only the queries at `rows`."""
    return dataclasses.replace(
        task,
        query_lang=task.query_lang[rows],
        query_text=[task.query_text[i] for i in rows],
        answers=task.answers[rows],
    )


def settings_of(scores: TaskScores) -> dict[str, float]:
    summary = summarize(scores)
    return {key: summary[key] for key in SETTINGS}


def noise_robustness(model, task: RetrievalTask, queries: np.ndarray, pool: np.ndarray, noises: list[Noise],
                     query_prefix: str, batch_size: int, per_lang: int | None, seed: int) -> dict:
    """Mo./Cr./Mul. mAP of a query sample, clean and under each noise, with the drop from clean.

    Only queries a noise changed are encoded again; the pool embeddings are reused as they
    are. A query a noise leaves as it was (no diacritics in Chinese, no capitals in Hindi,
    no letter drawn for a typo) keeps its clean embedding and is counted as unchanged.
    """
    rows = sample_queries(task, per_lang, seed)
    sample = subset_queries(task, rows)
    clean_queries = queries[rows]
    clean = settings_of(score_task(sample, clean_queries, pool))
    report: dict = {"queries": len(rows), "clean": clean}
    langs = np.asarray(task.langs)[sample.query_lang]
    for noise in noises:
        noisy_text = [perturb(text, noise, seed) for text in sample.query_text]
        changed = np.array([a != b for a, b in zip(noisy_text, sample.query_text)], dtype=bool)
        noisy_queries = clean_queries.copy()
        if changed.any():
            print(f"  {noise.name}: encoding the {changed.sum()} changed of {len(rows)} queries")
            embedded, index = encode_unique(
                model, [query_prefix + text for text, c in zip(noisy_text, changed) if c], batch_size
            )
            noisy_queries[changed] = embedded[index]
        noisy = settings_of(score_task(sample, noisy_queries, pool))
        unchanged = pd.Series(langs[~changed]).value_counts().reindex(task.langs, fill_value=0)
        report[noise.name] = {
            **noisy,
            **{key.replace("_map", "_drop"): round(clean[key] - noisy[key], 6) for key in SETTINGS},
            "unchanged": int((~changed).sum()),
            "unchanged_by_lang": {lang: int(n) for lang, n in unchanged.items()},
        }
    return report


def write_plots(results: dict[str, TaskScores], noise_reports: dict[str, dict], plots_dir: Path) -> None:
    """Per-pair mAP (data + heatmap per dataset), the per-language table and, with noise,
    mAP of each setting clean and under each noise (noise.csv), for `dvc plots`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(plots_dir, is_dir=True) as tmp:
        pairs, languages = [], []
        (tmp / "heatmaps").mkdir()
        for name, scores in results.items():
            long = scores.pair_map.rename_axis(index="query_lang", columns="passage_lang").stack()
            pairs.append(long.rename("map").reset_index().assign(dataset=name))
            languages.append(scores.languages.rename_axis("lang").reset_index().assign(dataset=name))
            fig, ax = plt.subplots(figsize=(1 + 0.6 * len(scores.pair_map), 0.8 + 0.55 * len(scores.pair_map)))
            image = ax.imshow(scores.pair_map.to_numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(scores.pair_map)), scores.pair_map.columns)
            ax.set_yticks(range(len(scores.pair_map)), scores.pair_map.index)
            ax.set_xlabel("passage language")
            ax.set_ylabel("query language")
            ax.set_title(f"{name}: mAP of X queries against Y passages")
            for (i, j), value in np.ndenumerate(scores.pair_map.to_numpy()):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
            fig.colorbar(image, ax=ax, fraction=0.046)
            fig.tight_layout()
            fig.savefig(tmp / "heatmaps" / f"{name}.png", dpi=110)
            plt.close(fig)
        columns = ["dataset", "query_lang", "passage_lang", "map"]
        pd.concat(pairs)[columns].round(6).to_csv(tmp / "pairs.csv", index=False)
        lang_columns = ["dataset", "lang", "multi_map", "multi_recall_at_10", "multi_ndcg_at_10", "rank_distance"]
        pd.concat(languages)[lang_columns].round(6).to_csv(tmp / "languages.csv", index=False)
        noise_rows = [
            {"dataset": name, "noise": noise, **{key: figures[key] for key in SETTINGS}}
            for name, report in noise_reports.items()
            for noise, figures in report.items()
            if noise != "queries"
        ]
        if noise_rows:
            pd.DataFrame(noise_rows).to_csv(tmp / "noise.csv", index=False)


def format_summary(name: str, summary: dict) -> str:
    head = (
        f"{name}: Mo. mAP {summary['mono_map']:.4f}  Cr. mAP {summary['cross_map']:.4f}  "
        f"Mul. mAP {summary['multi_map']:.4f}  rank distance {summary['rank_distance']:.1f}\n"
        f"  Mo. R@1 {summary['mono_recall_at_1']:.4f}  Cr. R@1 {summary['cross_recall_at_1']:.4f}  "
        f"Mul. R@10 {summary['multi_recall_at_10']:.4f}  Mul. nDCG@10 {summary['multi_ndcg_at_10']:.4f}"
    )
    rows = [f"  {'lang':<5}{'Mo. mAP':>9}{'Mul. mAP':>10}{'Mul. R@10':>11}{'Mul. nDCG@10':>14}{'rank dist':>11}"]
    for lang, row in summary["lang"].items():
        rows.append(
            f"  {lang:<5}{row['mono_map']:>9.4f}{row['multi_map']:>10.4f}"
            f"{row['multi_recall_at_10']:>11.4f}{row['multi_ndcg_at_10']:>14.4f}{row['rank_distance']:>11.1f}"
        )
    return "\n".join([head, *rows])


def format_noise(name: str, report: dict, per_lang: int | None) -> str:
    sample = f"{per_lang} per language" if per_lang else "all"
    rows = [
        f"{name} under noise ({report['queries']} queries, {sample}): mAP, and drop from clean",
        f"  {'noise':<15}{'Mo.':>8}{'Cr.':>8}{'Mul.':>8}{'Mo. drop':>10}{'Cr. drop':>10}{'Mul. drop':>10}  unchanged",
    ]
    for noise, figures in report.items():
        if noise == "queries":
            continue
        line = f"  {noise:<15}" + "".join(f"{figures[key]:>8.4f}" for key in SETTINGS)
        if noise != "clean":
            drops = "".join(f"{figures[key.replace('_map', '_drop')]:>10.4f}" for key in SETTINGS)
            by_lang = ", ".join(f"{lang} {n}" for lang, n in figures["unchanged_by_lang"].items() if n)
            line += f"{drops}  {figures['unchanged']}" + (f" ({by_lang})" if by_lang else "")
        rows.append(line)
    return "\n".join(rows)


def noise_params(params: dict) -> tuple[list[Noise], int | None, int]:
    """evaluate.noise, evaluate.noise_queries and evaluate.noise_seed, checked."""
    names = param(params, "evaluate.noise") or []
    if not isinstance(names, list):
        raise PipelineError(f"params.yaml: evaluate.noise: expected a list of noises, got {names!r}")
    repeated = sorted({str(n) for n in names if names.count(n) > 1})
    if repeated:
        raise PipelineError(f"params.yaml: evaluate.noise: repeated: {', '.join(repeated)}")
    try:
        noises = [Noise.parse(name) for name in names]
    except ValueError as err:
        raise PipelineError(f"params.yaml: evaluate.noise: {err}") from None
    per_lang = param(params, "evaluate.noise_queries")
    if per_lang is not None and (isinstance(per_lang, bool) or not isinstance(per_lang, int) or per_lang < 1):
        raise PipelineError(f"params.yaml: evaluate.noise_queries: expected a positive integer or null, got {per_lang!r}")
    seed = param(params, "evaluate.noise_seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PipelineError(f"params.yaml: evaluate.noise_seed: expected an integer, got {seed!r}")
    return noises, per_lang, seed


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate a sentence-transformers model on XQuAD-R / MLQA-R.")
    parser.add_argument("--model", default="models/retriever", help="model directory or hub id")
    parser.add_argument("--dataset", help="comma-separated datasets (default: evaluate.datasets)")
    parser.add_argument("--langs", help="comma-separated language codes (default: evaluate.langs or all)")
    parser.add_argument("--out", default="metrics/eval.json")
    parser.add_argument("--plots", help="directory for plot data and heatmaps")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    datasets = args.dataset.split(",") if args.dataset else param(params, "evaluate.datasets")
    langs = args.langs.split(",") if args.langs else param(params, "evaluate.langs")
    prefixes = (param(params, "model.query_prefix"), param(params, "model.passage_prefix"))
    batch_size = param(params, "evaluate.batch_size")
    if not datasets:
        raise PipelineError("params.yaml: evaluate.datasets: empty; name at least one dataset")
    noises, noise_per_lang, noise_seed = noise_params(params)
    mteb_names = param(params, "evaluate.mteb_tasks") or []
    # bad input fails before the model loads
    tasks = {name: prepare_task(name, langs) for name in datasets}
    mteb_tasks = resolve_tasks(mteb_names, param(params, "evaluate.mteb_langs")) if mteb_names else []
    model = load_model(args.model, param(params, "model.max_length"))
    report, results, noise_reports = {}, {}, {}
    for name, task in tasks.items():
        result = evaluate_task(model, task, prefixes, batch_size)
        report[name], results[name] = result.summary, result.scores
        print(format_summary(name, result.summary))
        print(
            f"  {result.timing['unique_texts']} unique of {result.timing['texts']} texts encoded in "
            f"{result.timing['encode_seconds']:.1f} s, scored in {result.timing['score_seconds']:.1f} s"
        )
        if noises:
            noise_reports[name] = noise_robustness(
                model, task, result.queries, result.pool, noises, prefixes[0], batch_size, noise_per_lang, noise_seed
            )
            report[name]["noise"] = noise_reports[name]
            print(format_noise(name, noise_reports[name], noise_per_lang))
    if mteb_tasks:
        report["mteb"] = run_tasks(model, mteb_tasks, prefixes, batch_size)
    if args.plots:
        write_plots(results, noise_reports, Path(args.plots))
    write_json(report, args.out)


if __name__ == "__main__":
    run_stage(main)
