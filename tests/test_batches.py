"""Tests of the `batches` stage: the batch planner's guarantees, its metrics, and its errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline import batches
from pipeline.batches import groups_from_pairs, plan_batches, plan_negatives, plan_summary
from pipeline.common import PipelineError, write_parquet
from pipeline.contracts import CANDIDATES_SCHEMA, PAIRS_SCHEMA, PLAN_SCHEMA, QUESTIONS_SCHEMA, pairs_stamp
from tests.helpers import write_params

REPO = Path(__file__).parents[1]
LANGS = ["ar", "de", "en", "es", "hi"]
few_examples = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def full_groups(n: int, langs: list[str] = LANGS, prefix: str = "q") -> dict[str, list[str]]:
    """n groups, each in every one of `langs`."""
    return {f"{prefix}{i:03d}": list(langs) for i in range(n)}


def rows(plan: pa.Table) -> list[dict]:
    return plan.to_pylist()


def by_batch(plan: pa.Table) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in rows(plan):
        out.setdefault(row["batch"], []).append(row)
    return out


def pairs_table(groups: dict[str, list[str]]) -> pa.Table:
    data = [(g, lang, f"question {g} {lang}", f"passage {g} {lang}") for g, langs in groups.items() for lang in langs]
    return pa.Table.from_pylist([dict(zip(PAIRS_SCHEMA.names, row)) for row in data], schema=PAIRS_SCHEMA)


def corpus(groups: dict[str, list[str]], sentences: int = 3, per_paragraph: int = 2) -> tuple[pa.Table, pa.Table]:
    """Questions and candidates for `groups`: in each language, `per_paragraph` groups share a
    paragraph of `sentences` sentences, answered by its first sentences in turn."""
    questions, candidates = [], []
    for lang in sorted({lang for ls in groups.values() for lang in ls}):
        having = [g for g in sorted(groups) if lang in groups[g]]
        for p, start in enumerate(range(0, len(having), per_paragraph)):
            first = len(candidates) - sum(c["lang"] != lang for c in candidates)
            candidates += [
                {"lang": lang, "candidate": first + i, "paragraph": p, "sentence_index": i, "sentence": f"{lang} p{p} s{i}"}
                for i in range(sentences)
            ]
            questions += [
                {
                    "group_id": g,
                    "lang": lang,
                    "question": f"{g} {lang}?",
                    "answer_candidate": first + i % sentences,
                    "article": "a0",
                    "paragraph": f"{lang}:{p}",
                }
                for i, g in enumerate(having[start : start + per_paragraph])
            ]
    return pa.Table.from_pylist(questions, schema=QUESTIONS_SCHEMA), pa.Table.from_pylist(candidates, schema=CANDIDATES_SCHEMA)


def fits(groups: dict[str, list[str]], ratio: float, schedule: str, batch_size: int, steps: int) -> bool:
    """Whether every batch the params can draw finds batch_size distinct eligible groups, worked out
    here from the groups (not with the planner's own check)."""
    langs = sorted({lang for ls in groups.values() for lang in ls})
    multi = {g for g, ls in groups.items() if len(set(ls)) >= 2}
    having = {lang: {g for g, ls in groups.items() if lang in ls} for lang in langs}
    if schedule == "multitask":
        mono, cross = round(ratio * batch_size), batch_size - round(ratio * batch_size)
        mono_ok = mono == 0 or all(len(having[lang]) >= mono for lang in langs)
        # the cross rows must fit beside any mono rows the batch drew first
        cross_ok = cross == 0 or (len(langs) >= 2 and all(len(multi) - min(mono, len(having[lang] & multi)) >= cross for lang in langs))
        return mono_ok and cross_ok
    if schedule == "sequential":
        mono, cross = round(ratio * steps) > 0, round(ratio * steps) < steps
    else:
        mono, cross = ratio > 0, ratio < 1
    if cross and (len(langs) < 2 or len(multi) < batch_size):
        return False
    if schedule == "pair":
        return cross or len(groups) >= batch_size
    return not mono or all(len(having[lang]) >= batch_size for lang in langs)


group_collections = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=4),
    st.lists(st.sampled_from(LANGS), min_size=1, max_size=len(LANGS), unique=True),
    min_size=1,
    max_size=30,
)
SCHEDULES = ["hybrid", "sequential", "multitask", "pair"]


# --- properties over random group collections ---------------------------------------


def feasible_batch_size(groups, ratio, schedule, steps, data) -> int:
    sizes = [size for size in range(1, len(groups) + 1) if fits(groups, ratio, schedule, size, steps)]
    assume(sizes)
    return data.draw(st.sampled_from(sizes))


@few_examples
@given(
    groups=group_collections,
    ratio=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    schedule=st.sampled_from(SCHEDULES),
    order=st.sampled_from(["mono_first", "cross_first"]),
    steps=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_plan_invariants(groups, ratio, schedule, order, steps, seed, data):
    batch_size = feasible_batch_size(groups, ratio, schedule, steps, data)
    plan = plan_batches(groups, ratio, schedule, order, batch_size, steps, seed)

    assert plan.schema.equals(PLAN_SCHEMA)
    assert plan.num_rows == steps * batch_size
    assert plan["batch"].to_pylist() == [b for b in range(steps) for _ in range(batch_size)]
    assert plan["negative_lang"].null_count == plan["negative_candidate"].null_count == plan.num_rows
    for batch in by_batch(plan).values():
        assert len({row["group_id"] for row in batch}) == batch_size  # no group twice in a batch
        for row in batch:
            assert row["query_lang"] in groups[row["group_id"]]
            assert row["passage_lang"] in groups[row["group_id"]]
            assert (row["kind"] == "mono") == (row["query_lang"] == row["passage_lang"])
        if schedule in ("hybrid", "sequential"):
            assert len({row["kind"] for row in batch}) == 1
        if schedule != "pair":  # one language for the mono rows of a batch
            assert len({row["query_lang"] for row in batch if row["kind"] == "mono"}) <= 1
    kinds = set(plan["kind"].to_pylist())
    if ratio == 1:
        assert kinds == {"mono"}
    if ratio == 0:
        assert kinds == {"cross"}


@few_examples
@given(
    groups=group_collections,
    ratio=st.floats(0, 1),
    order=st.sampled_from(["mono_first", "cross_first"]),
    steps=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_sequential_trains_round_ratio_steps_mono_batches_first_or_last(groups, ratio, order, steps, seed, data):
    batch_size = feasible_batch_size(groups, ratio, "sequential", steps, data)
    plan = plan_batches(groups, ratio, "sequential", order, batch_size, steps, seed)
    mono_batches = [batch[0]["kind"] == "mono" for batch in by_batch(plan).values()]
    n_mono = round(ratio * steps)
    expected = [True] * n_mono + [False] * (steps - n_mono)
    assert mono_batches == (expected if order == "mono_first" else expected[::-1])


@few_examples
@given(groups=group_collections, ratio=st.floats(0, 1), steps=st.integers(1, 40), seed=st.integers(0, 2**32), data=st.data())
def test_multitask_batches_hold_both_tasks_in_fixed_counts(groups, ratio, steps, seed, data):
    batch_size = feasible_batch_size(groups, ratio, "multitask", steps, data)
    plan = plan_batches(groups, ratio, "multitask", "mono_first", batch_size, steps, seed)
    n_mono = round(ratio * batch_size)
    for batch in by_batch(plan).values():
        assert [row["kind"] for row in batch] == ["mono"] * n_mono + ["cross"] * (batch_size - n_mono)
        assert len({row["query_lang"] for row in batch[:n_mono]}) <= 1


@few_examples
@given(
    groups=group_collections,
    ratio=st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0]),
    schedule=st.sampled_from(SCHEDULES),
    batch_size=st.integers(1, 12),
    steps=st.integers(1, 12),
)
def test_the_planner_refuses_exactly_the_groups_that_cannot_fill_a_batch(groups, ratio, schedule, batch_size, steps):
    if fits(groups, ratio, schedule, batch_size, steps):
        assert plan_batches(groups, ratio, schedule, "mono_first", batch_size, steps, 0).num_rows == batch_size * steps
    else:
        with pytest.raises(PipelineError, match=r"^params.yaml: sampler\.(batch_size|ratio): "):
            plan_batches(groups, ratio, schedule, "mono_first", batch_size, steps, 0)


@few_examples
@given(n_groups=st.integers(1, 40), batch_size=st.integers(1, 40), steps=st.integers(1, 60), seed=st.integers(0, 999))
def test_groups_used_evenly_in_one_language(n_groups, batch_size, steps, seed):
    assume(batch_size <= n_groups)
    plan = plan_batches(full_groups(n_groups, ["en"]), 1.0, "hybrid", "mono_first", batch_size, steps, seed)
    counts = Counter(plan["group_id"].to_pylist())
    uses = [counts[g] for g in full_groups(n_groups)]
    assert max(uses) - min(uses) <= 1
    if steps * batch_size % n_groups == 0:
        assert set(uses) == {steps * batch_size // n_groups}


@pytest.mark.parametrize("schedule", ["hybrid", "sequential", "multitask", "pair"])
def test_cross_pool_used_evenly(schedule):
    groups = {**full_groups(13), "solo": ["en"]}  # a one-language group cannot be cross
    plan = plan_batches(groups, 0.0, schedule, "mono_first", 5, 26, seed=3)  # 130 pairs = 10 passes over 13 groups
    assert Counter(plan["group_id"].to_pylist()) == {g: 10 for g in full_groups(13)}


@pytest.mark.parametrize("schedule", ["sequential", "multitask"])
def test_new_schedules_use_each_pool_evenly(schedule):
    """Each language's pool and the cross pool are walked in passes. multitask's cross rows skip
    the groups its mono rows hold, which are owed a use: its cross counts differ by up to two."""
    groups = full_groups(30, ["de", "en"])
    plan = rows(plan_batches(groups, 0.5, schedule, "mono_first", 8, 80, seed=4))  # 320 rows of each kind
    pools = {("mono", "de"): Counter(), ("mono", "en"): Counter(), ("cross", None): Counter()}
    for r in plan:
        pools[(r["kind"], r["query_lang"] if r["kind"] == "mono" else None)][r["group_id"]] += 1
    assert sum(map(sum, (pool.values() for pool in pools.values()))) == 640
    for (kind, _), uses in pools.items():
        counts = [uses[g] for g in groups]
        assert max(counts) - min(counts) <= (2 if schedule == "multitask" and kind == "cross" else 1)


def test_batch_as_large_as_the_pool_is_a_permutation_every_time():
    plan = plan_batches(full_groups(7), 0.5, "hybrid", "mono_first", 7, 50, seed=1)
    for batch in by_batch(plan).values():
        assert sorted(row["group_id"] for row in batch) == sorted(full_groups(7))


# --- hard negatives -----------------------------------------------------------------


@st.composite
def paragraphs(draw, groups: dict[str, list[str]]) -> tuple[pa.Table, pa.Table]:
    """Questions and candidates for `groups`: per language, the groups' answers spread over
    paragraphs of 1-5 sentences; some paragraphs repeat a sentence's text."""
    questions, candidates = [], []
    for lang in sorted({lang for ls in groups.values() for lang in ls}):
        having = draw(st.permutations(sorted(g for g in groups if lang in groups[g])))
        paragraph, n_candidates, position = 0, 0, 0
        while position < len(having):
            members = having[position : position + draw(st.integers(1, 3))]
            position += len(members)
            size = draw(st.integers(1, 5))
            texts = [f"{lang} p{paragraph} s{i}" for i in range(size)]
            if size > 2 and draw(st.booleans()):
                texts[2] = texts[0]  # the same text twice: it embeds the same, so it is the answer too
            candidates += [
                {"lang": lang, "candidate": n_candidates + i, "paragraph": paragraph, "sentence_index": i, "sentence": text}
                for i, text in enumerate(texts)
            ]
            questions += [
                {
                    "group_id": g,
                    "lang": lang,
                    "question": f"{g}?",
                    "answer_candidate": n_candidates + draw(st.integers(0, size - 1)),
                    "article": "a0",
                    "paragraph": f"{lang}:{paragraph}",
                }
                for g in members
            ]
            paragraph, n_candidates = paragraph + 1, n_candidates + size
    return pa.Table.from_pylist(questions, schema=QUESTIONS_SCHEMA), pa.Table.from_pylist(candidates, schema=CANDIDATES_SCHEMA)


@few_examples
@given(
    groups=group_collections,
    ratio=st.sampled_from([0.0, 0.5, 1.0]),
    schedule=st.sampled_from(SCHEDULES),
    mode=st.sampled_from(["paragraph", "query_language"]),
    steps=st.integers(1, 10),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_every_negative_is_another_sentence_of_the_answers_paragraph(groups, ratio, schedule, mode, steps, seed, data):
    batch_size = feasible_batch_size(groups, ratio, schedule, steps, data)
    questions, candidates = data.draw(paragraphs(groups))
    plan = plan_batches(groups, ratio, schedule, "mono_first", batch_size, steps, seed)
    with_negatives = plan_negatives(plan, questions, candidates, mode, seed)

    assert with_negatives.schema.equals(PLAN_SCHEMA)
    assert with_negatives.drop_columns(["negative_lang", "negative_candidate"]).equals(
        plan.drop_columns(["negative_lang", "negative_candidate"])
    )  # the batches stay as planned
    answer = {(q["group_id"], q["lang"]): q["answer_candidate"] for q in questions.to_pylist()}
    sentence = {(c["lang"], c["candidate"]): c for c in candidates.to_pylist()}
    for batch in by_batch(with_negatives).values():
        positives = {sentence[(r["passage_lang"], answer[(r["group_id"], r["passage_lang"])])]["sentence"] for r in batch}
        for row in batch:
            lang = row["passage_lang"] if mode == "paragraph" else row["query_lang"]
            own = sentence[(lang, answer[(row["group_id"], lang)])]
            allowed = {
                c["candidate"]
                for c in sentence.values()
                if (c["lang"], c["paragraph"]) == (lang, own["paragraph"]) and c["sentence"] not in positives | {own["sentence"]}
            }
            if not allowed:  # e.g. a one-sentence paragraph
                assert row["negative_lang"] is None and row["negative_candidate"] is None
                continue
            assert row["negative_lang"] == lang  # the passage's language, or the query's
            assert row["negative_candidate"] in allowed  # its paragraph; not the answer; no positive of the batch
    skipped = with_negatives["negative_candidate"].null_count
    assert plan_summary(with_negatives, len(groups), mode)["negatives.skipped"] == skipped
    assert plan_negatives(plan, questions, candidates, mode, seed).equals(with_negatives)


def test_negatives_in_the_query_language_come_from_that_languages_paragraph():
    groups = full_groups(8, ["de", "en"])
    questions, candidates = corpus(groups, sentences=4)
    plan = plan_batches(groups, 0.0, "hybrid", "mono_first", 4, 10, seed=1)
    for mode in ("paragraph", "query_language"):
        rows_ = rows(plan_negatives(plan, questions, candidates, mode, seed=1))
        assert all(r["negative_lang"] == r["passage_lang" if mode == "paragraph" else "query_lang"] for r in rows_)
        assert all(r["negative_lang"] != r["query_lang" if mode == "paragraph" else "passage_lang"] for r in rows_)  # all cross


def test_one_sentence_paragraphs_get_no_negative_and_are_counted():
    groups = full_groups(8, ["de", "en"])
    questions, candidates = corpus(groups, sentences=1)
    plan = plan_negatives(plan_batches(groups, 0.5, "hybrid", "mono_first", 4, 5, 0), questions, candidates, "paragraph", 0)
    assert plan["negative_candidate"].null_count == plan.num_rows
    metrics = plan_summary(plan, 8, "paragraph")
    assert metrics["negatives.planned"] == 0 and metrics["negatives.skipped"] == 20


def test_a_plan_group_without_a_question_is_named():
    groups = full_groups(8, ["de", "en"])
    questions, candidates = corpus(groups)
    plan = plan_batches(groups, 0.5, "hybrid", "mono_first", 4, 5, 0)
    without = questions.filter(pa.compute.not_equal(questions["group_id"], plan["group_id"][0]))
    with pytest.raises(
        PipelineError, match=r"^data/parallel/questions.parquet: group 'q\d+' has no '(de|en)' question, but the plan has its pair$"
    ):
        plan_negatives(plan, without, candidates, "paragraph", 0)


# --- distributions ------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_share_of_mono_batches_is_close_to_ratio(ratio):
    steps = 2000
    plan = plan_batches(full_groups(20), ratio, "hybrid", "mono_first", 4, steps, seed=7)
    metrics = plan_summary(plan, 20)
    assert metrics["batches.mono"] + metrics["batches.cross"] == steps
    assert metrics["batches.mixed"] == 0
    standard_error = (ratio * (1 - ratio) / steps) ** 0.5
    assert abs(metrics["batches.mono"] / steps - ratio) < 4 * standard_error


def test_mono_batch_languages_and_cross_language_pairs_are_uniform():
    steps = 3000
    plan = plan_batches(full_groups(10, ["de", "en", "zh"]), 0.5, "hybrid", "mono_first", 2, steps, seed=11)
    batch_langs = Counter(batch[0]["query_lang"] for batch in by_batch(plan).values() if batch[0]["kind"] == "mono")
    assert set(batch_langs) == {"de", "en", "zh"}
    n_mono = sum(batch_langs.values())
    assert all(abs(n / n_mono - 1 / 3) < 0.05 for n in batch_langs.values())
    cross = Counter((r["query_lang"], r["passage_lang"]) for r in rows(plan) if r["kind"] == "cross")
    assert len(cross) == 6  # every ordered pair of distinct languages
    n_cross = sum(cross.values())
    assert all(abs(n / n_cross - 1 / 6) < 0.03 for n in cross.values())


def test_cross_pairs_only_use_a_groups_own_languages():
    groups = {f"a{i}": ["de", "en"] for i in range(4)} | {f"b{i}": ["es", "hi"] for i in range(4)}
    plan = plan_batches(groups, 0.0, "hybrid", "mono_first", 8, 50, seed=0)
    pairs = {(r["query_lang"], r["passage_lang"]) for r in rows(plan)}
    assert pairs == {("de", "en"), ("en", "de"), ("es", "hi"), ("hi", "es")}


def test_pair_schedule_mixes_kinds_within_batches():
    plan = plan_batches(full_groups(40), 0.5, "pair", "mono_first", 16, 200, seed=5)
    metrics = plan_summary(plan, 40)
    assert metrics["batches.mixed"] > 190
    assert abs(metrics["mono_share"] - 0.5) < 4 * (0.25 / plan.num_rows) ** 0.5
    mono_langs = Counter(r["query_lang"] for r in rows(plan) if r["kind"] == "mono")
    assert set(mono_langs) == set(LANGS)


def test_pair_schedule_with_ratio_one_may_use_single_language_groups():
    groups = {f"q{i}": [LANGS[i % 5]] for i in range(10)}
    plan = plan_batches(groups, 1.0, "pair", "mono_first", 10, 3, seed=0)
    assert set(plan["kind"].to_pylist()) == {"mono"}
    assert all(r["query_lang"] == groups[r["group_id"]][0] for r in rows(plan))


# --- determinism and speed ----------------------------------------------------------


def test_same_seed_same_plan_different_seed_different_plan(tmp_path):
    groups = full_groups(30)
    first, second = (plan_batches(groups, 0.5, "hybrid", "mono_first", 8, 40, seed=42) for _ in range(2))
    assert first.equals(second)
    made_by = {"seed": 42, "sampler": {"ratio": 0.5}}
    write_parquet(first, tmp_path / "a.parquet", made_by=made_by)
    write_parquet(second, tmp_path / "b.parquet", made_by=made_by)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert not plan_batches(groups, 0.5, "hybrid", "mono_first", 8, 40, seed=43).equals(first)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("negatives", ["none", "paragraph", "query_language"])
def test_every_schedule_and_negatives_mode_is_deterministic_per_seed(schedule, negatives):
    groups = full_groups(30, ["de", "en", "es"])
    questions, candidates = corpus(groups, sentences=3)

    def plan(seed: int) -> pa.Table:
        return plan_negatives(plan_batches(groups, 0.5, schedule, "cross_first", 8, 20, seed), questions, candidates, negatives, seed)

    assert plan(42).equals(plan(42))
    assert not plan(43).equals(plan(42))


@pytest.mark.parametrize(
    "schedule, ratio, digest",
    [("hybrid", 0.3, "479f16f07ea476df"), ("hybrid", 1.0, "98848889c167bb44"), ("pair", 0.5, "b6afa17c3f1f7c79")],
)
def test_hybrid_and_pair_plan_the_batches_sampler_unit_planned(schedule, ratio, digest):
    """The digests of plans made by `sampler.unit: batch | pair` before the schedules existed: a seed's plan stays."""
    groups = {f"q{i:03d}": LANGS[: 2 + i % 4] for i in range(60)} | {"solo": ["en"], "solo2": ["de"]}
    plan = plan_batches(groups, ratio, schedule, "mono_first", 8, 50, 42).select(
        ["batch", "group_id", "query_lang", "passage_lang", "kind"]
    )
    assert hashlib.sha256(str(plan.to_pydict()).encode()).hexdigest()[:16] == digest


def test_plan_ignores_the_order_of_groups_and_languages():
    groups = {"b": ["en", "de"], "a": ["de", "en", "es"], "c": ["es", "de"]}
    shuffled = {g: list(reversed(groups[g])) for g in reversed(list(groups))}
    assert plan_batches(groups, 0.5, "hybrid", "mono_first", 2, 30, 1).equals(plan_batches(shuffled, 0.5, "hybrid", "mono_first", 2, 30, 1))


# --- metrics ------------------------------------------------------------------------


NO_NEGATIVE = {"negative_lang": None, "negative_candidate": None}


def test_summarize_counts_kinds_and_language_pairs():
    plan = pa.Table.from_pylist(
        [
            {"batch": 0, "group_id": "a", "query_lang": "en", "passage_lang": "en", "kind": "mono", **NO_NEGATIVE},
            {"batch": 0, "group_id": "b", "query_lang": "en", "passage_lang": "en", "kind": "mono", **NO_NEGATIVE},
            {"batch": 1, "group_id": "a", "query_lang": "en", "passage_lang": "de", "kind": "cross", **NO_NEGATIVE},
            {"batch": 1, "group_id": "b", "query_lang": "de", "passage_lang": "en", "kind": "cross", **NO_NEGATIVE},
            {"batch": 2, "group_id": "a", "query_lang": "de", "passage_lang": "de", "kind": "mono", **NO_NEGATIVE},
            {"batch": 2, "group_id": "c", "query_lang": "en", "passage_lang": "de", "kind": "cross", **NO_NEGATIVE},
        ],
        schema=PLAN_SCHEMA,
    )
    assert plan_summary(plan, 4) == {
        "batches.mono": 1,
        "batches.cross": 1,
        "batches.mixed": 1,
        "pairs_total": 6,
        "mono_share": 0.5,
        "groups": 4,
        "epochs": 1.5,
        "negatives.planned": 0,
        "negatives.skipped": 0,
        "pairs.en-en": 2,
        "pairs.en-de": 2,
        "pairs.de-en": 1,
        "pairs.de-de": 1,
    }


# --- bad input ----------------------------------------------------------------------

GOOD = {"ratio": 0.5, "schedule": "hybrid", "order": "mono_first", "batch_size": 4, "steps": 10, "seed": 0}


@pytest.mark.parametrize(
    "groups, change, message",
    [
        (
            full_groups(10) | {"x": ["zh"]},
            {"ratio": 0.5},
            "params.yaml: sampler.batch_size: 4 is larger than the 1 groups having language 'zh' (a batch needs 4 distinct groups)",
        ),
        (
            full_groups(3, ["en"]) | full_groups(10, ["de"], prefix="d") | {"x": ["de", "en"]},
            {"ratio": 0.0},
            "params.yaml: sampler.batch_size: 4 is larger than the 1 groups with two or more languages (a batch needs 4 distinct groups)",
        ),
        (
            full_groups(3, ["de", "en"]),
            {"ratio": 0.5, "schedule": "pair"},
            "params.yaml: sampler.batch_size: 4 is larger than the 3 groups with two or more languages (a batch needs 4 distinct groups)",
        ),
        (
            full_groups(3, ["en"]),
            {"ratio": 1.0, "schedule": "pair"},
            "params.yaml: sampler.batch_size: 4 is larger than the 3 groups (a batch needs 4 distinct groups)",
        ),
        (
            full_groups(10, ["en"]),
            {"ratio": 0.99},
            "params.yaml: sampler.ratio: 0.99 asks for cross-lingual pairs, but the pairs have only one language ('en')",
        ),
        ({}, {}, "no groups to plan batches from"),
    ],
)
def test_groups_that_cannot_fill_a_batch(groups, change, message):
    with pytest.raises(PipelineError) as err:
        plan_batches(groups, **{**GOOD, **change})
    assert str(err.value) == message


def test_checks_only_the_batch_kinds_that_can_be_drawn():
    assert plan_batches(full_groups(10, ["en"]), 1.0, "hybrid", "mono_first", 4, 3, 0).num_rows == 12
    few_in_zh = full_groups(10) | {"x": ["zh", "en"]}
    assert plan_batches(few_in_zh, 0.0, "hybrid", "mono_first", 4, 3, 0).num_rows == 12


def test_groups_from_pairs():
    table = pairs_table({"b": ["en", "de"], "a": ["es"]})
    assert groups_from_pairs(table) == {"a": ["es"], "b": ["en", "de"]}


@pytest.mark.parametrize(
    "table, message",
    [
        (pairs_table({}), "data/parallel/pairs.parquet: no pairs"),
        (pairs_table({"a": ["en", ""]}), "data/parallel/pairs.parquet: 1 rows have an empty lang"),
        (pairs_table({"": ["en"]}), "data/parallel/pairs.parquet: 1 rows have an empty group_id"),
        (
            pa.concat_tables([pairs_table({"a": ["en", "de"]}), pairs_table({"a": ["de"]})]),
            "data/parallel/pairs.parquet: group 'a' has more than one 'de' pair",
        ),
    ],
)
def test_bad_pairs(table, message):
    with pytest.raises(PipelineError) as err:
        groups_from_pairs(table)
    assert str(err.value) == message


# --- the stage ----------------------------------------------------------------------


def write_stage(root: Path, groups: dict[str, list[str]] | None, **sampler) -> None:
    sampler = {"ratio": 0.5, "schedule": "hybrid", "order": "mono_first", "batch_size": 4, "steps": 6, "negatives": "none", **sampler}
    write_params(root, seed=42, **{"data.train": "mlqa_r"}, **{f"sampler.{k}": v for k, v in sampler.items()})
    if groups is not None:
        write_parquet(pairs_table(groups), root / "data/parallel/pairs.parquet", made_by=pairs_stamp("mlqa_r", 0.1))


def test_pairs_made_for_another_source_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_stage(tmp_path, full_groups(8, ["de", "en"]))
    write_parquet(pairs_table(full_groups(8, ["de", "en"])), tmp_path / "data/parallel/pairs.parquet", made_by=pairs_stamp("xquad_r", 0.1))
    with pytest.raises(
        PipelineError,
        match=r'^data/parallel/pairs.parquet: made with data.train="xquad_r", but params.yaml has data.train="mlqa_r" \(stale output',
    ):
        batches.main()
    assert not (tmp_path / "data/batches").exists()


def test_main_writes_plan_and_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_stage(tmp_path, full_groups(8, ["de", "en"]))
    batches.main()
    plan = pq.read_table(tmp_path / "data/batches/plan.parquet")
    assert plan.num_rows == 24
    assert plan.schema.remove_metadata().equals(PLAN_SCHEMA)
    assert json.loads(plan.schema.metadata[b"hybridir.params"]) == {
        "seed": 42,  # sampler.order does nothing under the hybrid schedule: not stamped, so editing it keeps the plan's bytes
        "sampler": {"ratio": 0.5, "schedule": "hybrid", "batch_size": 4, "steps": 6, "negatives": "none"},
    }
    metrics = json.loads((tmp_path / "metrics/batches.json").read_text())
    assert metrics["groups"] == 8 and metrics["pairs_total"] == 24 and metrics["epochs"] == 3.0
    assert metrics["batches.mono"] + metrics["batches.cross"] == 6
    assert sum(v for k, v in metrics.items() if k.startswith("pairs.")) == 24
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "batches: no effect on the plan, left out of its stamp: sampler.order (sampler.schedule is hybrid)"
    assert out[1].startswith("batches: 6 x 4 pairs")


@pytest.mark.parametrize(("schedule", "same"), [("hybrid", True), ("multitask", True), ("pair", True), ("sequential", False)])
def test_an_order_the_schedule_ignores_leaves_the_plan_byte_identical(tmp_path, monkeypatch, schedule, same):
    """sampler.order acts under sequential only; elsewhere editing it must not change the plan's bytes, or DVC
    would retrain and re-evaluate for nothing (issue 27)."""
    monkeypatch.chdir(tmp_path)
    plans = []
    for order in ("mono_first", "cross_first"):
        write_stage(tmp_path, full_groups(8, ["de", "en"]), schedule=schedule, order=order)
        batches.main()
        plans.append((tmp_path / "data/batches/plan.parquet").read_bytes())
    assert (plans[0] == plans[1]) is same


def test_main_plans_hard_negatives_from_the_parallel_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    groups = full_groups(8, ["de", "en"])
    write_stage(tmp_path, groups, schedule="multitask", negatives="query_language")
    with pytest.raises(PipelineError, match=r"^data/parallel/questions.parquet: file not found"):
        batches.main()
    questions, candidates = corpus(groups, sentences=3)
    write_parquet(questions, tmp_path / "data/parallel/questions.parquet", made_by=pairs_stamp("mlqa_r", 0.1))
    write_parquet(candidates, tmp_path / "data/parallel/candidates.parquet", made_by=pairs_stamp("mlqa_r", 0.1))
    batches.main()
    plan = pq.read_table(tmp_path / "data/batches/plan.parquet")
    assert plan["negative_candidate"].null_count < plan.num_rows
    assert json.loads(plan.schema.metadata[b"hybridir.params"])["sampler"]["negatives"] == "query_language"
    metrics = json.loads((tmp_path / "metrics/batches.json").read_text())
    assert metrics["negatives.planned"] + metrics["negatives.skipped"] == 24 and metrics["batches.mixed"] == 6
    assert "multitask schedule" in capsys.readouterr().out


@pytest.mark.parametrize(
    "groups, sampler, message",
    [
        (full_groups(8), {"ratio": 2}, "params.yaml: sampler.ratio: 2 is outside [0, 1]"),
        (None, {}, "data/parallel/pairs.parquet: file not found"),
        ({}, {}, "data/parallel/pairs.parquet: no pairs"),
        (full_groups(3), {}, "params.yaml: sampler.batch_size: 4 is larger than the 3 groups"),
    ],
)
def test_main_errors_write_nothing(tmp_path, monkeypatch, groups, sampler, message):
    monkeypatch.chdir(tmp_path)
    write_stage(tmp_path, groups, **sampler)
    with pytest.raises(PipelineError) as err:
        batches.main()
    assert str(err.value).startswith(message)
    assert not (tmp_path / "data/batches").exists() and not (tmp_path / "metrics").exists()


def test_bad_params_subprocess_exits_2_with_one_line(tmp_path):
    write_stage(tmp_path, full_groups(8), ratio=1.5)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.batches"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: params.yaml: sampler.ratio: 1.5 is outside [0, 1]"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data/batches/plan.parquet").exists()
