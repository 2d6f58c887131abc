"""The sweep table/plot across experiments: records made by hand, and a real `dvc exp show`
table from a throwaway git+DVC repo whose stage writes both metrics files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.analysis.sweep import BASE_FILE, METRICS_FILE, plot_sweep, sweep_table
from pipeline.common import PipelineError

FIGURES = ("mono_map", "cross_map", "multi_map", "rank_distance")


def record(name, ratio, schedule, multi, prefix=""):
    return {
        "Experiment": name,
        "sampler.ratio": ratio,
        "sampler.schedule": schedule,
        f"{prefix}xquad_r.mono_map": 0.6,
        f"{prefix}xquad_r.cross_map": 0.5,
        f"{prefix}xquad_r.multi_map": multi,
        f"{prefix}xquad_r.rank_distance": 100.0,
    }


def before_schedules(record: dict, unit: str) -> dict:
    """An experiment run before sampler.schedule replaced sampler.unit."""
    return {**{k: v for k, v in record.items() if k != "sampler.schedule"}, "sampler.unit": unit}


def test_sweep_table_keeps_finished_runs_sorted_by_schedule_and_ratio():
    experiments = [
        record("hybrid", 0.5, "hybrid", 0.40),
        record("mono", 1, "hybrid", 0.30),
        record("pairwise", 0.5, "pair", 0.35),
        {"Experiment": "queued", "sampler.ratio": 0.0, "sampler.schedule": "hybrid"},  # no metrics yet
        record("failed", 0.25, "hybrid", "!"),  # exp show's mark for an unreadable metrics file
        record("xy", 0.0, "hybrid", 0.45),
        record("sequential", 0.5, "sequential", 0.41),
        before_schedules(record("old-pairwise", 0.25, "", 0.33), "pair"),
        before_schedules(record("old-hybrid", 0.25, "", 0.38), "batch"),
    ]
    table = sweep_table(experiments, "xquad_r")
    assert table["experiment"].tolist() == ["xy", "old-hybrid", "hybrid", "mono", "old-pairwise", "pairwise", "sequential"]
    assert table["schedule"].tolist() == ["hybrid"] * 4 + ["pair"] * 2 + ["sequential"]
    assert table["multi_map"].tolist() == [0.45, 0.38, 0.40, 0.30, 0.33, 0.35, 0.41]
    assert table["base_multi_map"].isna().all()  # no eval_base columns


def test_prefixed_columns_take_eval_json_and_base_from_eval_base():
    fine = record("hybrid", 0.5, "hybrid", 0.40, prefix=f"{METRICS_FILE}:")
    base = record("hybrid", 0.5, "hybrid", 0.25, prefix=f"{BASE_FILE}:")
    both = {**base, **fine}
    both["params.yaml:sampler.ratio"] = both.pop("sampler.ratio")  # another params file has it too
    both["other.yaml:sampler.ratio"] = 9.0
    table = sweep_table([both], "xquad_r")
    assert table.loc[0, ["ratio", "multi_map", "base_multi_map"]].tolist() == [0.5, 0.40, 0.25]
    # A bare name is one file's only: when that file is eval_base.json, it is not the fine-tuned model's.
    with pytest.raises(PipelineError, match="no finished experiment has xquad_r metrics in metrics/eval.json"):
        sweep_table([record("a", 0.5, "hybrid", 0.4)], "xquad_r", unprefixed=BASE_FILE)


def test_sweep_without_finished_runs_says_so():
    with pytest.raises(PipelineError, match="no finished experiment has mlqa_r metrics"):
        sweep_table([record("a", 0.5, "hybrid", 0.4)], "mlqa_r")


# --- a real experiment table ------------------------------------------------------------

# The stage: fine-tuned figures depend on the params, the base's do not (as in the project).
WRITE_METRICS = (
    "import json, os, yaml; s = yaml.safe_load(open('params.yaml'))['sampler']; r = s['ratio']; "
    "pair = 0.01 if s['schedule'] == 'pair' else 0.0; os.makedirs('metrics', exist_ok=True); "
    "json.dump({'xquad_r': {'mono_map': 0.7 + 0.1 * r, 'cross_map': 0.7 - 0.1 * r, "
    "'multi_map': 0.5 - 0.2 * r + pair, 'rank_distance': 300 + 200 * r}}, open('metrics/eval.json', 'w')); "
    "json.dump({'xquad_r': {'mono_map': 0.65, 'cross_map': 0.55, 'multi_map': 0.25, 'rank_distance': 900}}, "
    "open('metrics/eval_base.json', 'w'))"
)


def fine_tuned(ratio, schedule):
    pair = 0.01 if schedule == "pair" else 0.0
    return {
        "mono_map": 0.7 + 0.1 * ratio,
        "cross_map": 0.7 - 0.1 * ratio,
        "multi_map": 0.5 - 0.2 * ratio + pair,
        "rank_distance": 300 + 200 * ratio,
    }


def _run(repo: Path, *cmd: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """`dvc.api.exp_show` of a repo with a committed baseline (ratio 0.5) and three experiments."""
    import dvc.api

    repo = tmp_path_factory.mktemp("sweep")
    dvc_cmd = (sys.executable, "-m", "dvc")
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "config", "user.name", "test")
    _run(repo, "git", "config", "user.email", "test@example.com")
    _run(repo, *dvc_cmd, "init", "-q")
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "sampler": {"ratio": 0.5, "schedule": "hybrid"}}))
    (repo / "extra.yaml").write_text(yaml.safe_dump({"sampler": {"ratio": 9.0}}))  # a decoy: prefixes the param
    stage = {
        "cmd": f'{sys.executable} -c "{WRITE_METRICS}"',
        "params": ["seed", "sampler.ratio", "sampler.schedule", {"extra.yaml": ["sampler.ratio"]}],
        "metrics": [{METRICS_FILE: {"cache": False}}, {BASE_FILE: {"cache": False}}],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stage}}, sort_keys=False))
    _run(repo, *dvc_cmd, "repro", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline")
    for name, args in (
        ("xy", ["-S", "sampler.ratio=0"]),
        ("mono", ["-S", "sampler.ratio=1"]),
        ("pairwise", ["-S", "sampler.schedule=pair", "-S", "sampler.ratio=0.5"]),
    ):
        _run(repo, *dvc_cmd, "exp", "run", "-q", "-n", name, *args)
    return dvc.api.exp_show(repo=str(repo))


@pytest.mark.slow
def test_sweep_table_reads_a_real_exp_show_table(experiments):
    columns = set().union(*experiments)
    # The premise: DVC prefixes every shared metric name, and the param another params file has too.
    assert {f"{METRICS_FILE}:xquad_r.multi_map", f"{BASE_FILE}:xquad_r.multi_map"} <= columns
    assert "xquad_r.multi_map" not in columns and "params.yaml:sampler.ratio" in columns
    table = sweep_table(experiments, "xquad_r")
    # The workspace row repeats `pairwise` (the last run is applied to it): it is dropped.
    assert table["experiment"].tolist()[0] == "xy" and table["experiment"].tolist()[2:] == ["mono", "pairwise"]
    assert table["experiment"].tolist()[1] not in ("workspace", "xy", "mono", "pairwise")  # the baseline commit
    assert list(zip(table["schedule"], table["ratio"])) == [("hybrid", 0.0), ("hybrid", 0.5), ("hybrid", 1.0), ("pair", 0.5)]
    for _, row in table.iterrows():
        want = fine_tuned(row["ratio"], row["schedule"])
        for key in FIGURES:
            assert row[key] == pytest.approx(want[key]), (row["experiment"], key)
    assert table["base_multi_map"].tolist() == [0.25] * 4
    assert table["base_rank_distance"].tolist() == [900] * 4


def test_plot_sweep_draws_the_fine_tuned_lines_and_the_base(experiments, tmp_path):
    table = sweep_table(experiments, "xquad_r")
    fig = plot_sweep(table, tmp_path / "sweep.png", "xquad_r")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ax, key in zip(fig.axes, FIGURES):
        batch, pair, base = ax.get_lines()
        assert batch.get_label() == "schedule=hybrid" and pair.get_label() == "schedule=pair"
        assert list(batch.get_xdata()) == [0.0, 0.5, 1.0]
        assert np.asarray(batch.get_ydata()) == pytest.approx([fine_tuned(r, "hybrid")[key] for r in (0.0, 0.5, 1.0)])
        assert np.asarray(pair.get_ydata()) == pytest.approx([fine_tuned(0.5, "pair")[key]])
        assert base.get_label() == "zero-shot base" and base.get_linestyle() == "--"
        assert base.get_ydata()[0] == table[f"base_{key}"].iloc[0]
    assert fig.axes[2].get_title() == "xquad_r: Mul. mAP"
