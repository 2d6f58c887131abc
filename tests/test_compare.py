"""Tests of `compare`: headline figures by hand, the bootstrap's coverage and the test's size on
synthetic runs, pooling by seed, and reading past revisions through DVC in a throwaway repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pipeline.analysis import compare as cmp
from pipeline.analysis import reassess, seed_stats
from pipeline.analysis.compare import Entry, clusters_of, compare, group_entries, headline, plot_forest
from pipeline.analysis.runs import COMPARED_SCHEMA, OPTIONAL_COLUMNS, figure_label, read_queries
from pipeline.common import PipelineError, run_stage, write_parquet
from tests.helpers import synthetic

AP_FIGURES = ("mono_map", "cross_map", "multi_map")


def synthetic_pair(seed: int, shift: float, n_ids: int = 300, langs=("en", "de", "zh")):
    rng = np.random.default_rng(seed)
    ids = [f"q{i}" for i in range(n_ids)]
    latent = rng.beta(2.0, 2.0, n_ids) * 0.9 + 0.05
    return synthetic(ids, list(langs), latent, rng), synthetic(ids, list(langs), latent, rng, shift)


def entries(*tables: pd.DataFrame) -> list[Entry]:
    return [Entry(name, [name], [t]) for name, t in zip("ABCDEFG", tables)]


def test_headline_is_the_macro_average_of_cell_means():
    rows = [
        # setting, query, passage, id, ap, r@1, r@10, rank distance
        ("mono", "en", "en", "q1", 1.0, 1.0, None, None),
        ("mono", "en", "en", "q2", 0.5, 0.0, None, None),
        ("mono", "de", "de", "q1", 0.2, 0.0, None, None),
        ("cross", "en", "de", "q1", 0.4, 0.0, None, None),
        ("cross", "en", "de", "q2", 0.6, 1.0, None, None),
        ("cross", "de", "en", "q1", 1.0, 1.0, None, None),
        ("multi", "en", None, "q1", 0.3, None, 1.0, 10.0),
        ("multi", "en", None, "q2", 0.5, None, 0.0, 30.0),
        ("multi", "de", None, "q1", 0.1, None, 0.5, 5.0),
    ]
    table = pd.DataFrame(rows, columns=[name for name in COMPARED_SCHEMA.names if name not in OPTIONAL_COLUMNS])
    figures = headline(table)
    # Macro, not micro: each cell counts once however many questions it has.
    assert figures["mono_map"] == pytest.approx(((1.0 + 0.5) / 2 + 0.2) / 2)  # 0.475, micro would be 0.567
    assert figures["cross_map"] == pytest.approx(((0.4 + 0.6) / 2 + 1.0) / 2)
    assert figures["multi_map"] == pytest.approx(((0.3 + 0.5) / 2 + 0.1) / 2)
    assert figures["multi_recall_at_10"] == pytest.approx((0.5 + 0.5) / 2)
    assert figures["rank_distance"] == pytest.approx((20.0 + 5.0) / 2)
    # compare's A and B columns are the same figures.
    result, _ = compare(entries(table, table), resamples=100)
    assert dict(zip(result["figure"], result["a"])) == pytest.approx(figures)


def test_a_run_against_itself_differs_by_nothing():
    a, _ = synthetic_pair(0, 0.0)
    result, notes = compare(entries(a, a.copy()), resamples=500)
    assert list(result["figure"]) == list(cmp.FIGURES)
    assert (result["difference"] == 0).all()
    assert ((result["ci_low"] <= 0) & (result["ci_high"] >= 0)).all()
    assert (result["p"] == 1).all() and (result["p_adjusted"] == 1).all()
    assert not result["significant"].any()
    assert notes == [
        "A is one run: its seed variance is unknown and not in the intervals",
        "B is one run: its seed variance is unknown and not in the intervals",
    ]


@pytest.mark.slow
def test_interval_covers_a_known_shift_and_the_test_keeps_its_size():
    """Single runs (no seed variance in play): 200 seeded pairs with a true mAP shift, 200 with none: the
    interval must cover the truth in >= 90% of trials, and the test reject at 0.05 in <= 10% without a shift."""
    trials, shift = 200, 0.02
    covered = {f: 0 for f in cmp.FIGURES}
    rejected = {f: 0 for f in cmp.FIGURES}
    detected = 0
    for trial in range(trials):
        a, b = synthetic_pair(1000 + trial, shift, n_ids=300)
        result = compare(entries(a, b), resamples=500, seed=trial)[0].set_index("figure")
        for f in cmp.FIGURES:
            truth = shift if f in AP_FIGURES else 0.0
            covered[f] += result.loc[f, "ci_low"] <= truth <= result.loc[f, "ci_high"]
        detected += result.loc["cross_map", "p_adjusted"] < 0.05
        a, b = synthetic_pair(5000 + trial, 0.0, n_ids=300)
        result = compare(entries(a, b), resamples=500, seed=trial)[0].set_index("figure")
        for f in cmp.FIGURES:
            rejected[f] += result.loc[f, "p"] < 0.05
    assert all(c >= 0.9 * trials for c in covered.values()), covered
    assert all(r <= 0.1 * trials for r in rejected.values()), rejected
    assert detected >= 0.5 * trials  # the shift is large enough to be seen most of the time


def test_pooling_by_seed_reports_the_seeds_mean_and_sd():
    rng = np.random.default_rng(7)
    ids = [f"q{i}" for i in range(150)]
    latent = rng.beta(2.0, 2.0, len(ids)) * 0.9 + 0.05
    runs = {
        f"{name}-s{s}": synthetic(ids, ["en", "de"], latent, rng, shift)
        for name, shift in (("hybrid", 0.0), ("mono", 0.05))
        for s in range(3)
    }
    params = {
        name: {"seed": int(name[-1]), "sampler.ratio": 0.5 if name.startswith("hybrid") else 1.0, "sampler.unit": "batch"} for name in runs
    }
    groups = group_entries(list(runs), params, "seed")
    assert groups == [
        ("sampler.ratio=0.5", ["hybrid-s0", "hybrid-s1", "hybrid-s2"]),
        ("sampler.ratio=1.0", ["mono-s0", "mono-s1", "mono-s2"]),
    ]
    result, _ = compare([Entry(label, members, [runs[m] for m in members]) for label, members in groups], resamples=300)
    result = result.set_index("figure")
    for side, (_, members) in zip("ab", groups):
        for f in cmp.FIGURES:
            per_seed = [headline(runs[m])[f] for m in members]
            assert result.loc[f, f"{side}_seeds"] == 3
            assert result.loc[f, f"{side}_seeds_mean"] == pytest.approx(np.mean(per_seed))
            assert result.loc[f, f"{side}_seeds_sd"] == pytest.approx(np.std(per_seed, ddof=1))
            # Same questions in every seed: the pooled figure is the seeds' mean.
            assert result.loc[f, side] == pytest.approx(np.mean(per_seed))
    assert result.loc["mono_map", "difference"] == pytest.approx(
        result.loc["mono_map", "b_seeds_mean"] - result.loc["mono_map", "a_seeds_mean"]
    )
    # A group of several seeds is labelled by its first run where params alone do not tell groups apart.
    same = {name: {"seed": 1, "lr": 1} for name in ("x", "y")}
    assert group_entries(["x", "y"], same, "seed") == [("x", ["x", "y"])]
    assert group_entries(["x", "y"], {"x": {"lr": 1}, "y": {"lr": 2}}) == [("lr=1", ["x"]), ("lr=2", ["y"])]


def test_the_adjustment_spans_the_whole_report_and_every_pair():
    a, b = synthetic_pair(3, 0.05, n_ids=60)
    result, _ = compare(entries(a, b, a), resamples=200)
    assert list(dict.fromkeys(result["comparison"])) == ["B vs A", "C vs A", "C vs B"]
    assert result.groupby("comparison")["difference"].sum()["C vs A"] == 0
    # one family: every comparison x figure of the report, not the figures of one comparison
    assert result["p_adjusted"].to_numpy() == pytest.approx(multipletests(result["p"], method="holm")[1])
    bh, _ = compare(entries(a, b, a), resamples=200, adjustment="fdr_bh")
    assert bh["p_adjusted"].to_numpy() == pytest.approx(multipletests(bh["p"], method="fdr_bh")[1])


def test_the_interval_and_the_flag_cannot_disagree():
    """Each reported interval excludes 0 exactly when the family-adjusted p is below 0.05."""
    for seed, shift in ((4, 0.0), (5, 0.01), (6, 0.03)):
        a, b = synthetic_pair(seed, shift, n_ids=120)
        result, _ = compare(entries(a, b, a.copy()), resamples=300)
        excludes_zero = (result["ci_low"] > 0) | (result["ci_high"] < 0)
        assert (excludes_zero == result["significant"]).all(), result[["figure", "ci_low", "ci_high", "p_adjusted"]]


def seeded_arms(seed_effects: dict[str, list[float]], true_shift: float = 0.0) -> list[Entry]:
    """Arms of runs whose every ap is moved by its seed's effect (and arm B's by `true_shift` too),
    on the same questions: the issue's hand-built case of seed luck."""
    rng = np.random.default_rng(11)
    ids = [f"q{i}" for i in range(200)]
    latent = rng.beta(2.0, 2.0, len(ids)) * 0.9 + 0.05
    arms = []
    for arm, effects in seed_effects.items():
        shift = true_shift if arm == "B" else 0.0
        runs = [synthetic(ids, ["en", "de", "zh"], latent, rng, effect + shift) for effect in effects]
        arms.append(Entry(arm, [f"{arm}-s{k}" for k in range(len(runs))], runs))
    return arms


def test_a_gap_that_seed_luck_explains_is_not_called_significant_and_a_real_one_is():
    """Arm B's seeds happen to sit 0.025 above A's (seed sd 0.03, no true difference): a test over
    questions alone called that significant on every mAP; with the seeds' variance it is not.
    A true difference of 0.12 (four seed sds) with the same seed noise is."""
    luck = {"A": [-0.03, 0.0, 0.03], "B": [-0.005, 0.025, 0.055]}
    result, _ = compare(seeded_arms(luck), resamples=500)
    maps = result.set_index("figure").loc[list(AP_FIGURES)]
    assert (maps["difference"] > 0.01).all()  # B's seeds are the luckier ones (each run's own noise blurs the 0.025)
    assert not maps["significant"].any(), maps[["difference", "ci_low", "ci_high", "p_adjusted"]]
    assert (maps["seed_variance"] > maps["question_variance"]).all()  # the seeds carry most of the uncertainty
    real, _ = compare(seeded_arms(luck, true_shift=0.12), resamples=500)
    assert real.set_index("figure").loc[list(AP_FIGURES), "significant"].all()


def test_paragraphs_are_the_clusters_where_the_files_name_them():
    a, _ = synthetic_pair(8, 0.0, n_ids=40)
    ids = pd.Index([f"q{i}" for i in range(40)])
    clusters, notes = clusters_of(ids, [a, a])
    assert list(clusters[:10]) == ["p0"] * 5 + ["p1"] * 5 and notes == []
    clusters, notes = clusters_of(ids, [a.drop(columns="paragraph")])  # a file from before paragraphs were written
    assert list(clusters) == list(ids) and len(notes) == 1


def test_bad_input_is_one_line():
    a, b = synthetic_pair(4, 0.0, n_ids=20)
    with pytest.raises(PipelineError, match="at least two entries, got 1"):
        compare(entries(a), resamples=100)
    other = b.assign(question_id=b["question_id"] + "x")
    with pytest.raises(PipelineError, match="^A and B have no question id in common"):
        compare(entries(a, other), resamples=100)
    _, notes = compare(entries(a, b[b["question_id"] != "q0"]), resamples=100)
    assert notes[0] == "1 question ids not in every entry were left out (19 compared)"


def test_forest_plot_draws_each_interval(tmp_path):
    a, b = synthetic_pair(5, 0.05, n_ids=60)
    result, _ = compare(entries(a, b, a), resamples=200)
    fig = plot_forest(result, tmp_path / "f.png", "title")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == [figure_label(f) for f in cmp.FIGURES]
    mono = result[result["figure"] == "mono_map"]
    points = np.asarray(fig.axes[0].collections[-1].get_offsets())  # the differences, top row first
    assert points[:, 0] == pytest.approx(mono["difference"].to_numpy())
    bars = [c.lines[2][0].get_segments()[0] for c in fig.axes[0].containers]  # each interval's line
    assert np.array([(lo[0], hi[0]) for lo, hi in bars]) == pytest.approx(mono[["ci_low", "ci_high"]].to_numpy())
    assert any(
        list(line.get_xdata()) == [0, 0] and list(line.get_ydata()) == [0, 1]  # zero marked (axvline)
        for line in fig.axes[0].lines
    )
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(mono["comparison"])


# --- reading past revisions through DVC ------------------------------------------------


def _sh(repo: Path, *cmd: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    subprocess.run(cmd, cwd=repo, check=True, capture_output=True, env=env)


def _dvc(repo: Path, *args: str) -> None:
    _sh(repo, sys.executable, "-m", "dvc", *args)


def _write(table: pd.DataFrame, path: Path) -> None:
    """With the compared columns only: a per-query file from before `top1` and
    `own_language_first` existed must still compare."""
    write_parquet(pa.Table.from_pandas(table, schema=COMPARED_SCHEMA, preserve_index=False), path)


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A git+DVC repo with three commits of a DVC-tracked per-query file and params:
    HEAD~2 seed 1 (ap), HEAD~1 seed 2 (ap + 0.02), HEAD = workspace ratio 1 (ap + 0.1)."""
    repo = tmp_path_factory.mktemp("repo")
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "config", "user.name", "test")
    _sh(repo, "git", "config", "user.email", "test@example.com")
    _dvc(repo, "init", "-q")
    a, _ = synthetic_pair(11, 0.0, n_ids=40)
    path = repo / "metrics/eval_queries/xquad_r.parquet"
    for i, (seed, ratio, shift) in enumerate(((1, 0.5, 0.0), (2, 0.5, 0.02), (1, 1.0, 0.1))):
        (repo / "params.yaml").write_text(f"seed: {seed}\nsampler:\n  ratio: {ratio}\n")
        _write(a.assign(ap=a["ap"] + shift), path)
        _dvc(repo, "add", "-q", "metrics/eval_queries/xquad_r.parquet")
        _sh(repo, "git", "add", "-A")
        _sh(repo, "git", "commit", "-qm", f"run {i}")
    return repo, a


@pytest.mark.slow
def test_reads_each_revision_from_the_dvc_cache(dvc_repo):
    repo, a = dvc_repo
    for rev, shift in (("HEAD~2", 0.0), ("HEAD~1", 0.02), ("workspace", 0.1)):
        table = read_queries(rev, "metrics/eval_queries/xquad_r.parquet", repo=str(repo))
        assert table["ap"].to_numpy() == pytest.approx(a["ap"].to_numpy() + shift), rev
    with pytest.raises(PipelineError, match="^no-such-rev: unknown revision"):
        read_queries("no-such-rev", "metrics/eval_queries/xquad_r.parquet", repo=str(repo))
    with pytest.raises(PipelineError, match=r"^HEAD~1: metrics/eval_queries/mlqa_r.parquet not found .*dvc exp run"):
        read_queries("HEAD~1", "metrics/eval_queries/mlqa_r.parquet", repo=str(repo))


@pytest.mark.slow
def test_a_revision_whose_outputs_are_not_in_the_cache_is_one_line(tmp_path, monkeypatch, capsys):
    """A clone without HEAD's outputs in its DVC cache: a folder output (as metrics/eval_queries is) once gave a
    78-line DataIndexDirError traceback (issue 27)."""
    _sh(tmp_path, "git", "init", "-q")
    _sh(tmp_path, "git", "config", "user.name", "test")
    _sh(tmp_path, "git", "config", "user.email", "test@example.com")
    _dvc(tmp_path, "init", "-q")
    a, _ = synthetic_pair(11, 0.0, n_ids=40)
    _write(a, tmp_path / "metrics/eval_queries/xquad_r.parquet")
    _dvc(tmp_path, "add", "-q", "metrics/eval_queries")
    _sh(tmp_path, "git", "add", "-A")
    _sh(tmp_path, "git", "commit", "-qm", "run")
    shutil.rmtree(tmp_path / ".dvc/cache")  # as in a fresh clone before `dvc pull`
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compare", "workspace", "HEAD"])
    with pytest.raises(SystemExit) as exit_:
        run_stage(cmp.main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: HEAD: metrics/eval_queries/xquad_r.parquet is not in this clone's DVC cache (`dvc pull` it, or run that "
        "revision again with `dvc exp run`)"
    ]


def test_cli_compares_a_past_revision_with_the_workspace(dvc_repo, monkeypatch, capsys):
    repo, a = dvc_repo
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["compare", "HEAD~2", "workspace", "--resamples", "200", "--out", "out/cmp"])
    run_stage(cmp.main)
    printed = capsys.readouterr().out
    assert "| workspace vs HEAD~2 | Mo. mAP |" in printed and "| 0.1000 |" in printed
    table = pd.read_csv(repo / "out/cmp.csv").set_index("figure")
    for f in AP_FIGURES:
        assert table.loc[f, "difference"] == pytest.approx(0.1)
        assert table.loc[f, "a"] == pytest.approx(headline(a)[f])
    assert (repo / "out/cmp.md").read_text() in printed
    assert (repo / "out/cmp.png").exists()
    monkeypatch.setattr(sys, "argv", ["compare", "HEAD~1", "workspace", "--dataset", "mlqa_r"])
    with pytest.raises(SystemExit) as exit_:
        run_stage(cmp.main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: HEAD~1: metrics/eval_queries/mlqa_r.parquet not found at that revision nor in the DVC cache "
        "(run it with `dvc exp run`/`dvc repro`, or `dvc pull`)"
    )
    monkeypatch.setattr(sys, "argv", ["compare", "HEAD~1"])
    with pytest.raises(SystemExit):
        run_stage(cmp.main)
    assert "at least two entries, got 1" in capsys.readouterr().err


def test_cli_pools_revisions_that_differ_only_in_seed(dvc_repo, monkeypatch, capsys):
    repo, a = dvc_repo
    monkeypatch.chdir(repo)
    monkeypatch.setattr(
        sys, "argv", ["compare", "HEAD~2", "HEAD~1", "workspace", "--group", "seed", "--resamples", "200", "--out", "out/pooled"]
    )
    run_stage(cmp.main)
    printed = capsys.readouterr().out
    assert "Note: sampler.ratio=0.5 pools HEAD~2, HEAD~1." in printed
    table = pd.read_csv(repo / "out/pooled.csv").set_index("figure")
    assert table.loc["mono_map", "comparison"] == "sampler.ratio=1.0 vs sampler.ratio=0.5"
    per_seed = [headline(a)["mono_map"], headline(a)["mono_map"] + 0.02]
    assert table.loc["mono_map", "a_seeds"] == 2
    assert table.loc["mono_map", "a_seeds_mean"] == pytest.approx(np.mean(per_seed))
    assert table.loc["mono_map", "a_seeds_sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert table.loc["mono_map", "difference"] == pytest.approx(0.09)  # pooled seeds: ap + 0.01
    monkeypatch.setattr(sys, "argv", ["compare", "HEAD~2", "HEAD~1", "--group", "seed"])
    with pytest.raises(SystemExit):
        run_stage(cmp.main)
    assert "all entries differ only in seed" in capsys.readouterr().err


def test_cli_labels_pool_entries_and_against_compares_with_one_entry_only(dvc_repo, monkeypatch, capsys):
    repo, a = dvc_repo
    monkeypatch.chdir(repo)
    argv = ["compare", "base=HEAD~2", "base=HEAD~1", "ratio 1=workspace", "again=HEAD~1", "--resamples", "200", "--out", "out/labelled"]
    monkeypatch.setattr(sys, "argv", [*argv, "--against", "base"])
    run_stage(cmp.main)
    assert "Note: base pools HEAD~2, HEAD~1." in capsys.readouterr().out
    table = pd.read_csv(repo / "out/labelled.csv")
    assert sorted(set(table["comparison"])) == ["again vs base", "ratio 1 vs base"]  # not "ratio 1 vs again"
    mono = table[table["figure"] == "mono_map"].set_index("comparison")
    assert mono.loc["ratio 1 vs base", "difference"] == pytest.approx(0.09)  # as --group seed pools them
    assert mono.loc["again vs base", "difference"] == pytest.approx(0.01)
    monkeypatch.setattr(sys, "argv", argv)  # without --against: every pair
    run_stage(cmp.main)
    assert set(pd.read_csv(repo / "out/labelled.csv")["comparison"]) == {"ratio 1 vs base", "again vs base", "again vs ratio 1"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a=HEAD~2", "HEAD~1"], "HEAD~1: no LABEL= prefix; label every entry or none"),
        (["a=HEAD~2", "a=HEAD~1"], "every entry is labelled a: nothing to compare after pooling"),
        (["a=HEAD~2", "b=HEAD~1", "--group", "seed"], "--group: entries are pooled by their LABEL= prefixes already"),
        (["HEAD~2", "HEAD~1", "--against", "nope"], "--against: 'nope' is none of the entries (HEAD~2, HEAD~1)"),
    ],
)
def test_cli_bad_labels_and_against_are_one_line(dvc_repo, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(dvc_repo[0])
    monkeypatch.setattr(sys, "argv", ["compare", *argv, "--resamples", "200", "--out", "out/bad"])
    with pytest.raises(SystemExit):
        run_stage(cmp.main)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_report_lists_how_many_seeds_a_difference_needs():
    luck = {"A": [-0.03, 0.0, 0.03], "B": [-0.005, 0.025, 0.055]}
    arms = seeded_arms(luck)
    per_run = pd.DataFrame([{"label": e.label, **headline(t)} for e in arms for t in e.tables])
    seed_sd = seed_stats.pooled_seed_sd(per_run, "label")
    by_hand = np.sqrt((per_run.groupby("label")["mono_map"].var(ddof=1)).mean())  # equal seeds per arm: the mean variance
    assert seed_sd["mono_map"] == pytest.approx(by_hand)
    text = cmp.power_markdown(seed_sd)
    assert "| seeds per arm |" in text and "| 3 |" in text and "| 10 |" in text
    assert seed_stats.pooled_seed_sd(per_run.groupby("label").head(1), "label") == {} and cmp.power_markdown({}) == ""


def test_reassess_tests_an_old_report_at_seed_level_with_a_family_per_report(tmp_path):
    rows = [
        # an old report's row: each side's seeds, mean and sd, and whether it was called significant
        {"comparison": "B vs A", "figure": "mono_map", "a_seeds": 3, "a_seeds_mean": 0.80, "a_seeds_sd": 0.005, "b_seeds": 3, "b_seeds_mean": 0.86, "b_seeds_sd": 0.005, "significant": True},
        {"comparison": "B vs A", "figure": "multi_map", "a_seeds": 3, "a_seeds_mean": 0.60, "a_seeds_sd": 0.03, "b_seeds": 3, "b_seeds_mean": 0.625, "b_seeds_sd": 0.03, "significant": True},
        {"comparison": "C vs A", "figure": "mono_map", "a_seeds": 3, "a_seeds_mean": 0.80, "a_seeds_sd": 0.005, "b_seeds": 1, "b_seeds_mean": 0.81, "b_seeds_sd": np.nan, "significant": True},
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "old.csv", index=False)
    table = reassess.reassess(reassess.read_report(tmp_path / "old.csv"))
    welch = stats.ttest_ind([0.855, 0.86, 0.865], [0.795, 0.80, 0.805], equal_var=False).pvalue  # mean 0.86 / 0.80, sd 0.005
    assert table.loc[0, "seed_p"] == pytest.approx(welch)
    assert table.loc[0, "seed_p_adjusted"] == pytest.approx(multipletests(table.loc[:1, "seed_p"], method="holm")[1][0])
    assert table["holds"].tolist()[:2] == [True, False]  # a clear gap holds; seed luck of one sd does not
    assert np.isnan(table.loc[2, "seed_p"]) and np.isnan(table.loc[2, "holds"])  # one seed: cannot be re-tested
    text = reassess.markdown(table, "header")
    assert "| old | 2 | 1 | 1 |" in text  # of the 2 testable rows called significant, 1 holds
    pd.DataFrame(rows).drop(columns="a_seeds_sd").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(PipelineError, match=r"bad.csv: no column 'a_seeds_sd'"):
        reassess.read_report(tmp_path / "bad.csv")
