"""pipeline.analysis.grid: the search table (changed params, figures, frontier) from `dvc exp show` rows.
The real `dvc exp show` layout these rows copy (file-prefixed metric names) is tested in test_sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.grid import csv_table, frontier, grid_table, markdown, plot_frontier, pool_runs
from pipeline.analysis.runs import SUMMARY_FIGURES, figure_label
from pipeline.analysis.sweep import BASE_FILE, METRICS_FILE
from pipeline.common import PipelineError

BASE = {"mono_map": 0.80, "cross_map": 0.64, "multi_map": 0.30, "rank_distance": 1200.0}


def run(name: str, lr: float, negatives: str, mono: float, cross: float, multi: float, distance: float) -> dict:
    figures = {"mono_map": mono, "cross_map": cross, "multi_map": multi, "rank_distance": distance}
    return {
        "Experiment": name,
        "seed": 42,
        "train.lr": lr,
        "sampler.negatives": negatives,
        **{f"{METRICS_FILE}:xquad_r.{k}": v for k, v in figures.items()},
        **{f"{BASE_FILE}:xquad_r.{k}": v for k, v in BASE.items()},
    }


RUNS = [
    run("g-a", 3e-5, "none", 0.76, 0.66, 0.54, 380.0),
    run("g-b", 1e-5, "none", 0.79, 0.65, 0.45, 600.0),  # frontier: best Mo.
    run("g-c", 3e-5, "paragraph", 0.78, 0.67, 0.55, 370.0),  # frontier: dominates g-a
    run("other", 3e-5, "none", 0.10, 0.10, 0.10, 10.0),  # another search: not matched
    {"Experiment": "g-queued", "train.lr": 1e-4, "sampler.negatives": "none"},  # no metrics yet
]


def test_frontier_keeps_the_undominated_rows():
    figures = pd.DataFrame(
        {"mono_map": [0.7, 0.8, 0.8, 0.6], "multi_map": [0.5, 0.4, 0.4, 0.5], "rank_distance": [100.0, 200.0, 150.0, 90.0]}
    )
    # row 1 is dominated by row 2 (same maps, lower distance); row 3 trades Mo. for distance with row 0
    assert frontier(figures).tolist() == [True, False, True, True]
    assert frontier(figures.iloc[[0, 0]]).tolist() == [True, True]  # equal rows do not dominate each other


def test_grid_table_has_the_changed_params_the_figures_and_the_frontier(tmp_path):
    table = grid_table(RUNS, "xquad_r", match="g-*")
    assert table["experiment"].tolist() == ["g-b", "g-c", "g-a"]  # best Mo. first; queued and unmatched left out
    assert [c for c in table.columns if "." in c] == ["sampler.negatives", "train.lr"]  # schema order; seed is the same
    assert table["frontier"].tolist() == [True, True, False]
    assert table["base_mono_map"].tolist() == [0.80] * 3
    text = markdown(table, "xquad_r", list(SUMMARY_FIGURES))
    assert "| g-b | none | 1e-05 | 1 | 0.7900 (-0.0100) | 0.6500 (+0.0100) | 0.4500 (+0.1500) | 600.0 (-600.0) | yes |" in text
    fig = plot_frontier(table, tmp_path / "grid.png", "xquad_r")
    assert (tmp_path / "grid.png").stat().st_size > 0
    labels = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert labels == {"g-b", "g-c"}
    np.testing.assert_allclose(fig.axes[0].collections[2].get_offsets(), [[0.30, 0.80]])  # the base's star


def test_a_table_without_mono_map_and_another_figure_plots_nothing(tmp_path):
    table = grid_table(RUNS, "xquad_r", match="g-*")
    only_mono = table.drop(columns=["multi_map", "rank_distance"])
    assert plot_frontier(only_mono, tmp_path / "mono.png", "xquad_r") is None
    assert plot_frontier(table.drop(columns=["mono_map"]), tmp_path / "noise.png", "xquad_r") is None
    assert not list(tmp_path.iterdir())
    one_axis = plot_frontier(table.drop(columns=["rank_distance"]), tmp_path / "multi.png", "xquad_r")
    assert len(one_axis.axes) == 1 and one_axis.axes[0].get_xlabel() == figure_label("multi_map")


def test_no_matching_finished_run_is_one_line():
    with pytest.raises(PipelineError, match="no finished experiment named like 'h-\\*' has xquad_r metrics"):
        grid_table(RUNS, "xquad_r", match="h-*")


def test_runs_that_differ_only_in_seed_pool_into_mean_and_sd():
    seeds = [dict(run(f"g-a-s{seed}", 3e-5, "none", mono, 0.66, 0.54, 380.0), seed=seed) for seed, mono in ((42, 0.76), (43, 0.78))]
    runs = [*seeds, run("g-c", 3e-5, "paragraph", 0.775, 0.67, 0.55, 370.0)]
    figures = ["mono_map", "noise.typo_0.15.multi_drop"]
    for r, drop in zip(runs, (0.10, 0.12, 0.05)):
        r[f"{METRICS_FILE}:xquad_r.noise.typo_0.15.multi_drop"] = drop
    table = pool_runs(grid_table(runs, "xquad_r", "g-*", figures), "seed", figures)
    assert table["experiment"].tolist() == ["g-c", "g-a-s42, g-a-s43"] and table["runs"].tolist() == [1, 2]  # best Mo. first
    assert table.loc[1, "mono_map"] == pytest.approx(0.77) and table.loc[1, "mono_map_sd"] == pytest.approx(np.std([0.76, 0.78], ddof=1))
    assert table.loc[1, "noise.typo_0.15.multi_drop"] == pytest.approx(0.11)
    assert table["frontier"].tolist() == [True, False]  # g-c: more Mo. mAP than the seeds' mean and a smaller drop
    text = markdown(table, "xquad_r", figures)
    assert "| g-a-s42, g-a-s43 | none | 2 | 0.7700 ± 0.0141 (-0.0300) | 0.1100 ± 0.0141 |" in text


def grid_csv(path, rows: list[tuple]) -> None:
    """A CSV as benchmarks/in_process_grid.py writes it: name, the searched params, figures per dataset."""
    columns = ["name", "seed", "train.temperature", "sampler.steps", "final_loss", *(f"xquad_r.{k}" for k in SUMMARY_FIGURES)]
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def test_csv_grids_line_up_pool_seeds_and_take_the_base_from_eval_base(tmp_path):
    grid_csv(tmp_path / "a.csv", [("t05", 42, 0.05, 60, 0.3, 0.77, 0.67, 0.56, 360.0), ("t01", 42, 0.01, 60, 0.3, 0.81, 0.71, 0.60, 330.0)])
    grid_csv(tmp_path / "b.csv", [("t01-s43", 43, 0.01, 60, 0.5, 0.83, 0.71, 0.60, 320.0)])
    table = pool_runs(
        csv_table([tmp_path / "a.csv", tmp_path / "b.csv"], "xquad_r", list(SUMMARY_FIGURES), BASE), "seed", list(SUMMARY_FIGURES)
    )
    assert table["experiment"].tolist() == ["t01, t01-s43", "t05"] and table["runs"].tolist() == [2, 1]
    assert "sampler.steps" not in table and "final_loss" not in table  # unchanged params and other columns left out
    assert table.loc[0, "mono_map"] == pytest.approx(0.82) and table.loc[0, "mono_map_sd"] == pytest.approx(np.std([0.81, 0.83], ddof=1))
    text = markdown(table, "xquad_r", list(SUMMARY_FIGURES))
    assert "| t05 | 0.05 | 1 | 0.7700 (-0.0300) | 0.6700 (+0.0300) | 0.5600 (+0.2600) | 360.0 (-840.0) |  |" in text


def test_csv_grids_that_record_other_params_or_another_dataset_are_refused(tmp_path):
    grid_csv(tmp_path / "a.csv", [("t01", 42, 0.01, 60, 0.3, 0.81, 0.71, 0.60, 330.0)])
    pd.DataFrame({"name": ["x"], "seed": [42], **{f"xquad_r.{k}": [0.5] for k in SUMMARY_FIGURES}}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(PipelineError, match="'sampler.steps' is not recorded in every CSV"):
        csv_table([tmp_path / "a.csv", tmp_path / "b.csv"], "xquad_r", list(SUMMARY_FIGURES), BASE)
    with pytest.raises(PipelineError, match=r"a.csv: no column 'mlqa_r.mono_map'"):
        csv_table([tmp_path / "a.csv"], "mlqa_r", list(SUMMARY_FIGURES), BASE)
