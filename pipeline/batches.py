"""The `batches` stage: plan which (group, query language, passage language) fills each training batch.

Hybrid batch training (Elmahdy, Lin & Ahmad, arXiv 2408.10536) makes a batch
monolingual with probability `sampler.ratio` (one language L for every query and
passage) and cross-lingual otherwise (each pair a query in X and its passage in
Y != X). `sampler.unit: pair` is the baseline that flips the coin per pair.

No batch holds two pairs of one group: translations of one question would be
false in-batch negatives. Groups are used evenly: each pool of eligible groups
(per language for monolingual batches, the multi-language groups for
cross-lingual ones) is walked in reshuffled passes instead of drawn with
replacement. Planning once, up front, makes training reproducible and lets
`dvc metrics diff` compare samplers without training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.common import (
    PipelineError,
    atomic_outputs,
    load_params,
    param,
    read_parquet,
    run_stage,
    stage_parser,
    write_json,
    write_parquet,
)
from pipeline.contracts import PAIRS_PATH, PAIRS_SCHEMA, PLAN_PATH, PLAN_SCHEMA, SAMPLER_PARAMS, pairs_stamp, plan_stamp


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


class _GroupCycle:
    """A pool's groups in reshuffled passes: every group once per pass, none twice in one take."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        self.order, self.pos = pool[:0], 0  # the first take starts a pass

    def take(self, n: int) -> np.ndarray:
        """The next n distinct groups (n <= pool size); O(n) except once per pass."""
        head = self.order[self.pos : self.pos + n]
        self.pos += len(head)
        if len(head) == n:
            return head
        fresh = self.rng.permutation(self.pool)
        # Groups just taken from the old pass wait for a later batch of the new one.
        fits = np.flatnonzero(~np.isin(fresh, head))[: n - len(head)]
        self.order, self.pos = np.delete(fresh, fits), 0
        return np.concatenate([head, fresh[fits]])


def _check_groups(langs: list[str], has: np.ndarray, ratio: float, unit: str, batch_size: int) -> None:
    """Every batch kind that can be drawn must find batch_size distinct eligible groups."""
    if not has.size:
        raise PipelineError("no groups to plan batches from")
    if ratio < 1 and len(langs) < 2:
        raise PipelineError(
            f"params.yaml: sampler.ratio: {ratio} asks for cross-lingual pairs, but the pairs have only one language ('{langs[0]}')"
        )
    pools: list[tuple[int, str]] = []
    if ratio < 1:
        pools.append((int((has.sum(axis=1) >= 2).sum()), "groups with two or more languages"))
    elif unit == "pair":
        pools.append((len(has), "groups"))
    if unit == "batch" and ratio > 0:
        pools += [(int(n), f"groups having language '{lang}'") for lang, n in zip(langs, has.sum(axis=0))]
    for available, what in pools:
        if batch_size > available:
            raise PipelineError(
                f"params.yaml: sampler.batch_size: {batch_size} is larger than the {available} {what} "
                f"(a batch needs {batch_size} distinct groups)"
            )


def plan_batches(groups: Mapping[str, Iterable[str]], ratio: float, unit: str, batch_size: int, steps: int, seed: int) -> pa.Table:
    """The batch plan (PLAN_SCHEMA, steps * batch_size rows), deterministic for `seed`.

    unit=batch: a batch is mono with probability `ratio`, its language uniform over
    all languages, its groups from that language's pool; otherwise cross, its groups
    from the multi-language pool. unit=pair: groups come from one pool (the
    multi-language groups when ratio < 1, since any pair may turn out cross) and each
    pair is mono with probability `ratio`, its language uniform over its group's.
    A cross pair's (query, passage) languages are uniform over its group's ordered pairs.
    """
    group_ids = sorted(groups)
    langs = sorted({lang for g in group_ids for lang in groups[g]})
    lang_index = {lang: i for i, lang in enumerate(langs)}
    has = np.zeros((len(group_ids), len(langs)), dtype=bool)
    for row, g in enumerate(group_ids):
        has[row, [lang_index[lang] for lang in groups[g]]] = True
    _check_groups(langs, has, ratio, unit, batch_size)

    rng = np.random.default_rng(seed)
    rows = steps * batch_size
    n_langs = has.sum(axis=1)
    multi = _GroupCycle(np.flatnonzero(n_langs >= 2), rng)
    group = np.empty(rows, dtype=np.int32)
    if unit == "batch":
        mono_batch = rng.random(steps) < ratio
        batch_lang = rng.integers(len(langs), size=steps)
        per_lang = [_GroupCycle(np.flatnonzero(has[:, i]), rng) for i in range(len(langs))]
        for b in range(steps):
            cycle = per_lang[batch_lang[b]] if mono_batch[b] else multi
            group[b * batch_size : (b + 1) * batch_size] = cycle.take(batch_size)
        mono = np.repeat(mono_batch, batch_size)
        query = np.repeat(batch_lang.astype(np.int16), batch_size)
    else:
        cycle = multi if ratio < 1 else _GroupCycle(np.arange(len(group_ids)), rng)
        for b in range(steps):
            group[b * batch_size : (b + 1) * batch_size] = cycle.take(batch_size)
        mono = rng.random(rows) < ratio
        query = np.zeros(rows, dtype=np.int16)
    # Row g of own_langs lists group g's language indices first (ascending), then the rest.
    own_langs = np.argsort(~has, axis=1, kind="stable").astype(np.int16)
    if unit == "pair":
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
        ],
        schema=PLAN_SCHEMA,
    )


def plan_summary(plan: pa.Table, n_groups: int) -> dict[str, float | int]:
    """Flat metrics for `dvc metrics diff`: batch kinds, mono share, pairs per language pair, epochs."""
    steps = pc.max(plan["batch"]).as_py() + 1
    mono = pc.equal(plan["kind"], "mono").to_numpy().reshape(steps, -1)
    metrics: dict[str, float | int] = {
        "batches.mono": int(mono.all(axis=1).sum()),
        "batches.cross": int((~mono).all(axis=1).sum()),
        "batches.mixed": int((mono.any(axis=1) & ~mono.all(axis=1)).sum()),
        "pairs_total": plan.num_rows,
        "mono_share": round(float(mono.mean()), 4),
        "groups": n_groups,
        "epochs": round(plan.num_rows / n_groups, 3),
    }
    counts = plan.group_by(["query_lang", "passage_lang"]).aggregate([("batch", "count")])
    for query, passage, n in zip(*(counts[c].to_pylist() for c in ("query_lang", "passage_lang", "batch_count"))):
        metrics[f"pairs.{query}-{passage}"] = n
    return metrics


def main() -> None:
    args = stage_parser(__doc__, out=str(PLAN_PATH), metrics="metrics/batches.json").parse_args()
    params = load_params(args.params)
    seed = param(params, "seed")
    sampler = {key: param(params, f"sampler.{key}") for key in SAMPLER_PARAMS}
    with atomic_outputs(args.out, args.metrics) as (plan_path, metrics_path):
        pairs = read_parquet(PAIRS_PATH, PAIRS_SCHEMA, made_by=pairs_stamp(param(params, "data.train")))
        groups = groups_from_pairs(pairs)
        plan = plan_batches(groups, seed=seed, **sampler)
        metrics = plan_summary(plan, len(groups))
        write_parquet(plan, plan_path, made_by=plan_stamp(seed, sampler))
        write_json(metrics, metrics_path)
    print(
        f"batches: {sampler['steps']} x {sampler['batch_size']} pairs ({sampler['unit']} unit, "
        f"{metrics['batches.mono']} mono / {metrics['batches.cross']} cross / {metrics['batches.mixed']} mixed "
        f"batches, mono share {metrics['mono_share']}) from {len(groups)} groups, "
        f"{metrics['epochs']} epochs -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
