"""Tests of `answer`, docs/results.md's generated first section: the figures it adds (resource
classes, language preference), who wins each setting, the page-wide Holm adjustment, the
verdicts, and the page made again from the committed tables alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pipeline.analysis import answer, compare
from pipeline.analysis.runs import COMPARED_SCHEMA
from pipeline.common import PipelineError, write_parquet
from pipeline.sources import resource_classes
from tests.helpers import synthetic

LANGS = ["de", "en", "hi", "th"]  # classes 5, 5, 4, 3


def arm_runs(shift: float, stream: int, seeds=(1, 2, 3), n_ids: int = 200) -> list[pd.DataFrame]:
    """Runs of one recipe on shared questions: each seed moves every ap by its own small offset."""
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(n_ids)]
    latent = rng.beta(2.0, 2.0, n_ids) * 0.9 + 0.05
    return [synthetic(ids, LANGS, latent, np.random.default_rng([stream, s]), shift + 0.004 * (s - 2)) for s in seeds]


def runs_table(arms: dict[str, list[pd.DataFrame]], figures, noise: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for lab, tables in arms.items():
        for k, table in enumerate(tables):
            rows.append({"label": lab, "run": f"{lab}-{k}", "seed": 42 + k, "ratio": None, **compare.headline(table, figures)})
            rows[-1]["noise.typo_0.05.multi_map"] = noise[lab][k]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def page_tables():
    arms = {"default": arm_runs(0.0, 1), "better": arm_runs(0.08, 2), "same": arm_runs(0.0, 3)}
    figures = answer.figure_specs(LANGS)
    noise = {"default": [0.50, 0.51, 0.49], "better": [0.60, 0.61, 0.59], "same": [0.50, 0.52, 0.48]}
    runs = runs_table(arms, figures, noise)
    entries = [compare.Entry(lab, [f"{lab}-{k}" for k in range(3)], tables) for lab, tables in arms.items()]
    return runs, answer.differences(runs, entries, figures, resamples=400, seed=0)


def test_class_figures_are_the_macro_average_of_their_languages():
    figures = answer.figure_specs(LANGS)
    classes = resource_classes.classes()
    assert {f for f in figures if f.startswith("class_")} == {f"class_{classes[x]}.{m}" for x in LANGS for m in ("mono_map", "multi_map")}
    table = arm_runs(0.0, 1)[0]
    figures_of_run = compare.headline(table, figures)
    multi = table[table["setting"] == "multi"].groupby("query_lang")["ap"].mean()
    for k in {classes[x] for x in LANGS}:
        langs = [x for x in LANGS if classes[x] == k]
        assert figures_of_run[f"class_{k}.multi_map"] == pytest.approx(multi[langs].mean())
    own = table[table["setting"] == "multi"].groupby("query_lang")["own_language_first"].mean()
    assert figures_of_run["language_preference"] == pytest.approx(own.mean())


def test_differences_find_a_real_gap_and_welch_for_the_run_level_figures(page_tables):
    runs, diffs = page_tables
    gap = answer.difference_of(diffs, "mono_map", "default", "better")
    assert gap["difference"] == pytest.approx(0.08, abs=0.01) and gap["p"] < 0.01 and gap["variance"] == "seed + question"
    null = answer.difference_of(diffs, "mono_map", "default", "same")
    assert abs(null["difference"]) < 0.02 and null["p"] > 0.05
    assert answer.difference_of(diffs, "mono_map", "better", "default")["difference"] == pytest.approx(-gap["difference"])
    noise = answer.difference_of(diffs, "noise.typo_0.05.multi_map", "default", "better")
    expected = stats.ttest_ind([0.60, 0.61, 0.59], [0.50, 0.51, 0.49], equal_var=False)
    assert noise["variance"] == "seed" and noise["p"] == pytest.approx(expected.pvalue) and noise["difference"] == pytest.approx(0.1)
    with pytest.raises(PipelineError, match="no difference of mono_map between 'default' and 'absent'"):
        answer.difference_of(diffs, "mono_map", "default", "absent")


def test_winners_take_each_figure_in_its_own_direction(page_tables):
    runs, diffs = page_tables
    won = answer.winners(runs, diffs, "default").set_index("figure")
    assert won.loc["mono_map", "best"] == "better"
    assert won.loc["mono_map", "lead_difference"] > 0.05
    assert won.loc["mono_map", "over_default_difference"] == pytest.approx(
        answer.difference_of(diffs, "mono_map", "default", "better")["difference"]
    )
    rank = runs.groupby("label")["rank_distance"].mean()
    assert won.loc["rank_distance", "best"] == rank.idxmin()  # lower is better
    if won.loc["rank_distance", "best"] == "default":
        assert np.isnan(won.loc["rank_distance", "over_default_p"])


def test_holm_runs_over_every_table_of_the_page_and_intervals_agree_with_it(page_tables):
    runs, diffs = page_tables
    won = answer.winners(runs, diffs, "default")
    against = answer.against_default(diffs, "default", list(answer.HEADLINE))
    answer.adjust_page([(won, "lead_"), (against, "")])
    p_all = np.concatenate([won["lead_p"].to_numpy(float), against["p"].to_numpy(float)])
    finite = np.isfinite(p_all)
    expected = multipletests(p_all[finite], method="holm")[1]
    got = np.concatenate([won["lead_p_adjusted"].to_numpy(float), against["p_adjusted"].to_numpy(float)])[finite]
    np.testing.assert_allclose(got, expected)
    for _, r in against.iterrows():
        excludes_zero = r["low"] > 0 or r["high"] < 0
        assert excludes_zero == (r["p_adjusted"] < 0.05)


def test_verdict_reads_each_figure_in_its_direction():
    table = pd.DataFrame(
        {
            "label": ["a", "a", "b", "c"],
            "figure": ["mono_map", "rank_distance", "rank_distance", "multi_map"],
            "difference": [0.02, -30.0, 25.0, 0.001],
            "p_adjusted": [0.01, 0.01, 0.02, 0.6],
        }
    )
    gains, losses = answer.verdict(table)
    assert gains == {"a": ["Mo. mAP", "rank distance"]} and losses == {"b": ["rank distance"]}
    text = answer.verdict_text(table, "On test")
    assert "better than the default with no significant loss: a (Mo. mAP, rank distance)" in text
    assert "significantly worse: b (rank distance)" in text and "not told apart from the default: c" in text


def test_each_recipe_against_the_default_states_what_its_seeds_detect(page_tables):
    runs, diffs = page_tables
    table = answer.against_default(diffs, "default", list(answer.HEADLINE))
    answer.adjust_page([(table, "")])
    lines = answer.against_markdown(table, runs, list(answer.HEADLINE), "default").splitlines()
    assert lines[0].endswith("| seeds detect (Mo. mAP / Cr. mAP / Mul. mAP) |")
    detect = [answer.detectable(runs, f, ["better", "default"]) for f in ("mono_map", "cross_map", "multi_map")]
    assert all(np.isfinite(detect)) and len(set(detect)) == 3
    better = next(line for line in lines if line.startswith("| better | 3 |"))
    assert better.endswith(" | " + " / ".join(f"{d:.3f}" for d in detect) + " |")
    fewer = runs[~((runs["label"] == "better") & (runs["seed"] == 44))]  # one seed fewer: the same sd detects only a larger gap
    assert answer.detectable(fewer, "mono_map", ["better", "default"]) > detect[0]


def test_the_section_replaces_itself_or_goes_first():
    section = f"{answer.START}\n## New\n{answer.END}\n"
    fresh = answer.insert_section("# Title\n\nIntroduction.\n\n## Older\n\nBody.\n", section)
    assert fresh == f"# Title\n\nIntroduction.\n\n{section}\n## Older\n\nBody.\n"
    assert answer.insert_section("# Title\n\nIntroduction.\n", section) == f"# Title\n\nIntroduction.\n\n{section}"
    again = answer.insert_section(fresh, section.replace("New", "Newer"))
    assert again.count(answer.START) == 1 and "Newer" in again and "## New\n" not in again and again.endswith("## Older\n\nBody.\n")
    with pytest.raises(PipelineError, match="no '<!-- answer:end -->'"):
        answer.insert_section(f"# T\n\n{answer.START}\nunfinished", section)


def test_spec_errors_name_the_file_and_field(tmp_path):
    spec = tmp_path / "answer.yaml"
    spec.write_text("page: p.md\nseeds: [1]\ndefault: d\ndirections:\n  - {name: x, title: X, test: xquad_r, arms: [{label: d}]}\n")
    with pytest.raises(PipelineError, match=r"answer.yaml: arm 'd' of x has no 'runs'"):
        answer.read_spec(spec)
    spec.write_text(
        "page: p.md\nseeds: [1, 2]\ndefault: e\ndirections:\n  - {name: x, title: X, test: xquad_r, arms: [{label: d, runs: 'r-s{seed}'}]}\n"
    )
    with pytest.raises(PipelineError, match="answer.yaml: default 'e' is not an arm of direction x"):
        answer.read_spec(spec)
    spec.write_text(spec.read_text().replace("default: e", "default: d"))
    assert answer.read_spec(spec).directions[0].arms[0].runs == ["r-s1", "r-s2"]
    spec.write_text(
        "page: p.md\nseeds: [1, 2]\ndefault: d\ndirections:\n  - name: x\n    title: X\n    test: mlqa_r\n    args: -S data.train=xquad_r\n"
        "    targets: evaluate@retriever\n    arms: [{label: d, runs: [abc1234]}, {label: e, runs: 'e-s{seed}', args: -S sampler.ratio=0}]\n"
    )
    with pytest.raises(PipelineError, match="answer.yaml: arm 'd' of x has 1 runs for 2 seeds"):
        answer.read_spec(spec)
    spec.write_text(spec.read_text().replace("runs: [abc1234]", "seeds: [1, 2, 3], runs: [abc1234, d-s2, 'd-s{seed}']"))
    assert answer.read_spec(spec).directions[0].arms[0].seeds == [1, 2, 3]
    assert answer.commands(answer.read_spec(spec)) == [
        "# x, d: abc1234, d-s2 (made earlier)",
        "dvc exp run --queue -n d-s3 -S data.train=xquad_r -S seed=3 evaluate@retriever",
        "dvc exp run --queue -n e-s1 -S data.train=xquad_r -S sampler.ratio=0 -S seed=1 evaluate@retriever",
        "dvc exp run --queue -n e-s2 -S data.train=xquad_r -S sampler.ratio=0 -S seed=2 evaluate@retriever",
    ]


def test_the_page_is_made_again_from_the_committed_tables_alone(tmp_path, monkeypatch, page_tables):
    runs, diffs = page_tables
    (tmp_path / "answer").mkdir()
    runs.assign(ratio=[0.5] * 3 + [0.0] * 3 + [None] * 3).to_csv(tmp_path / "answer" / "x_test_runs.csv", index=False)
    diffs.to_csv(tmp_path / "answer" / "x_test_differences.csv", index=False)
    runs.to_csv(tmp_path / "answer" / "x_dev_runs.csv", index=False)
    diffs.to_csv(tmp_path / "answer" / "x_dev_differences.csv", index=False)
    (tmp_path / "answer.yaml").write_text(
        "page: results.md\nseeds: [42, 43, 44]\ndefault: default\ndirections:\n"
        "  - name: x\n    title: A to B\n    test: xquad_r\n    arms:\n"
        "      - {label: default, runs: 'd-s{seed}'}\n      - {label: better, runs: 'b-s{seed}'}\n"
        "      - {label: same, runs: 's-s{seed}'}\n      - {label: later, runs: 'l-s{seed}'}\n"
        "  - {name: y, title: B to A, test: mlqa_r, arms: [{label: default, runs: 'y-s{seed}'}]}\n"
    )
    (tmp_path / "results.md").write_text("# Results\n\n## Older\n\nOlder sections.\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["answer", "answer.yaml", "--from-tables"])
    answer.main()
    page = (tmp_path / "results.md").read_text()
    assert page.startswith("# Results\n\n" + answer.START) and page.endswith("## Older\n\nOlder sections.\n")
    assert "| Mo. mAP | better: " in page and "Not run yet: later." in page and "![ratio sweep](answer/x_ratio_sweep.png)" in page
    assert (
        "### B to A\n\nNot run yet: the default and at least one other of its 1 recipes need a finished run (`--commands` prints the 3"
        in page
    )
    assert "better than the default with no significant loss: better (" in page
    assert "With 3 seeds an arm the t has few degrees of freedom" in page
    assert (tmp_path / "answer" / "x_ratio_sweep.png").stat().st_size > 0
    answer.main()
    assert (tmp_path / "results.md").read_text() == page  # the same tables make the same page


def _sh(repo: Path, *cmd: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    subprocess.run(cmd, cwd=repo, check=True, capture_output=True, env=env)


@pytest.mark.slow
def test_collecting_reads_every_run_of_a_git_dvc_repo(tmp_path, monkeypatch):
    """Four commits as four runs (two recipes x two seeds), per-query files in DVC and metrics in git,
    as `dvc exp run` leaves them; an arm whose revisions do not exist is named as not run."""
    _sh(tmp_path, "git", "init", "-q")
    _sh(tmp_path, "git", "config", "user.name", "test")
    _sh(tmp_path, "git", "config", "user.email", "test@example.com")
    _sh(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    base = arm_runs(0.0, 1, seeds=(1, 2), n_ids=40)
    for k, (recipe, seed, shift) in enumerate((("a", 1, 0.0), ("a", 2, 0.0), ("b", 1, 0.05), ("b", 2, 0.05))):
        table = base[seed - 1].assign(ap=base[seed - 1]["ap"] + shift)
        for folder, name in (("eval_queries", "xquad_r"), ("dev_queries", "dev")):
            (tmp_path / "metrics" / folder).mkdir(parents=True, exist_ok=True)
            write_parquet(
                pa.Table.from_pandas(table, schema=COMPARED_SCHEMA, preserve_index=False), tmp_path / "metrics" / folder / f"{name}.parquet"
            )
        noise = {"clean": {"multi_map": 0.6}, "typo_0.05": {"multi_map": 0.5 + shift + 0.01 * seed, "multi_drop": 0.1}}
        (tmp_path / "metrics/eval.json").write_text(
            json.dumps({"xquad_r": {"noise": noise}, "machine": {"cpu": "Xeon", "precision": "fp32"}})
        )
        (tmp_path / "metrics/dev.json").write_text(json.dumps({"dev": {}}))
        (tmp_path / "params.yaml").write_text(f"seed: {seed}\nrecipe: {recipe}\n")
        _sh(tmp_path, sys.executable, "-m", "dvc", "add", "-q", "metrics/eval_queries", "metrics/dev_queries")
        _sh(tmp_path, "git", "add", "-A")
        _sh(tmp_path, "git", "commit", "-qm", f"run {k}")
        _sh(tmp_path, "git", "tag", f"{recipe}-s{seed}")
    (tmp_path / "results.md").write_text("# Results\n\nOlder.\n")
    (tmp_path / "answer.yaml").write_text(
        "page: results.md\nseeds: [1, 2]\ndefault: a\ndirections:\n  - name: x\n    title: X\n    test: xquad_r\n    arms:\n"
        "      - {label: a, runs: 'a-s{seed}'}\n      - {label: b, runs: 'b-s{seed}', args: -S recipe=b}\n"
        "      - {label: c, runs: 'c-s{seed}', args: -S recipe=c}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["answer", "answer.yaml", "--resamples", "300"])
    answer.main()
    runs = pd.read_csv(tmp_path / "answer/x_test_runs.csv")
    assert list(runs["run"]) == ["a-s1", "a-s2", "b-s1", "b-s2"] and list(runs["seed"]) == [1, 2, 1, 2]
    assert runs["noise.typo_0.05.multi_map"].tolist() == pytest.approx([0.51, 0.52, 0.56, 0.57])
    diffs = pd.read_csv(tmp_path / "answer/x_test_differences.csv")
    assert answer.difference_of(diffs, "mono_map", "a", "b")["difference"] == pytest.approx(0.05)
    assert answer.difference_of(diffs, "noise.typo_0.05.multi_map", "a", "b")["difference"] == pytest.approx(0.05)
    dev = pd.read_csv(tmp_path / "answer/x_dev_differences.csv")
    assert answer.difference_of(dev, "multi_map", "a", "b")["difference"] == pytest.approx(0.05)
    assert not dev["figure"].str.startswith("noise.").any()  # the dev split has no noise report
    page = (tmp_path / "results.md").read_text()
    assert "Not run yet: c." in page and "| Mo. mAP | b: " in page and "Machine: Xeon, fp32." in page
    assert set(runs["machine"]) == {"Xeon, fp32"}


def test_the_ratio_trend_is_the_slope_below_ratio_one():
    rng = np.random.default_rng(0)
    ratios = np.repeat([0.0, 0.25, 0.5, 0.75, 1.0], 3)
    runs = pd.DataFrame(
        {
            "ratio": ratios,
            "mono_map": 0.8 + 0.04 * ratios + rng.normal(0, 0.002, len(ratios)),
            "multi_map": np.where(ratios == 1, 0.3, 0.6) + rng.normal(0, 0.002, len(ratios)),  # flat, then a collapse at 1
        }
    )
    trend = answer.ratio_trend(runs, ["mono_map", "multi_map"]).set_index("figure")
    assert trend.loc["mono_map", "per_step"] == pytest.approx(0.01, abs=0.002)
    assert trend.loc["mono_map", "low"] < 0.01 < trend.loc["mono_map", "high"] and trend.loc["mono_map", "p_adjusted"] < 0.01
    assert trend.loc["multi_map", "p_adjusted"] > 0.05 and (trend["runs"] == 12).all()  # ratio 1 left out
    assert "| Mo. mAP | **+0.010 [" in answer.trend_markdown(trend.reset_index(), 0.25, [0, 0.25, 0.5, 0.75])
