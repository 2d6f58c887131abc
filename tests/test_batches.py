"""Tests of the `batches` stage: the batch planner's guarantees, its metrics, and its errors."""

from __future__ import annotations

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
from pipeline.batches import groups_from_pairs, plan_batches, plan_summary
from pipeline.common import PipelineError, write_parquet
from pipeline.contracts import PAIRS_SCHEMA, PLAN_SCHEMA
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


def limit_for(groups: dict[str, list[str]], ratio: float, unit: str) -> int:
    """The largest batch_size every drawable batch kind can fill with distinct groups."""
    langs = {lang for ls in groups.values() for lang in ls}
    limits = [len(groups)]
    if ratio < 1:
        limits.append(sum(len(set(ls)) >= 2 for ls in groups.values()))
    if unit == "batch" and ratio > 0:
        limits += [sum(lang in ls for ls in groups.values()) for lang in langs]
    return min(limits)


group_collections = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=4),
    st.lists(st.sampled_from(LANGS), min_size=1, max_size=len(LANGS), unique=True),
    min_size=1,
    max_size=30,
)


# --- properties over random group collections ---------------------------------------


@few_examples
@given(
    groups=group_collections,
    ratio=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    unit=st.sampled_from(["batch", "pair"]),
    steps=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_plan_invariants(groups, ratio, unit, steps, seed, data):
    limit = limit_for(groups, ratio, unit)
    assume(limit >= 1 and (ratio == 1 or len({lang for ls in groups.values() for lang in ls}) >= 2))
    batch_size = data.draw(st.integers(1, limit))
    plan = plan_batches(groups, ratio, unit, batch_size, steps, seed)

    assert plan.schema.equals(PLAN_SCHEMA)
    assert plan.num_rows == steps * batch_size
    assert plan["batch"].to_pylist() == [b for b in range(steps) for _ in range(batch_size)]
    for batch in by_batch(plan).values():
        assert len({row["group_id"] for row in batch}) == batch_size  # no group twice in a batch
        for row in batch:
            assert row["query_lang"] in groups[row["group_id"]]
            assert row["passage_lang"] in groups[row["group_id"]]
            assert (row["kind"] == "mono") == (row["query_lang"] == row["passage_lang"])
        if unit == "batch":
            assert len({row["kind"] for row in batch}) == 1
            if batch[0]["kind"] == "mono":
                assert len({row["query_lang"] for row in batch}) == 1
    kinds = set(plan["kind"].to_pylist())
    if ratio == 1:
        assert kinds == {"mono"}
    if ratio == 0:
        assert kinds == {"cross"}


@few_examples
@given(n_groups=st.integers(1, 40), batch_size=st.integers(1, 40), steps=st.integers(1, 60), seed=st.integers(0, 999))
def test_groups_used_evenly_in_one_language(n_groups, batch_size, steps, seed):
    assume(batch_size <= n_groups)
    plan = plan_batches(full_groups(n_groups, ["en"]), 1.0, "batch", batch_size, steps, seed)
    counts = Counter(plan["group_id"].to_pylist())
    uses = [counts[g] for g in full_groups(n_groups)]
    assert max(uses) - min(uses) <= 1
    if steps * batch_size % n_groups == 0:
        assert set(uses) == {steps * batch_size // n_groups}


@pytest.mark.parametrize("unit", ["batch", "pair"])
def test_cross_pool_used_evenly(unit):
    groups = {**full_groups(13), "solo": ["en"]}  # a one-language group cannot be cross
    plan = plan_batches(groups, 0.0, unit, 5, 26, seed=3)  # 130 pairs = 10 passes over 13 groups
    assert Counter(plan["group_id"].to_pylist()) == {g: 10 for g in full_groups(13)}


def test_batch_as_large_as_the_pool_is_a_permutation_every_time():
    plan = plan_batches(full_groups(7), 0.5, "batch", 7, 50, seed=1)
    for batch in by_batch(plan).values():
        assert sorted(row["group_id"] for row in batch) == sorted(full_groups(7))


# --- distributions ------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_share_of_mono_batches_is_close_to_ratio(ratio):
    steps = 2000
    plan = plan_batches(full_groups(20), ratio, "batch", 4, steps, seed=7)
    metrics = plan_summary(plan, 20)
    assert metrics["batches.mono"] + metrics["batches.cross"] == steps
    assert metrics["batches.mixed"] == 0
    standard_error = (ratio * (1 - ratio) / steps) ** 0.5
    assert abs(metrics["batches.mono"] / steps - ratio) < 4 * standard_error


def test_mono_batch_languages_and_cross_language_pairs_are_uniform():
    steps = 3000
    plan = plan_batches(full_groups(10, ["de", "en", "zh"]), 0.5, "batch", 2, steps, seed=11)
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
    plan = plan_batches(groups, 0.0, "batch", 8, 50, seed=0)
    pairs = {(r["query_lang"], r["passage_lang"]) for r in rows(plan)}
    assert pairs == {("de", "en"), ("en", "de"), ("es", "hi"), ("hi", "es")}


def test_pair_unit_mixes_kinds_within_batches():
    plan = plan_batches(full_groups(40), 0.5, "pair", 16, 200, seed=5)
    metrics = plan_summary(plan, 40)
    assert metrics["batches.mixed"] > 190
    assert abs(metrics["mono_share"] - 0.5) < 4 * (0.25 / plan.num_rows) ** 0.5
    mono_langs = Counter(r["query_lang"] for r in rows(plan) if r["kind"] == "mono")
    assert set(mono_langs) == set(LANGS)


def test_pair_unit_with_ratio_one_may_use_single_language_groups():
    groups = {f"q{i}": [LANGS[i % 5]] for i in range(10)}
    plan = plan_batches(groups, 1.0, "pair", 10, 3, seed=0)
    assert set(plan["kind"].to_pylist()) == {"mono"}
    assert all(r["query_lang"] == groups[r["group_id"]][0] for r in rows(plan))


# --- determinism and speed ----------------------------------------------------------


def test_same_seed_same_plan_different_seed_different_plan(tmp_path):
    groups = full_groups(30)
    first, second = (plan_batches(groups, 0.5, "batch", 8, 40, seed=42) for _ in range(2))
    assert first.equals(second)
    made_by = {"seed": 42, "sampler": {"ratio": 0.5}}
    write_parquet(first, tmp_path / "a.parquet", made_by=made_by)
    write_parquet(second, tmp_path / "b.parquet", made_by=made_by)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert not plan_batches(groups, 0.5, "batch", 8, 40, seed=43).equals(first)


def test_plan_ignores_the_order_of_groups_and_languages():
    groups = {"b": ["en", "de"], "a": ["de", "en", "es"], "c": ["es", "de"]}
    shuffled = {g: list(reversed(groups[g])) for g in reversed(list(groups))}
    assert plan_batches(groups, 0.5, "batch", 2, 30, 1).equals(plan_batches(shuffled, 0.5, "batch", 2, 30, 1))


# --- metrics ------------------------------------------------------------------------


def test_summarize_counts_kinds_and_language_pairs():
    plan = pa.Table.from_pylist(
        [
            {"batch": 0, "group_id": "a", "query_lang": "en", "passage_lang": "en", "kind": "mono"},
            {"batch": 0, "group_id": "b", "query_lang": "en", "passage_lang": "en", "kind": "mono"},
            {"batch": 1, "group_id": "a", "query_lang": "en", "passage_lang": "de", "kind": "cross"},
            {"batch": 1, "group_id": "b", "query_lang": "de", "passage_lang": "en", "kind": "cross"},
            {"batch": 2, "group_id": "a", "query_lang": "de", "passage_lang": "de", "kind": "mono"},
            {"batch": 2, "group_id": "c", "query_lang": "en", "passage_lang": "de", "kind": "cross"},
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
        "pairs.en-en": 2,
        "pairs.en-de": 2,
        "pairs.de-en": 1,
        "pairs.de-de": 1,
    }


# --- bad input ----------------------------------------------------------------------

GOOD = {"ratio": 0.5, "unit": "batch", "batch_size": 4, "steps": 10, "seed": 0}


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
            {"ratio": 0.5, "unit": "pair"},
            "params.yaml: sampler.batch_size: 4 is larger than the 3 groups with two or more languages (a batch needs 4 distinct groups)",
        ),
        (
            full_groups(3, ["en"]),
            {"ratio": 1.0, "unit": "pair"},
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
    assert plan_batches(full_groups(10, ["en"]), 1.0, "batch", 4, 3, 0).num_rows == 12
    few_in_zh = full_groups(10) | {"x": ["zh", "en"]}
    assert plan_batches(few_in_zh, 0.0, "batch", 4, 3, 0).num_rows == 12


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
    sampler = {"ratio": 0.5, "unit": "batch", "batch_size": 4, "steps": 6, **sampler}
    write_params(root, seed=42, **{"data.train": "mlqa_r"}, **{f"sampler.{k}": v for k, v in sampler.items()})
    if groups is not None:
        write_parquet(pairs_table(groups), root / "data/parallel/pairs.parquet", made_by={"data.train": "mlqa_r"})


def test_pairs_made_for_another_source_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_stage(tmp_path, full_groups(8, ["de", "en"]))
    write_parquet(pairs_table(full_groups(8, ["de", "en"])), tmp_path / "data/parallel/pairs.parquet", made_by={"data.train": "xquad_r"})
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
        "seed": 42,
        "sampler": {"ratio": 0.5, "unit": "batch", "batch_size": 4, "steps": 6},
    }
    metrics = json.loads((tmp_path / "metrics/batches.json").read_text())
    assert metrics["groups"] == 8 and metrics["pairs_total"] == 24 and metrics["epochs"] == 3.0
    assert metrics["batches.mono"] + metrics["batches.cross"] == 6
    assert sum(v for k, v in metrics.items() if k.startswith("pairs.")) == 24
    assert "batches: 6 x 4 pairs" in capsys.readouterr().out


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
