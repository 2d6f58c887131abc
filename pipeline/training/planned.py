"""The batch plan as training reads it: each planned batch's query, passage and hard-negative texts.

A plan row names a group and languages; `plan_texts` turns rows into the texts the model
embeds, with the model's prefixes, and perturbs a seeded share of the queries where
`train.query_noise` asks (the robustness report's perturbations, pipeline/scoring/noise.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.common import PipelineError
from pipeline.contracts import PAIRS_PATH, PARALLEL_CANDIDATES_PATH, PLAN_PATH
from pipeline.scoring.noise import Noise, perturb
from pipeline.training.distributed import World

QUERY_NOISE_STREAM = 2  # the noisy queries' own random stream from `seed` (batches uses 0 and 1)


@dataclass(frozen=True)
class PlannedBatch:
    """One planned batch as training reads it: row i is query i and its positive passage i, and
    where the plan gives one, hard negative i. Every list has one entry per row."""

    queries: list[str]
    passages: list[str]
    negatives: list[str | None] | None = None  # None: the plan has no hard negatives
    tasks: list[str] | None = None  # multitask: each row's task (the plan's kind), scored apart; None: one task
    query_langs: list[str] | None = None  # the language adversary's labels
    passage_langs: list[str] | None = None
    negative_langs: list[str | None] | None = None

    def share(self, world: World) -> PlannedBatch:
        """This rank's rows."""
        return PlannedBatch(*(None if rows is None else world.share(rows) for rows in self._lists()))

    def negative_texts(self) -> list[str]:
        return [text for text in self.negatives or [] if text is not None]

    def negatives_per_rank(self, world: World) -> list[int]:
        """How many hard negatives each rank embeds (ranks' shares differ where rows have none)."""
        return [len(self.share(World(rank, world.size)).negative_texts()) for rank in range(world.size)]

    def column_tasks(self) -> list[str] | None:
        """The task of every passage a query is scored against: the positives, then the hard negatives, in row order."""
        if self.tasks is None:
            return None
        return self.tasks + [task for task, text in zip(self.tasks, self.negatives or []) if text is not None]

    def languages(self) -> list[str]:
        """The language of every text this batch embeds, in the order of queries, passages, negatives."""
        return [*self.query_langs, *self.passage_langs, *(lang for lang in self.negative_langs or [] if lang is not None)]

    def _lists(self) -> tuple:
        return (self.queries, self.passages, self.negatives, self.tasks, self.query_langs, self.passage_langs, self.negative_langs)


def query_noise_draws(rows: int, noises: Sequence[Noise], rate: float, seed: int) -> list[tuple[Noise, int] | None]:
    """Per plan row: the noise its query gets and the seed of its typos, or None (a share `rate`
    of rows, deterministic for `seed`). Each row has its own typo seed, so a question seen
    in several epochs is not misspelt the same way every time."""
    if not noises or rate == 0:
        return [None] * rows
    rng = np.random.default_rng([seed, QUERY_NOISE_STREAM])
    picked, which, typo_seeds = rng.random(rows) < rate, rng.integers(len(noises), size=rows), rng.integers(2**32, size=rows)
    return [(noises[w], int(s)) if p else None for p, w, s in zip(picked, which, typo_seeds)]


def has_negatives(plan: pa.Table) -> bool:
    """Whether the plan names a hard negative for any row (sampler.negatives was not none)."""
    return plan["negative_candidate"].null_count < plan.num_rows


def plan_texts(
    plan: pa.Table,
    pairs: pa.Table,
    query_prefix: str,
    passage_prefix: str,
    candidates: pa.Table | None = None,
    multitask: bool = False,
    noise: Sequence[tuple[Noise, int] | None] | None = None,
) -> list[PlannedBatch]:
    """Every planned batch's texts, in plan order, with the model's prefixes: queries (perturbed
    where `noise` says, before the prefix), passages, and hard negatives from `candidates`."""
    columns = (pairs[c].to_pylist() for c in ("group_id", "lang", "question", "passage"))
    texts = {(g, lang): (q, p) for g, lang, q, p in zip(*columns)}
    sentences = {}
    if candidates is not None:
        keys = zip(candidates["lang"].to_pylist(), candidates["candidate"].to_pylist())
        sentences = dict(zip(keys, candidates["sentence"].to_pylist()))
    names = ("batch", "group_id", "query_lang", "passage_lang", "kind", "negative_lang", "negative_candidate")
    batch, group, query_lang, passage_lang, kind, negative_lang, negative = (plan[name].to_pylist() for name in names)
    queries, passages, negatives = [], [], []
    for i, (g, ql, pl, nl, nc) in enumerate(zip(group, query_lang, passage_lang, negative_lang, negative)):
        for lang in (ql, pl):
            if (g, lang) not in texts:
                raise PipelineError(f"{PLAN_PATH}: group {g} has no pair in language '{lang}' in {PAIRS_PATH}")
        if nc is not None and (nl, nc) not in sentences:
            raise PipelineError(f"{PLAN_PATH}: hard negative {nc} of language '{nl}' is not in {PARALLEL_CANDIDATES_PATH}")
        question = texts[(g, ql)][0]
        if noise is not None and noise[i] is not None:
            question = perturb(question, *noise[i])
        queries.append(query_prefix + question)
        passages.append(passage_prefix + texts[(g, pl)][1])
        negatives.append(None if nc is None else passage_prefix + sentences[(nl, nc)])
    rows_of: dict[int, list[int]] = {}
    for i, b in enumerate(batch):
        rows_of.setdefault(b, []).append(i)
    keep_negatives = has_negatives(plan)

    def pick(values: list, rows: list[int], keep: bool = True) -> list | None:
        return [values[i] for i in rows] if keep else None

    return [
        PlannedBatch(
            queries=pick(queries, rows),
            passages=pick(passages, rows),
            negatives=pick(negatives, rows, keep_negatives),
            tasks=pick(kind, rows, multitask),
            query_langs=pick(query_lang, rows),
            passage_langs=pick(passage_lang, rows),
            negative_langs=pick(negative_lang, rows, keep_negatives),
        )
        for _, rows in sorted(rows_of.items())
    ]
