"""Plot the sampler sweep: Mo./Cr./Mul. mAP and rank distance against `sampler.ratio`, across experiments.

Run after a sweep (README, Experiments):

    python -m pipeline.sweep [--dataset xquad_r] [--out metrics/sweep]

It reads every experiment of the current commit through `dvc.api.exp_show` and writes
`<out>.csv` (one row per experiment) and `<out>.png`. `sampler.unit: pair` runs are
drawn as separate markers, the zero-shot base model as dashed lines.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from pipeline.common import PipelineError, atomic_path, run_stage

FIGURES = {"mono_map": "Mo. mAP", "cross_map": "Cr. mAP", "multi_map": "Mul. mAP", "rank_distance": "rank distance"}


def sweep_table(experiments: list[dict], dataset: str) -> pd.DataFrame:
    """One row per finished experiment: name, ratio, unit, the dataset's headline figures and the base's."""
    rows = []
    for exp in experiments:
        ratio = exp.get("sampler.ratio")
        if ratio is None or exp.get(f"{dataset}.multi_map") is None:
            continue  # queued, failed, or evaluated on other datasets
        row = {"experiment": exp.get("Experiment") or exp.get("rev"), "ratio": float(ratio),
               "unit": exp.get("sampler.unit", "batch")}
        for key in FIGURES:
            row[key] = exp.get(f"{dataset}.{key}")
        rows.append(row)
    if not rows:
        raise PipelineError(f"no finished experiment has {dataset} metrics (run the sweep in README first)")
    return pd.DataFrame(rows).drop_duplicates(["ratio", "unit", *FIGURES]).sort_values(["unit", "ratio"])


def plot_sweep(table: pd.DataFrame, base: dict | None, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FIGURES), figsize=(4 * len(FIGURES), 3.4))
    for ax, (key, label) in zip(axes, FIGURES.items()):
        for unit, rows in table.groupby("unit"):
            style = "o-" if unit == "batch" else "s"
            ax.plot(rows["ratio"], rows[key], style, label=f"unit={unit}")
        if base and base.get(key) is not None and not math.isnan(base[key]):
            ax.axhline(base[key], color="grey", linestyle="--", label="zero-shot base")
        ax.set_xlabel("sampler.ratio (share of monolingual batches)")
        ax.set_title(f"{dataset}: {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    import json

    import dvc.api

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="xquad_r")
    parser.add_argument("--out", default="metrics/sweep")
    args = parser.parse_args()
    table = sweep_table(dvc.api.exp_show(), args.dataset)
    base_file = Path("metrics/eval_base.json")
    base = json.loads(base_file.read_text()).get(args.dataset) if base_file.exists() else None
    with atomic_path(f"{args.out}.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot_sweep(table, base, Path(f"{args.out}.png"), args.dataset)
    print(table.to_string(index=False))
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    run_stage(main)
