"""LAReQA scoring (Roy et al. 2020, as the hybrid-batch paper uses it), on embeddings.

- candidates of a language = every sentence of every paragraph in it; queries = every
  question; cosine similarity of normalized embeddings;
- a question's relevant candidate in language Y is its own answer sentence in Y; a
  question is scored against Y only where its id exists in Y (MLQA-R);
- Mo.: X queries against X's pool; Cr.: X against Y's pool, X != Y; a pair's score is
  the mean over its queries, a setting's the macro-average over pairs;
- Mul.: X queries against one pool of every language, all answer sentences relevant;
  macro-averaged over query languages; rank distance (language bias) = highest minus
  lowest rank among a query's relevant candidates; language preference = share of
  queries whose best-ranked relevant candidate is in the query's own language (chance:
  1 / the languages it has an answer in; the multilingual language-aware IR protocol,
  arXiv 2605.07249);
- where the top-1 of a Mo./Cr. query is wrong, whether it is a sibling (another sentence of
  the answer's paragraph) or from another paragraph: the share of errors that are siblings
  says whether the model lost fine-grained reading or topic matching.

One score matrix per block of queries against the whole multilingual pool serves all
three settings, so memory stays flat as pools grow. Every figure is a mean of the
per-query results (`TaskScores.queries`, the rows of `metrics/eval_queries/`), so the
paired statistics of `pipeline/analysis/compare.py` work on exactly what the headline reports.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.common import PipelineError
from pipeline.contracts import HEADLINE_FIGURES, QUERIES_SCHEMA
from pipeline.scoring.metrics import average_precision, ndcg_at_k, rank_distance, ranks_of, recall_at_k
from pipeline.sources.resource_classes import mean_by_class, resource_class

# Scores held at once (64 MiB of float32): queries are scored in blocks of
# SCORE_BUDGET // pool size against the whole multilingual pool, so a pool 10x
# larger gets blocks 10x smaller and peak memory stays flat.
SCORE_BUDGET = 2**24
SETTINGS = HEADLINE_FIGURES  # the headline figure of each setting
CLASS_FIGURES = ("mono_map", "multi_map", "rank_distance", "language_preference")  # per query language, by resource class


@dataclass
class RetrievalTask:
    """A dataset ready to score: queries and the multilingual candidate pool, row-aligned with embeddings."""

    langs: list[str]
    query_lang: np.ndarray  # [Q] index into langs
    query_id: np.ndarray  # [Q] question id (shared by a question's translations)
    query_paragraph: np.ndarray  # [Q] its paragraph id, shared across languages (the unit statistics resample)
    query_text: list[str]
    candidate_text: list[str]  # pool ordered by language, then candidate index
    pool_offsets: np.ndarray  # [L + 1] slice of each language in the pool
    answers: np.ndarray  # [Q, L] pool index of the query's answer in each language, -1 if absent
    candidate_paragraph: np.ndarray  # [C] paragraph of each pool candidate (within its language)


@dataclass
class TaskScores:
    """Per-query results and the per-pair and per-language means derived from them."""

    queries: pd.DataFrame  # one row per scored (setting, query, passage language): QUERIES_SCHEMA's columns
    pair_map: pd.DataFrame  # [L, L] mean AP of X queries against Y's pool (NaN: no queries)
    pair_recall_at_1: pd.DataFrame
    languages: pd.DataFrame  # per query language: mono_map, multi_map, multi_recall_at_10, multi_ndcg_at_10,
    #                          rank_distance, language_preference, language_preference_chance
    resource_classes: pd.DataFrame  # per resource class of the query language: languages, CLASS_FIGURES


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
    bad = (questions["answer_candidate"].to_numpy() < 0) | (questions["answer_candidate"].to_numpy() >= sizes[q_lang])
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
        query_id=questions["group_id"].to_numpy(dtype=object),
        query_paragraph=questions["paragraph"].to_numpy(dtype=object),
        query_text=questions["question"].tolist(),
        candidate_text=candidates["sentence"].tolist(),
        pool_offsets=offsets,
        answers=answer_of_group[group_codes],
        candidate_paragraph=candidates["paragraph"].to_numpy(np.int64),
    )


def score_task(task: RetrievalTask, queries: np.ndarray, pool: np.ndarray, block: int | None = None) -> TaskScores:
    """Every query's results in all three settings, from one [block, pool] score matrix per block."""
    block = block or max(1, SCORE_BUDGET // max(1, len(pool)))
    n_langs = len(task.langs)
    pair_rows, multi_rows = [], []
    for start in range(0, len(queries), block):
        rows = np.arange(start, min(start + block, len(queries)))
        scores = queries[rows] @ pool.T
        answers = task.answers[rows]
        ranks = ranks_of(scores, answers)
        multi_rows.append(pd.DataFrame({
            "query": rows, "ap": average_precision(ranks), "recall_at_10": recall_at_k(ranks, 10),
            "ndcg_at_10": ndcg_at_k(ranks, 10), "rank_distance": rank_distance(ranks).astype(np.float64),
            "own_language_first": own_language_first(ranks, task.query_lang[rows]),
        }))  # fmt: skip
        for y in range(n_langs):
            lo, hi = task.pool_offsets[y], task.pool_offsets[y + 1]
            has = answers[:, y] >= 0
            pair_scores, pair_answers = scores[has, lo:hi], answers[has, y : y + 1] - lo
            pair_ranks = ranks_of(pair_scores, pair_answers)
            pair_rows.append(pd.DataFrame({
                "query": rows[has], "passage": y, "ap": average_precision(pair_ranks),
                "recall_at_1": recall_at_k(pair_ranks, 1),
                "top1": top1_kind(pair_scores, pair_answers[:, 0], pair_ranks[:, 0], task.candidate_paragraph[lo:hi]),
            }))  # fmt: skip
        del scores, ranks  # free this block's matrix before the next one is computed
    return scores_from_queries(task, pd.concat(pair_rows, ignore_index=True), pd.concat(multi_rows, ignore_index=True))


def own_language_first(ranks: np.ndarray, query_lang: np.ndarray) -> np.ndarray:
    """1.0 where the best-ranked relevant candidate is in the query's language, else 0.0.

    `ranks` [Q, L] has one column per language (0 = no answer there); a tie between two
    languages' answers counts against the own language, like every tie here."""
    ranked = np.where(ranks > 0, ranks, np.iinfo(ranks.dtype).max)
    best = ranked.min(axis=1)
    others_tie = (ranked == best[:, None]).sum(axis=1) > 1
    own = ranked[np.arange(len(ranks)), query_lang] == best
    return (own & ~others_tie).astype(np.float64)


def top1_kind(scores: np.ndarray, answer: np.ndarray, answer_rank: np.ndarray, paragraph: np.ndarray) -> np.ndarray:
    """What a query ranks first in one language's pool: 'answer', 'sibling' (another sentence
    of the answer's paragraph) or 'other' (a sentence of another paragraph)."""
    rows = np.arange(len(scores))
    wrong = scores.copy()
    wrong[rows, answer] = -np.inf
    best_wrong = wrong.argmax(axis=1)
    sibling = paragraph[best_wrong] == paragraph[answer]
    return np.where(answer_rank == 1, "answer", np.where(sibling, "sibling", "other")).astype(object)


def scores_from_queries(task: RetrievalTask, pairs: pd.DataFrame, multi: pd.DataFrame) -> TaskScores:
    """The per-query table (QUERIES_SCHEMA) and the per-pair / per-language means of it."""
    langs = np.asarray(task.langs, dtype=object)
    pairs = pairs.assign(query_lang=langs[task.query_lang[pairs["query"]]], passage_lang=langs[pairs["passage"]])
    multi = multi.assign(query_lang=langs[task.query_lang[multi["query"]]])
    multi = multi.assign(chance=1.0 / (task.answers[multi["query"]] >= 0).sum(axis=1))
    pair_means = pairs.groupby(["query_lang", "passage_lang"])[["ap", "recall_at_1"]].mean()
    pair_map = pair_means["ap"].unstack().reindex(index=task.langs, columns=task.langs)
    pair_r1 = pair_means["recall_at_1"].unstack().reindex(index=task.langs, columns=task.langs)
    languages = (
        multi.groupby("query_lang")[["ap", "recall_at_10", "ndcg_at_10", "rank_distance", "own_language_first", "chance"]].mean()
        .rename(columns={"ap": "multi_map", "recall_at_10": "multi_recall_at_10", "ndcg_at_10": "multi_ndcg_at_10",
                         "own_language_first": "language_preference", "chance": "language_preference_chance"})
        .reindex(task.langs)
    )  # fmt: skip
    languages.insert(0, "mono_map", np.diag(pair_map.to_numpy()))
    languages.index.name = None
    queries = pd.concat(
        [
            pairs.assign(setting=np.where(pairs["query_lang"] == pairs["passage_lang"], "mono", "cross")),
            multi.assign(setting="multi", passage_lang=None),
        ],
        ignore_index=True,
    )
    queries["question_id"] = task.query_id[queries["query"]].astype(str)
    queries["paragraph"] = task.query_paragraph[queries["query"]].astype(str)
    columns = QUERIES_SCHEMA.names
    return TaskScores(queries[columns], pair_map, pair_r1, languages, by_resource_class(languages))


def headline_figures(scores: TaskScores) -> dict:
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
        "language_preference": scores.languages["language_preference"].mean(),
        "language_preference_chance": scores.languages["language_preference_chance"].mean(),
        **sibling_error_shares(scores.queries),
    }
    summary = {k: round(float(v), 6) for k, v in summary.items()}
    summary["lang"] = {lang: {k: round(float(v), 6) for k, v in row.items()} for lang, row in scores.languages.iterrows()}
    summary["resource_class"] = {
        str(cls): {k: round(float(v), 6) for k, v in row.items()} for cls, row in scores.resource_classes.iterrows()
    }
    return summary


def by_resource_class(languages: pd.DataFrame) -> pd.DataFrame:
    """The per-query-language figures averaged over the languages of each resource class
    (Joshi et al. 2020, 0-5; pipeline/resource_classes.csv), with the number of languages:
    does training help low-resource languages as much as the rest?"""
    table = pd.DataFrame({figure: mean_by_class(languages[figure].to_dict()) for figure in CLASS_FIGURES})
    table.insert(0, "languages", pd.Series([resource_class(lang) for lang in languages.index]).value_counts().astype(float))
    return table.rename_axis("resource_class")


def sibling_error_shares(queries: pd.DataFrame) -> dict[str, float]:
    """Per setting (mono, cross): the share of top-1 errors that are a sibling of the answer
    (pooled over the setting's queries; NaN without errors)."""
    shares = {}
    for setting in ("mono", "cross"):
        errors = queries.loc[(queries["setting"] == setting) & (queries["top1"] != "answer"), "top1"]
        shares[f"{setting}_sibling_errors"] = float((errors == "sibling").mean()) if len(errors) else float("nan")
    return shares


def _quoted(codes: list[str]) -> str:
    """'en', '' : an empty or blank code (`--langs en,`) is seen, not lost between commas."""
    return ", ".join(repr(code) for code in codes)


def select_langs(available: list[str], wanted: list[str] | None, dataset: str) -> list[str]:
    if not wanted:
        return available
    repeated = sorted({lang for lang in wanted if wanted.count(lang) > 1})
    if repeated:
        raise PipelineError(f"{dataset}: language code(s) repeated: {_quoted(repeated)}")
    unknown = [lang for lang in wanted if lang not in available]
    if unknown:
        raise PipelineError(f"{dataset}: unknown language code(s) {_quoted(unknown)} (available: {', '.join(available)})")
    return list(wanted)


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
        query_id=task.query_id[rows],
        query_paragraph=task.query_paragraph[rows],
        query_text=[task.query_text[i] for i in rows],
        answers=task.answers[rows],
    )


def settings_of(scores: TaskScores) -> dict[str, float]:
    summary = headline_figures(scores)
    return {key: summary[key] for key in SETTINGS}
