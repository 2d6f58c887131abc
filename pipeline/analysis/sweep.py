"""Plot the sampler sweep: Mo./Cr./Mul. mAP and rank distance against `sampler.ratio`, across experiments.

Run after a sweep (README, Experiments):

    python -m pipeline.analysis.sweep [--dataset xquad_r] [--out metrics/sweep]

It reads every experiment of the current commit through `dvc.api.exp_show` and writes
`<out>.csv` (one row per experiment) and `<out>.png`: one line per `sampler.schedule`
(`pair` runs as separate markers), the zero-shot base model (metrics/eval_base.json) dashed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from pipeline.analysis.runs import BASE_FILE, METRICS_FILE, SUMMARY_FIGURES, exp_metric, exp_param, figure_label, number
from pipeline.common import PipelineError, atomic_path, run_stage, write_figure


def _schedule(exp: dict) -> str:
    """sampler.schedule; a run from before it has sampler.unit instead (unit batch = schedule hybrid)."""
    schedule = exp_param(exp, "sampler.schedule")
    if schedule:
        return schedule
    return "pair" if exp_param(exp, "sampler.unit") == "pair" else "hybrid"


def sweep_table(experiments: list[dict], dataset: str, unprefixed: str = METRICS_FILE) -> pd.DataFrame:
    """One row per finished experiment: name, ratio, schedule, the fine-tuned model's headline figures
    (from metrics/eval.json) and the base's (`base_<figure>`, from metrics/eval_base.json; NaN if absent),
    sorted by schedule and ratio. The workspace row repeats the experiment applied to it: it is dropped
    in favour of the named one."""
    rows = []
    for exp in experiments:
        ratio = number(exp_param(exp, "sampler.ratio"))
        figures = {key: exp_metric(exp, f"{dataset}.{key}", METRICS_FILE, unprefixed) for key in SUMMARY_FIGURES}
        if ratio is None or figures["multi_map"] is None:
            continue  # queued, failed, or evaluated on other datasets
        figures |= {f"base_{key}": exp_metric(exp, f"{dataset}.{key}", BASE_FILE, unprefixed) for key in SUMMARY_FIGURES}
        rows.append(
            {
                "experiment": exp.get("Experiment") or exp.get("rev"),
                "ratio": ratio,
                "schedule": _schedule(exp),
                **{k: float("nan") if v is None else v for k, v in figures.items()},
                "named": bool(exp.get("Experiment")),
            }
        )
    if not rows:
        raise PipelineError(f"no finished experiment has {dataset} metrics in {METRICS_FILE} (run the sweep in README first)")
    table = pd.DataFrame(rows).sort_values("named", ascending=False, kind="stable")
    table = table.drop_duplicates(["ratio", "schedule", *SUMMARY_FIGURES]).drop(columns="named")
    return table.sort_values(["schedule", "ratio"], kind="stable").reset_index(drop=True)


def plot_sweep(table: pd.DataFrame, path: Path, dataset: str, base: dict | None = None):
    """Each figure against the ratio, one line per schedule; the base model dashed, from the table's
    base_ columns, else from `base`. Returns the matplotlib figure (closed) for inspection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SUMMARY_FIGURES), figsize=(4 * len(SUMMARY_FIGURES), 3.4))
    for ax, key in zip(axes, SUMMARY_FIGURES):
        for schedule, rows in table.groupby("schedule"):
            style = "s" if schedule == "pair" else "o-"
            ax.plot(rows["ratio"], rows[key], style, label=f"schedule={schedule}")
        levels = sorted(set(table[f"base_{key}"].dropna())) if f"base_{key}" in table else []
        if not levels and base and number(base.get(key)) is not None and not math.isnan(base[key]):
            levels = [base[key]]
        for i, level in enumerate(levels):  # one level unless runs used different base models
            ax.axhline(level, color="grey", linestyle="--", label="zero-shot base" if i == 0 else None)
        ax.set_xlabel("sampler.ratio (share of monolingual batches)")
        ax.set_title(f"{dataset}: {figure_label(key)}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    write_figure(fig, path)
    return fig


def main() -> None:
    import json

    import dvc.api

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="xquad_r")
    parser.add_argument("--out", default="metrics/sweep")
    args = parser.parse_args()
    local = {}
    for file in (METRICS_FILE, BASE_FILE):
        path = Path(file)
        local[file] = json.loads(path.read_text()).get(args.dataset) if path.exists() else None
    # A bare column name belongs to the one metrics file that has it in some row of the table;
    # the workspace is a row, so the workspace's files say which (eval.json unless only the
    # base model was evaluated here).
    unprefixed = BASE_FILE if local[BASE_FILE] and not local[METRICS_FILE] else METRICS_FILE
    table = sweep_table(dvc.api.exp_show(), args.dataset, unprefixed)
    with atomic_path(f"{args.out}.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot_sweep(table, Path(f"{args.out}.png"), args.dataset, local[BASE_FILE])
    print(table.to_string(index=False))
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    run_stage(main)
