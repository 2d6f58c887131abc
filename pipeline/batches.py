"""The `batches` stage: plan which (group, query language, passage language) fills each training batch.

Hybrid batch training (Elmahdy, Lin & Ahmad, arXiv 2408.10536; `sampler.schedule:
hybrid`) makes a batch monolingual with probability `sampler.ratio` (one language L for
every query and passage) and cross-lingual otherwise (each pair a query in X and its
passage in Y != X). The other schedules spend the same pair budget differently:
`sequential` trains round(ratio * steps) mono batches first (or last), `multitask` puts
mono rows and cross rows in every batch (train gives each its own loss), `pair` is the
baseline that flips the coin per pair. `sampler.negatives` adds a hard negative per pair:
another sentence of the answer's paragraph, or one the base model ranks highest (`mined`, `mined_query_language`:
the `mine` stage's table) (docs/strategies.md).

No batch holds two pairs of one group: translations of one question would be
false in-batch negatives. Groups are used evenly: each pool of eligible groups
(per language for monolingual batches, the multi-language groups for
cross-lingual ones) is walked in reshuffled passes instead of drawn with
replacement. Planning once, up front, makes training reproducible and lets
`dvc metrics diff` compare samplers without training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.common import (
    PipelineError,
    atomic_outputs,
    read_parquet,
    run_stage,
    stage_parser,
    write_json,
    write_parquet,
)
from pipeline.contracts import (
    CANDIDATES_SCHEMA,
    MINED_MODES,
    MINED_PATH,
    MINED_SCHEMA,
    PAIRS_PATH,
    PAIRS_SCHEMA,
    PARALLEL_CANDIDATES_PATH,
    PARALLEL_QUESTIONS_PATH,
    PLAN_PATH,
    PLAN_SCHEMA,
    QUERY_LANGUAGE_MODES,
    QUESTIONS_SCHEMA,
    mono_count,
    pairs_stamp,
)
from pipeline.params import Params, inert_note, inert_params, load_params, mined_made_by, plan_made_by
from pipeline.training.negatives import answer_positions

log = logging.getLogger(__name__)


def groups_from_pairs(pairs: pa.Table, origin: str | Path = PAIRS_PATH) -> dict[str, list[str]]:
    """Group id -> its languages, from the pairs table; `origin` names the file in errors."""
    if pairs.num_rows == 0:
        raise PipelineError(f"{origin}: no pairs")
    for column in ("group_id", "lang"):
        blank = pc.sum(pc.fill_null(pc.equal(pairs[column], ""), True)).as_py()
        if blank:
            raise PipelineError(f"{origin}: {blank} rows have an empty {column}")
    frame = pairs.select(["group_id", "lang"]).to_pandas()
    if frame.duplicated().any():
        group_id, lang = frame[frame.duplicated()].iloc[0]
        raise PipelineError(f"{origin}: group '{group_id}' has more than one '{lang}' pair")
    return frame.groupby("group_id", sort=True)["lang"].agg(list).to_dict()


def _below(rng: np.random.Generator, bound: np.ndarray) -> np.ndarray:
    """Uniform integers in [0, bound) per element; far faster than Generator.integers with array bounds."""
    return (rng.random(len(bound)) * bound).astype(np.int64)


NO_GROUPS = np.empty(0, dtype=np.int64)


def _first_occurrences(values: np.ndarray) -> np.ndarray:
    """True where a value appears for the first time in `values`."""
    first = np.zeros(len(values), dtype=bool)
    first[np.unique(values, return_index=True)[1]] = True
    return first


class _GroupCycle:
    """A pool's groups in reshuffled passes: every group once per pass, none twice in one take."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        self.order, self.pos = pool[:0], 0  # what is left of the pass; the first take starts one

    def take(self, n: int, avoid: np.ndarray = NO_GROUPS) -> np.ndarray:
        """The next n distinct groups, none of them in `avoid` (groups a batch already holds);
        O(n + len(avoid)) except once per pass."""
        head = self._next(n, avoid)
        if len(head) == n:
            return head
        # The pass is used up: the groups it passed over are owed first, then a fresh pass,
        # where the groups just taken wait for a later batch.
        owed = self.order[self.pos :]
        self.order, self.pos = np.concatenate([owed, self.rng.permutation(self.pool)]), 0
        rest = self._next(n - len(head), np.concatenate([avoid, head]))
        if len(head) + len(rest) < n:
            raise AssertionError(f"a pool of {len(self.pool)} groups cannot give {n} outside {len(avoid)} (unchecked plan)")
        return np.concatenate([head, rest])

    def _next(self, n: int, avoid: np.ndarray) -> np.ndarray:
        """Up to n distinct groups from the front of the pass, none in `avoid`; the ones passed
        over keep their place at the front, so every group still comes once per pass."""
        rest = self.order[self.pos :]
        size = n + len(avoid)
        while True:
            window = rest[:size]
            usable = ~np.isin(window, avoid)
            usable[usable] = _first_occurrences(window[usable])  # an owed group may also be in the fresh pass
            chosen = np.flatnonzero(usable)[:n]
            if len(chosen) == n or size >= len(rest):
                break
            size *= 2
        end = chosen[-1] + 1 if len(chosen) else 0
        if end == len(chosen):
            self.pos += end
        else:
            self.order, self.pos = np.concatenate([np.delete(rest[:end], chosen), rest[end:]]), 0
        return window[chosen]


def _kinds_drawn(ratio: float, schedule: str, batch_size: int, steps: int) -> tuple[bool, bool]:
    """(whether some row is monolingual, whether some row is cross-lingual) under these params."""
    if schedule == "sequential":
        mono = mono_count(ratio, steps)
        return mono > 0, mono < steps
    if schedule == "multitask":
        mono = mono_count(ratio, batch_size)
        return mono > 0, mono < batch_size
    return ratio > 0, ratio < 1


def _check_groups(langs: list[str], has: np.ndarray, ratio: float, schedule: str, batch_size: int, steps: int) -> None:
    """Every batch that can be drawn must find batch_size distinct eligible groups."""
    if not has.size:
        raise PipelineError("no groups to plan batches from")
    any_mono, any_cross = _kinds_drawn(ratio, schedule, batch_size, steps)
    if any_cross and len(langs) < 2:
        raise PipelineError(
            f"params.yaml: sampler.ratio: {ratio} asks for cross-lingual pairs, but the pairs have only one language ('{langs[0]}')"
        )
    multi = has.sum(axis=1) >= 2
    pools: list[tuple[int, int, str]] = []  # (rows drawn from the pool, groups in it, what it is)
    if schedule == "multitask":
        mono_rows = mono_count(ratio, batch_size)
        if any_cross and not any_mono:  # every row cross-lingual
            pools.append((batch_size, int(multi.sum()), "groups with two or more languages"))
        for i, lang in enumerate(langs if any_mono else []):
            pools.append((mono_rows, int(has[:, i].sum()), f"groups having language '{lang}'"))
            if any_cross:  # the cross rows come from the multi-language groups the mono rows left
                worst = int(multi.sum()) - min(mono_rows, int((has[:, i] & multi).sum()))
                pools.append((batch_size - mono_rows, worst, f"groups with two or more languages left beside {mono_rows} '{lang}' rows"))
    else:
        if any_cross:
            pools.append((batch_size, int(multi.sum()), "groups with two or more languages"))
        elif schedule == "pair":
            pools.append((batch_size, len(has), "groups"))
        if schedule != "pair" and any_mono:
            pools += [(batch_size, int(n), f"groups having language '{lang}'") for lang, n in zip(langs, has.sum(axis=0))]
    for needed, available, what in pools:
        if needed > available:
            rows = "" if needed == batch_size else f" ({needed} rows of a batch of {batch_size})"
            raise PipelineError(
                f"params.yaml: sampler.batch_size: {batch_size}{rows} is larger than the {available} {what} "
                f"(a batch needs {batch_size} distinct groups)"
            )


def _mono_rows(ratio: float, schedule: str, order: str, batch_size: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Which rows of each batch (steps x batch_size) are monolingual, for the batch schedules."""
    if schedule == "hybrid":
        mono_batch = rng.random(steps) < ratio
    elif schedule == "sequential":
        first = mono_count(ratio, steps) if order == "mono_first" else steps - mono_count(ratio, steps)
        mono_batch = (np.arange(steps) < first) == (order == "mono_first")
    else:  # multitask: the first rows of every batch
        return np.tile(np.arange(batch_size) < mono_count(ratio, batch_size), (steps, 1))
    return np.repeat(mono_batch[:, None], batch_size, axis=1)


def plan_batches(
    groups: Mapping[str, Iterable[str]], ratio: float, schedule: str, order: str, batch_size: int, steps: int, seed: int
) -> pa.Table:
    """The batch plan (PLAN_SCHEMA, steps * batch_size rows, no hard negatives), deterministic for `seed`.

    hybrid: a batch is mono with probability `ratio`; sequential: the first (mono_first)
    or last (cross_first) round(ratio * steps) batches are mono. A mono batch's language
    is uniform over all languages, its groups come from that language's pool; a cross
    batch's from the multi-language pool. multitask: every batch holds round(ratio *
    batch_size) mono rows (one language, drawn as a mono batch's) and then cross rows
    from the multi-language groups not already in it. pair: groups come from one pool
    (the multi-language groups when ratio < 1, since any pair may turn out cross) and each
    pair is mono with probability `ratio`, its language uniform over its group's.
    A cross pair's (query, passage) languages are uniform over its group's ordered pairs.

    What each batch holds for the loss (pipeline/training/loss.py), checked before any work:
    hybrid, sequential and pair batches are one task of batch_size >= 2 pairs, so each query
    has batch_size - 1 in-batch negatives; a multitask batch is two tasks scored apart, so
    each task present needs 2 rows or more (params.py's RULES refuse 1 mono or 1 cross row).
    No batch holds two pairs of one group (a translation of a query's own question is never
    its negative), so every pool must hold batch_size distinct groups (`_check_groups`).
    """
    group_ids = sorted(groups)
    langs = sorted({lang for g in group_ids for lang in groups[g]})
    lang_index = {lang: i for i, lang in enumerate(langs)}
    has = np.zeros((len(group_ids), len(langs)), dtype=bool)
    for row, g in enumerate(group_ids):
        has[row, [lang_index[lang] for lang in groups[g]]] = True
    _check_groups(langs, has, ratio, schedule, batch_size, steps)

    rng = np.random.default_rng(seed)
    rows = steps * batch_size
    n_langs = has.sum(axis=1)
    multi = _GroupCycle(np.flatnonzero(n_langs >= 2), rng)
    group = np.empty(rows, dtype=np.int32)
    if schedule == "pair":
        cycle = multi if ratio < 1 else _GroupCycle(np.arange(len(group_ids)), rng)
        for b in range(steps):
            group[b * batch_size : (b + 1) * batch_size] = cycle.take(batch_size)
        mono = rng.random(rows) < ratio
        query = np.zeros(rows, dtype=np.int16)
    else:
        mono_rows = _mono_rows(ratio, schedule, order, batch_size, steps, rng)
        batch_lang = rng.integers(len(langs), size=steps)
        per_lang = [_GroupCycle(np.flatnonzero(has[:, i]), rng) for i in range(len(langs))]
        for b in range(steps):
            n_mono = int(mono_rows[b].sum())
            mono_groups = per_lang[batch_lang[b]].take(n_mono) if n_mono else NO_GROUPS
            cross_groups = multi.take(batch_size - n_mono, mono_groups) if n_mono < batch_size else NO_GROUPS
            group[b * batch_size : (b + 1) * batch_size] = np.concatenate([mono_groups, cross_groups])
        mono = mono_rows.ravel()
        query = np.repeat(batch_lang.astype(np.int16), batch_size)
    # Row g of own_langs lists group g's language indices first (ascending), then the rest.
    own_langs = np.argsort(~has, axis=1, kind="stable").astype(np.int16)
    if schedule == "pair":
        g = group[mono]
        query[mono] = own_langs[g, _below(rng, n_langs[g])]
    passage = query.copy()
    cross = ~mono
    g = group[cross]
    first = _below(rng, n_langs[g])
    second = _below(rng, n_langs[g] - 1)
    second += second >= first
    query[cross], passage[cross] = own_langs[g, first], own_langs[g, second]

    lang_names = pa.array(langs, pa.string())
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat(np.arange(steps, dtype=np.int32), batch_size)),
            pa.array(group_ids, pa.string()).take(pa.array(group)),
            lang_names.take(pa.array(query)),
            lang_names.take(pa.array(passage)),
            pa.array(["cross", "mono"]).take(pa.array(mono.astype(np.int8))),
            pa.nulls(rows, pa.string()),
            pa.nulls(rows, pa.int32()),
        ],
        schema=PLAN_SCHEMA,
    )


NEGATIVES_STREAM = 1  # the negatives' own random stream: choosing them leaves the batches as they were


def plan_negatives(
    plan: pa.Table, questions: pa.Table, candidates: pa.Table, mode: str, seed: int, mined: pa.Table | None = None
) -> pa.Table:
    """The plan with one hard negative per row (PLAN_SCHEMA's negative_* columns), deterministic for `seed`.

    paragraph: another sentence of the answer's paragraph, in the passage's language;
    query_language: another sentence of the answer's paragraph in the query's language
    (the paragraph of that language's answer); mined: the best-ranked of the `mined` table's
    negatives (MINED_SCHEMA) of the row's question in the passage's language, which competes
    with the positive there (no draw: the seed leaves it as it is); mined_query_language: the
    same in the query's language, which competes as a query-language sibling does. A negative is never the
    answer sentence of its language, nor a text that is a positive anywhere in its batch (that
    query would be pushed away from its own answer); a row without such a sentence (a
    one-sentence paragraph, a question whose mined ones are all positives of its batch) gets
    none (null).
    """
    if mode == "none":
        return plan
    if mode in MINED_MODES and mined is None:
        raise ValueError(f"mode '{mode}' needs the mined table")
    cand = candidates.to_pandas().sort_values(["lang", "paragraph", "candidate"], kind="stable", ignore_index=True)
    in_paragraph = cand.groupby(["lang", "paragraph"], sort=False)
    start = np.arange(len(cand)) - in_paragraph.cumcount().to_numpy()
    length = in_paragraph["candidate"].transform("size").to_numpy()
    text = pd.factorize(cand["sentence"])[0]  # one id per distinct text: an equal text embeds equally
    position = pd.Series(cand.index, index=pd.MultiIndex.from_frame(cand[["lang", "candidate"]]))
    answer = answer_positions(questions.select(["group_id", "lang", "answer_candidate"]).to_pandas(), cand)

    def answers(langs: str) -> np.ndarray:
        """The position in `cand` of each row's answer sentence in the language of column `langs`."""
        found = answer.reindex(pd.MultiIndex.from_arrays([plan["group_id"].to_numpy(), plan[langs].to_numpy()]))
        if found.isna().any():
            group, lang = found.index[found.isna()][0]
            raise PipelineError(f"{PARALLEL_QUESTIONS_PATH}: group '{group}' has no '{lang}' question, but the plan has its pair")
        return found.to_numpy(dtype=np.int64)

    negative_langs = "query_lang" if mode in QUERY_LANGUAGE_MODES else "passage_lang"
    own, positive = answers(negative_langs), answers("passage_lang")
    steps = pc.max(plan["batch"]).as_py() + 1
    batch = plan["batch"].to_numpy().astype(np.int64)
    positive_texts = text[positive].reshape(steps, -1)
    in_batch = batch * (text.max() + 1)  # (batch, text) as one key
    if mode in MINED_MODES:
        negative = _best_mined(plan, mined, negative_langs, position, text, in_batch, in_batch + text[positive])
        return _with_negatives(plan, negative, cand["candidate"].to_numpy(), negative_langs)

    rng = np.random.default_rng([seed, NEGATIVES_STREAM])
    first, size = start[own], length[own]
    drawn = _below(rng, np.maximum(size - 1, 1))
    drawn += drawn >= own - first  # skip the answer itself
    negative = np.where(size >= 2, first + drawn, -1)
    clashes = (negative >= 0) & ((text[negative] == text[own]) | np.isin(in_batch + text[negative], in_batch + text[positive]))
    for row in np.flatnonzero(clashes):  # rare: redraw among the sentences that are allowed
        taken = {text[own[row]], *positive_texts[batch[row]]}
        allowed = [c for c in range(first[row], first[row] + size[row]) if text[c] not in taken]
        negative[row] = allowed[int(rng.random() * len(allowed))] if allowed else -1
    return _with_negatives(plan, negative, cand["candidate"].to_numpy(), negative_langs)


def _best_mined(
    plan: pa.Table,
    mined: pa.Table,
    negative_langs: str,
    position: pd.Series,
    text: np.ndarray,
    in_batch: np.ndarray,
    positive_keys: np.ndarray,
) -> np.ndarray:
    """Per plan row, the position (in the sorted candidates) of its best-ranked mined negative in the language
    of the plan's column `negative_langs` whose text is no positive of its batch (keys: in_batch + text), or -1."""
    m = mined.to_pandas()
    at = position.reindex(pd.MultiIndex.from_arrays([m["negative_lang"], m["negative_candidate"]]))
    if at.isna().any():
        lang, candidate = at.index[at.isna()][0]
        raise PipelineError(
            f"{MINED_PATH}: its '{lang}' candidate {candidate} is not in {PARALLEL_CANDIDATES_PATH} (stale output: run `dvc repro`)"
        )
    m["at"] = at.to_numpy(dtype=np.int64)
    rows = pd.DataFrame(
        {
            "row": np.arange(plan.num_rows),
            "group_id": plan["group_id"].to_numpy(),
            "query_lang": plan["query_lang"].to_numpy(),
            "negative_lang": plan[negative_langs].to_numpy(),
        }
    )
    offered = rows.merge(m[["group_id", "query_lang", "negative_lang", "rank", "at"]], on=["group_id", "query_lang", "negative_lang"])
    offered = offered[~np.isin(in_batch[offered["row"]] + text[offered["at"]], positive_keys)]
    best = offered.sort_values(["row", "rank"], kind="stable").drop_duplicates("row")
    negative = np.full(plan.num_rows, -1, dtype=np.int64)
    negative[best["row"].to_numpy()] = best["at"].to_numpy()
    return negative


def _with_negatives(plan: pa.Table, negative: np.ndarray, candidate_ids: np.ndarray, negative_langs: str) -> pa.Table:
    """The plan's negative_* columns set from `negative` (positions into the sorted candidates, -1 = none)."""
    chosen = negative >= 0
    columns = {
        "negative_lang": pa.array(np.where(chosen, plan[negative_langs].to_numpy(), None), pa.string()),
        "negative_candidate": pa.array(candidate_ids[negative], pa.int32(), mask=~chosen),
    }
    for name, column in columns.items():
        plan = plan.set_column(plan.schema.get_field_index(name), PLAN_SCHEMA.field(name), column)
    return plan


def plan_summary(plan: pa.Table, n_groups: int, negatives: str = "none") -> dict[str, float | int]:
    """Flat metrics for `dvc metrics diff`: batch kinds, mono share, pairs per language pair, epochs,
    hard negatives planned and skipped (rows left without one)."""
    steps = pc.max(plan["batch"]).as_py() + 1
    mono = pc.equal(plan["kind"], "mono").to_numpy().reshape(steps, -1)
    planned = plan.num_rows - plan["negative_candidate"].null_count
    metrics: dict[str, float | int] = {
        "batches.mono": int(mono.all(axis=1).sum()),
        "batches.cross": int((~mono).all(axis=1).sum()),
        "batches.mixed": int((mono.any(axis=1) & ~mono.all(axis=1)).sum()),
        "pairs_total": plan.num_rows,
        "mono_share": round(float(mono.mean()), 4),
        "groups": n_groups,
        "epochs": round(plan.num_rows / n_groups, 3),
        "negatives.planned": planned,
        "negatives.skipped": 0 if negatives == "none" else plan.num_rows - planned,
    }
    counts = plan.group_by(["query_lang", "passage_lang"]).aggregate([("batch", "count")])
    for query, passage, n in zip(*(counts[c].to_pylist() for c in ("query_lang", "passage_lang", "batch_count"))):
        metrics[f"pairs.{query}-{passage}"] = n
    return metrics


def negatives_note(mode: str, metrics: dict) -> str:
    """What the stage's line says of hard negatives: how many, or why there are none although asked for."""
    if mode == "none":
        return ""
    if not metrics["negatives.planned"] and mode in MINED_MODES:
        return f", no mined hard negatives: {MINED_PATH} offers none but positives of their batches"
    if not metrics["negatives.planned"]:
        return (
            f", no {mode} hard negatives: no answer has another sentence in its paragraph "
            f"(data of your own gives them in a `negative` column, docs/own-data.md)"
        )
    return f", {metrics['negatives.planned']} {mode} hard negatives ({metrics['negatives.skipped']} rows without)"


def plan_from_params(params: Params) -> tuple[pa.Table, dict, int]:
    """The plan `params` asks for, from the parallel data on disk: (plan, its summary, groups).
    Shared by the stage and benchmarks/in_process_grid.py, so both train on the same batches."""
    sampler = params.sampler
    made_by = pairs_stamp(params.data.train, params.data.dev_share)
    groups = groups_from_pairs(read_parquet(PAIRS_PATH, PAIRS_SCHEMA, made_by=made_by))
    plan = plan_batches(groups, sampler.ratio, sampler.schedule, sampler.order, sampler.batch_size, sampler.steps, params.seed)
    if sampler.negatives != "none":
        questions = read_parquet(PARALLEL_QUESTIONS_PATH, QUESTIONS_SCHEMA, made_by=made_by)
        candidates = read_parquet(PARALLEL_CANDIDATES_PATH, CANDIDATES_SCHEMA, made_by=made_by)
        mined = read_parquet(MINED_PATH, MINED_SCHEMA, made_by=mined_made_by(params)) if sampler.negatives in MINED_MODES else None
        plan = plan_negatives(plan, questions, candidates, sampler.negatives, params.seed, mined)
    return plan, plan_summary(plan, len(groups), sampler.negatives), len(groups)


def main() -> None:
    args = stage_parser(__doc__, out=str(PLAN_PATH), metrics="metrics/batches.json").parse_args()
    params = load_params(args.params)
    sampler = params.sampler
    with atomic_outputs(args.out, args.metrics) as (plan_path, metrics_path):
        plan, metrics, n_groups = plan_from_params(params)
        write_parquet(plan, plan_path, made_by=plan_made_by(params))
        write_json(metrics, metrics_path)
    ignored = {name: why for name, why in inert_params(params).items() if name.startswith("sampler.")}
    if ignored:
        log.info(f"batches: no effect on the plan, left out of its stamp: {inert_note(ignored)}")
    log.info(
        f"batches: {sampler.steps} x {sampler.batch_size} pairs ({sampler.schedule} schedule, "
        f"{metrics['batches.mono']} mono / {metrics['batches.cross']} cross / {metrics['batches.mixed']} mixed "
        f"batches, mono share {metrics['mono_share']}{negatives_note(sampler.negatives, metrics)}) from {n_groups} groups, "
        f"{metrics['epochs']} epochs -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
