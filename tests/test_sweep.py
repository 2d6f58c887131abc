"""The sweep table/plot across experiments, from records shaped like `dvc.api.exp_show()`."""
import pytest

from pipeline.common import PipelineError
from pipeline.sweep import plot_sweep, sweep_table


def record(name, ratio, unit, multi):
    return {"Experiment": name, "sampler.ratio": ratio, "sampler.unit": unit, "xquad_r.mono_map": 0.6,
            "xquad_r.cross_map": 0.5, "xquad_r.multi_map": multi, "xquad_r.rank_distance": 100.0}


def test_sweep_table_keeps_finished_runs_sorted_by_unit_and_ratio(tmp_path):
    experiments = [
        record("hybrid", 0.5, "batch", 0.40),
        record("mono", 1.0, "batch", 0.30),
        record("pairwise", 0.5, "pair", 0.35),
        {"Experiment": "queued", "sampler.ratio": 0.0, "sampler.unit": "batch"},  # no metrics yet
        record("xy", 0.0, "batch", 0.45),
    ]
    table = sweep_table(experiments, "xquad_r")
    assert table["experiment"].tolist() == ["xy", "hybrid", "mono", "pairwise"]
    assert table["multi_map"].tolist() == [0.45, 0.40, 0.30, 0.35]
    plot_sweep(table, {"mono_map": 0.5, "cross_map": 0.4, "multi_map": 0.2, "rank_distance": 900.0},
               tmp_path / "sweep.png", "xquad_r")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_without_finished_runs_says_so():
    with pytest.raises(PipelineError, match="no finished experiment has mlqa_r metrics"):
        sweep_table([record("a", 0.5, "batch", 0.4)], "mlqa_r")
