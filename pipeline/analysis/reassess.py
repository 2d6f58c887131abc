"""What an earlier report's conclusions are worth once the training seeds count: a seed-level re-test.

    python -m pipeline.analysis.reassess REPORT.csv [REPORT.csv ...] [--adjust holm|fdr_bh] --out docs/results/reassessed

Reports made before issue #28 resampled question ids only, and their runs' per-query files are
gone; what they committed is each arm's seed count, mean and sd per figure. From those alone,
Welch's t-test on the per-seed figures (`scipy.stats.ttest_ind_from_stats`) asks whether the
difference exceeds what other seeds would give; p-values are adjusted over each report's rows
(a family per report, as `compare` adjusts). It leaves out the question variance the new `compare` adds, so it is
a lower bound on the uncertainty: a row that fails here fails there too. Rows with fewer than
two seeds on a side cannot be re-tested and say so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.analysis.runs import figure_label
from pipeline.analysis.seed_stats import adjust
from pipeline.common import PipelineError, run_stage, write_report

ALPHA = 0.05
COLUMNS = ("comparison", "figure", "a_seeds", "a_seeds_mean", "a_seeds_sd", "b_seeds", "b_seeds_mean", "b_seeds_sd", "significant")


def read_report(path: Path) -> pd.DataFrame:
    """A compare report's CSV, with the columns a seed-level re-test needs."""
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PipelineError(f"{path}: cannot read a compare report ({str(err).splitlines()[0]})") from None
    missing = [column for column in COLUMNS if column not in table]
    if missing:
        raise PipelineError(f"{path}: no column '{missing[0]}' (a CSV written by pipeline.analysis.compare?)")
    return table.assign(report=path.stem)


def reassess(table: pd.DataFrame, adjustment: str = "holm") -> pd.DataFrame:
    """Each row's seed-level Welch test, adjusted over the whole table, beside what the report said."""
    testable = (table["a_seeds"] >= 2) & (table["b_seeds"] >= 2)
    side = {column: table[column].to_numpy(float) for column in COLUMNS[2:8]}
    result = stats.ttest_ind_from_stats(
        side["b_seeds_mean"], side["b_seeds_sd"], side["b_seeds"], side["a_seeds_mean"], side["a_seeds_sd"], side["a_seeds"], equal_var=False
    )  # fmt: skip
    p = np.where(testable, result.pvalue, np.nan)
    out = table[["report", "comparison", "figure"]].assign(
        difference=table["b_seeds_mean"] - table["a_seeds_mean"], seeds=table["a_seeds"].astype(str) + " vs " + table["b_seeds"].astype(str)
    )
    out["seed_p"] = p
    out["seed_p_adjusted"] = np.nan
    for _, rows in out[testable].groupby("report"):  # a family per report, as compare adjusts over its own
        out.loc[rows.index, "seed_p_adjusted"] = adjust(rows["seed_p"].to_numpy(), adjustment)
    out["was_significant"] = table["significant"].astype(bool)
    out["holds_unadjusted"] = np.where(testable, out["was_significant"] & (out["seed_p"] < ALPHA), np.nan)
    out["holds"] = np.where(testable, out["was_significant"] & (out["seed_p_adjusted"] < ALPHA), np.nan)
    return out


def markdown(table: pd.DataFrame, header: str) -> str:
    """A summary per report (how many of the differences it called significant still hold), then every row."""
    called = table[table["was_significant"] & table["holds"].notna()]
    lines = [header, "", "| report | called significant | hold at seed level (p < 0.05) | hold after the report's adjustment |"]
    lines.append("|---|---:|---:|---:|")
    for report, rows in called.groupby("report", sort=False):
        lines.append(
            f"| {report} | {len(rows)} | {int(rows['holds_unadjusted'].astype(bool).sum())} | {int(rows['holds'].astype(bool).sum())} |"
        )
    lines += ["", "| report | comparison | figure | seeds | B − A | seed-level p | adjusted p | was significant | holds |"]
    lines.append("|---|---|---|---|---:|---:|---:|---|---|")
    for _, r in table.iterrows():
        tested = not pd.isna(r["seed_p"])
        p = f"{r['seed_p']:.4f} | {r['seed_p_adjusted']:.4f}" if tested else "— | —"
        holds = ("yes" if r["holds"] else "no") if tested else "—"
        digits = 2 if r["figure"] == "rank_distance" else 4
        lines.append(
            f"| {r['report']} | {r['comparison']} | {figure_label(r['figure'])} | {r['seeds']} | {r['difference']:+.{digits}f} | {p} | "
            f"{'yes' if r['was_significant'] else 'no'} | {holds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="CSVs written by pipeline.analysis.compare")
    parser.add_argument("--adjust", choices=("holm", "fdr_bh"), default="holm")
    parser.add_argument("--out", default="docs/results/reassessed")
    args = parser.parse_args()
    table = reassess(pd.concat([read_report(path) for path in args.reports], ignore_index=True), args.adjust)
    header = (
        f"Seed-level Welch t-tests of earlier reports' differences from their committed per-arm seed means and sds, "
        f"p adjusted by {args.adjust} over each report's testable rows (a family per report); question variance left out "
        f"(a lower bound on the uncertainty)"
    )
    text = markdown(table, header)
    write_report(args.out, text, table)
    print(text, end="")
    print(f"wrote {args.out}.md and {args.out}.csv")


if __name__ == "__main__":
    run_stage(main)
