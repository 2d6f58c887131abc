"""The table of a search: every experiment's changed params and figures, and its frontier.

    python -m pipeline.analysis.grid [--match 'g-*'] [--num 1] [--dataset xquad_r] [--figures mono_map,...]
                            [--group seed] [--out docs/grid] [--csv GRID.csv ...]

Reads every experiment of the last `--num` commits (-1: all) through `dvc.api.exp_show`
(as `pipeline.analysis.sweep` does), keeps those whose name matches `--match` (a glob), and writes
`<out>.md` and `<out>.csv`: one row per experiment with the params that differ between
the kept runs, the fine-tuned model's headline figures and their change from the zero-shot
base, and whether the run is on the frontier (no other run is at least as good on Mo.,
Cr. and Mul. mAP and rank distance and better on one). `<out>.png` plots Mo. against
Mul. mAP and rank distance, the frontier labelled, the base marked, so a user can choose.
`--figures` picks other metrics (e.g. `noise.typo_0.15.multi_drop`; drops and rank distance
count lower as better); `--group seed` pools runs that differ only in `seed` (mean ± sd).
`--csv` reads the CSVs of benchmarks/in_process_grid.py (runs made without DVC) instead.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.analysis.runs import (
    BASE_FILE,
    METRICS_FILE,
    SUMMARY_FIGURES,
    exp_metric,
    exp_param,
    figure_label,
    lower_is_better,
    metrics_file,
)
from pipeline.common import PipelineError, run_stage, write_figure, write_report, write_table
from pipeline.params import SCHEMA


def grid_table(experiments: list[dict], dataset: str, match: str = "*", figures: list[str] | None = None) -> pd.DataFrame:
    """One row per named, finished experiment matching `match`: changed params, figures, base figures."""
    figures = figures or list(SUMMARY_FIGURES)
    rows = []
    for exp in experiments:
        name = exp.get("Experiment")
        if not name or not fnmatch.fnmatch(name, match):
            continue
        metrics = metrics_file(dataset)
        values = {key: exp_metric(exp, f"{dataset}.{key}", metrics, metrics) for key in figures}
        if None in values.values():
            continue  # queued, failed, or evaluated on other datasets
        base = {f"base_{key}": exp_metric(exp, f"{dataset}.{key}", BASE_FILE, metrics) for key in figures}
        params = {key: exp_param(exp, key) for key in SCHEMA}
        rows.append(
            {"experiment": name, "commit": exp.get("rev"), **params, **values, **{k: np.nan if v is None else v for k, v in base.items()}}
        )
    if not rows:
        raise PipelineError(f"no finished experiment named like '{match}' has {dataset} metrics {', '.join(figures)} in {METRICS_FILE}")
    table = pd.DataFrame(rows)
    changed = [key for key in SCHEMA if table[key].astype(str).nunique() > 1]
    runs = table[["experiment", "commit", *[key for key in ("seed", *changed) if key in table][: len(changed) + 1], *figures]]
    table = table[["experiment", *changed, *figures, *(f"base_{k}" for k in figures)]]
    table.insert(len(changed) + 1, "runs", 1)
    table.attrs["runs"] = runs.loc[:, ~runs.columns.duplicated()]  # every run's commit, seed and figures: the per-run table
    return finish(table, figures)


def csv_table(paths: list[Path], dataset: str, figures: list[str], base: dict) -> pd.DataFrame:
    """The same table from benchmarks/in_process_grid.py's CSVs (runs made without DVC, e.g. on a
    GPU machine); the base's figures are `base`'s (metrics/eval_base.json's entry for `dataset`)."""
    frames = []
    for path in paths:
        try:
            frames.append(pd.read_csv(path))
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise PipelineError(f"{path}: cannot read a grid CSV ({str(err).splitlines()[0]})") from None
        missing = [column for column in ("name", *(f"{dataset}.{f}" for f in figures)) if column not in frames[-1]]
        if missing:
            raise PipelineError(f"{path}: no column '{missing[0]}' (a CSV of benchmarks/in_process_grid.py scored on {dataset}?)")
    table = pd.concat(frames, ignore_index=True).rename(columns={"name": "experiment"})
    params = [key for key in SCHEMA if key in table]
    unknown = [key for key in params if table[key].isna().any()]
    if unknown:
        raise PipelineError(f"{paths[0]}: '{unknown[0]}' is not recorded in every CSV; compare grids that record the same params")
    changed = [key for key in params if table[key].astype(str).nunique() > 1]
    result = table[["experiment", *changed]].assign(
        runs=1,
        **{key: table[f"{dataset}.{key}"] for key in figures},
        **{f"base_{key}": float(base.get(key, np.nan)) for key in figures},
    )
    return finish(result, figures)


def pool_runs(table: pd.DataFrame, key: str, figures: list[str]) -> pd.DataFrame:
    """Runs that differ only in param `key` (e.g. seed) pooled into one row: the mean of each
    figure, its sd across the runs (`<figure>_sd`), and the number of runs."""
    if key not in table:
        return table  # every run has the same `key`: nothing to pool
    params = [c for c in table.columns[1 : table.columns.get_loc("runs")] if c != key]
    groups = table.groupby([table[p].astype(str) for p in params], sort=False) if params else table.groupby(lambda _: 0)
    pooled = groups.agg(
        experiment=("experiment", lambda names: ", ".join(sorted(names))),
        **{p: (p, "first") for p in params},
        runs=("experiment", "size"),
        **{f: (f, "mean") for f in figures},
        **{f"{f}_sd": (f, "std") for f in figures},
        **{f"base_{f}": (f"base_{f}", "mean") for f in figures},
    )
    return finish(pooled.reset_index(drop=True), figures)


def finish(table: pd.DataFrame, figures: list[str]) -> pd.DataFrame:
    table["frontier"] = frontier(table[figures])
    return table.sort_values(figures[0], ascending=lower_is_better(figures[0]), kind="stable").reset_index(drop=True)


def frontier(figures: pd.DataFrame) -> np.ndarray:
    """True for rows no other row dominates (at least as good on every figure, better on one)."""
    signed = figures.to_numpy(float) * np.array([-1.0 if lower_is_better(key) else 1.0 for key in figures.columns])
    at_least = (signed[None, :, :] >= signed[:, None, :]).all(axis=2)  # [i, j]: j at least as good as i everywhere
    better = (signed[None, :, :] > signed[:, None, :]).any(axis=2)
    return ~(at_least & better).any(axis=1)


def markdown(table: pd.DataFrame, dataset: str, figures: list[str]) -> str:
    params = list(table.columns[1 : table.columns.get_loc("runs")])
    head = ["experiment", *params, "runs", *(f"{figure_label(f)} (Δ base)" for f in figures), "frontier"]
    spread = " ± sd over runs," if (table["runs"] > 1).any() else ""
    lines = [
        f"{dataset}: {len(table)} rows, best {figure_label(figures[0])} first;{spread} Δ base = change from the zero-shot base",
        "",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        cells = [row["experiment"], *(str(row[p]) for p in params), str(row["runs"])]
        for key in figures:
            digits = 1 if key == "rank_distance" else 4
            sd = f" ± {row[f'{key}_sd']:.{digits}f}" if f"{key}_sd" in row and not np.isnan(row[f"{key}_sd"]) else ""
            delta = row[key] - row[f"base_{key}"]
            cells.append(f"{row[key]:.{digits}f}{sd}" + ("" if np.isnan(delta) else f" ({delta:+.{digits}f})"))
        cells.append("yes" if row["frontier"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(table: pd.DataFrame, path: Path, dataset: str):
    """Mo. mAP against Mul. mAP and against rank distance; frontier runs labelled, the base a star.

    Writes nothing and returns None when the table lacks Mo. mAP or both others (e.g. a
    `--figures` of noise drops): an empty chart would only look like a result.
    """
    axes_keys = [key for key in ("multi_map", "rank_distance") if key in table]
    if "mono_map" not in table or not axes_keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(axes_keys), figsize=(5 * len(axes_keys), 4.2), squeeze=False)
    axes = axes[0]
    for ax, key in zip(axes, axes_keys):
        on = table["frontier"].to_numpy(bool)
        ax.scatter(table.loc[~on, key], table.loc[~on, "mono_map"], color="grey", s=18, label="run")
        ax.scatter(table.loc[on, key], table.loc[on, "mono_map"], color="C0", s=30, label="frontier")
        for _, row in table[on].iterrows():
            ax.annotate(row["experiment"], (row[key], row["mono_map"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        base = table[[f"base_{key}", "base_mono_map"]].dropna().drop_duplicates()
        ax.scatter(base[f"base_{key}"], base["base_mono_map"], marker="*", s=120, color="C3", label="zero-shot base")
        ax.set_xlabel(figure_label(key) + (" (lower is better)" if lower_is_better(key) else ""))
        ax.set_ylabel("Mo. mAP")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{dataset}: what each run trades", fontsize=10)
    fig.tight_layout()
    write_figure(fig, path)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", default="*", help="glob over experiment names")
    parser.add_argument("--num", type=int, default=1, help="experiments of the last NUM commits (-1: all)")
    parser.add_argument("--dataset", default="xquad_r")
    parser.add_argument("--figures", default=",".join(SUMMARY_FIGURES), help="comma-separated metric names under the dataset")
    parser.add_argument("--group", default=None, help="pool runs that differ only in this param (e.g. seed)")
    parser.add_argument("--out", default="docs/grid")
    parser.add_argument("--csv", nargs="+", type=Path, help="read these benchmarks/in_process_grid.py CSVs instead of experiments")
    args = parser.parse_args()
    figures = args.figures.split(",")
    if args.csv:
        base = json.loads(Path(BASE_FILE).read_text(encoding="utf-8")).get(args.dataset, {}) if Path(BASE_FILE).exists() else {}
        table = csv_table(args.csv, args.dataset, figures, base)
    else:
        import dvc.api

        table = grid_table(dvc.api.exp_show(num=args.num), args.dataset, args.match, figures)
    if "runs" in table.attrs:
        write_table(f"{args.out}_runs.csv", table.attrs["runs"])
    if args.group:
        table = pool_runs(table, args.group, figures)
    text = markdown(table, args.dataset, figures)
    write_report(args.out, text, table)
    plotted = plot_frontier(table, Path(f"{args.out}.png"), args.dataset) is not None
    print(text, end="")
    runs = f", {args.out}_runs.csv" if not args.csv else ""
    print(f"wrote {args.out}.md, {args.out}.csv{runs}" + (f" and {args.out}.png" if plotted else " (no Mo. mAP to plot against)"))


if __name__ == "__main__":
    run_stage(main)
