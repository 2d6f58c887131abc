"""Compare training recipes over seeds and questions: each difference with an interval and a test that carry both.

    python -m pipeline.analysis.compare A B [C ...] [--dataset xquad_r] [--queries-dir metrics/eval_queries]
                               [--out docs/compare] [--group seed] [--against A] [--resamples 10000]
                               [--adjust holm|fdr_bh] [--seed 0]

Each entry is a DVC experiment name, a git revision or `workspace`, optionally followed by
`:DIR` to read another folder of per-query files (`workspace:metrics/eval_base_queries` is the
zero-shot base) and preceded by `LABEL=`, which names it in the tables; entries sharing a
label are one arm, its runs the recipe's seeds. Past revisions are read through
`dvc.api.open`, from the DVC cache: nothing is re-run. `--group seed` pools entries whose
params differ only in `seed`. `--against LABEL` compares every other entry with that one only.

What a user asks is whether a recipe is better, not whether three trained models are: so the
uncertainty of each difference has two parts, the training seeds (how far each arm's mean
would move with other seeds, from its runs' own figures) and the questions (resampled by
paragraph: questions of one paragraph share candidates and rise and fall together), combined
in one t procedure (pipeline/analysis/seed_stats.py) that gives the interval and the p-value.
p-values are adjusted over every comparison x figure of the report (Holm, or Benjamini–Hochberg
with `--adjust fdr_bh`), and each reported interval is the one compatible with that decision.
An arm of a single run has no seed variance to measure: the output says so.

It writes `<out>.md` (the table), `<out>.csv`, `<out>_runs.csv` (every run's commit, seed and
own figures, from which each mean ± sd is recomputed) and `<out>.png` (a forest plot), and
prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import math
import textwrap
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.analysis import seed_stats
from pipeline.analysis.runs import figure_label, label_groups, params_at, parse_entry, read_queries, run_rows
from pipeline.common import PipelineError, run_stage, write_figure, write_report, write_table


class FigureSpec(NamedTuple):
    """A figure of per-query rows: the macro-average over the setting's cells (mono: languages X of
    (X, X); cross: ordered pairs X != Y; multi: query languages X) of the cell's mean `column`, as
    `evaluate` computes them for metrics/eval.json; `query_langs` keeps the cells of those query
    languages only (a resource class's figure), None every one."""

    setting: str
    column: str
    query_langs: frozenset[str] | None = None


# The headline figures a comparison reports by default.
FIGURES = {
    "mono_map": FigureSpec("mono", "ap"),
    "cross_map": FigureSpec("cross", "ap"),
    "multi_map": FigureSpec("multi", "ap"),
    "multi_recall_at_10": FigureSpec("multi", "recall_at_10"),
    "rank_distance": FigureSpec("multi", "rank_distance"),
}
ALPHA = 0.05
ADJUSTMENT_NAMES = {"holm": "Holm (family-wise error)", "fdr_bh": "Benjamini–Hochberg (false discovery rate)"}


def cells(table: pd.DataFrame, figures: dict[str, FigureSpec] = FIGURES) -> pd.DataFrame:
    """Long form of a per-query table: question_id, column ('figure|cell'), value; nulls dropped."""
    setting = table["setting"].to_numpy(object)
    query, passage = table["query_lang"].to_numpy(object), table["passage_lang"].to_numpy(object)
    ids = table["question_id"].to_numpy(object)
    parts = []
    for figure, (name, column, query_langs) in figures.items():
        values = table[column].to_numpy(float)
        rows = (setting == name) & ~np.isnan(values)
        if query_langs is not None:
            rows &= np.isin(query, list(query_langs))
        if name == "mono":
            rows &= query == passage
            cell = query[rows]
        elif name == "cross":
            rows &= query != passage
            cell = query[rows] + ">" + passage[rows]
        else:
            cell = query[rows]
        parts.append((ids[rows], figure + "|" + cell, values[rows]))
    return pd.DataFrame({key: np.concatenate([part[k] for part in parts]) for k, key in enumerate(("question_id", "column", "value"))})


def headline(table: pd.DataFrame, figures: dict[str, FigureSpec] = FIGURES) -> dict[str, float]:
    """The figures of one per-query table (NaN for a figure without rows)."""
    means = cells(table, figures).groupby("column")["value"].mean()
    figure = means.index.str.split("|").str[0]
    return {name: float(means[figure == name].mean()) if (figure == name).any() else float("nan") for name in figures}


@dataclass
class Layout:
    """Which question ids (rows) and cells (columns) the matrices of every entry share."""

    ids: pd.Index
    columns: pd.Index  # 'figure|cell', grouped by figure in FIGURES order
    figures: list[str]  # figures with at least one shared cell
    groups: list[np.ndarray]  # per figure, its column positions


def layout(tables: list[tuple[str, pd.DataFrame]], names: tuple[str, ...] = tuple(FIGURES)) -> tuple[Layout, list[str]]:
    """The question ids and cells every table has (a paired comparison needs the same units),
    and notes on what was left out."""
    own_ids = [(name, pd.Index(long["question_id"].unique())) for name, long in tables]
    for (first, a), (second, b) in itertools.combinations(own_ids, 2):
        if not a.intersection(b).size:
            raise PipelineError(f"{first} and {second} have no question id in common (different datasets or evaluation subsets?)")
    ids = own_ids[0][1]
    for _, own in own_ids[1:]:
        ids = ids.intersection(own)
    if not ids.size:
        raise PipelineError(f"no question id is in every one of {', '.join(n for n, _ in tables)}")
    notes = []
    dropped = max(len(own) for _, own in own_ids) - len(ids)
    if dropped:
        notes.append(f"{dropped} question ids not in every entry were left out ({len(ids)} compared)")
    columns = None
    for _, long in tables:
        own = pd.Index(long["column"].unique())
        columns = own if columns is None else columns.intersection(own)
    every = set().union(*(set(long["column"].unique()) for _, long in tables))
    if len(every) > len(columns):
        notes.append(f"{len(every) - len(columns)} language cells not in every entry were left out")
    order = {name: i for i, name in enumerate(names)}
    columns = pd.Index(sorted(columns, key=lambda c: (order[c.split("|")[0]], c)))
    of_column = np.array([c.split("|")[0] for c in columns])
    figures = [f for f in names if (of_column == f).any()]
    return Layout(ids, columns, figures, [np.flatnonzero(of_column == f) for f in figures]), notes


def matrices(long: pd.DataFrame, lay: Layout) -> np.ndarray:
    """[n_ids, 2 * n_cells]: per question id, its sum then its count of values in each cell.

    A resample of question ids is then a weighted sum of rows, so one matrix product per
    batch of resamples recomputes every cell mean (and so every macro-average) at once."""
    row = lay.ids.get_indexer(long["question_id"])
    col = lay.columns.get_indexer(long["column"])
    keep = (row >= 0) & (col >= 0)
    flat = row[keep] * len(lay.columns) + col[keep]
    size = len(lay.ids) * len(lay.columns)
    sums = np.bincount(flat, weights=long["value"].to_numpy()[keep], minlength=size)
    counts = np.bincount(flat, minlength=size).astype(float)
    shape = (len(lay.ids), len(lay.columns))
    return np.hstack([sums.reshape(shape), counts.reshape(shape)])


def macro(totals: np.ndarray, lay: Layout) -> np.ndarray:
    """[..., 2 * n_cells] sums and counts -> [..., n_figures] macro-averages of the cell means."""
    n = len(lay.columns)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell a resample left empty is skipped
        means = totals[..., :n] / totals[..., n:]
        return np.stack([np.nanmean(means[..., cols], axis=-1) for cols in lay.groups], axis=-1)


@dataclass
class Entry:
    """One side of a comparison: a run, or the runs of a group pooled over seeds."""

    label: str
    members: list[str]
    tables: list[pd.DataFrame]


def clusters_of(ids: pd.Index, tables: list[pd.DataFrame]) -> tuple[np.ndarray, list[str]]:
    """The cluster (paragraph id) of each question id, from the per-query tables' `paragraph` column;
    files written before it existed make each question its own cluster, which a note says."""
    known = (
        pd.concat([t[["question_id", "paragraph"]] for t in tables if "paragraph" in t]) if any("paragraph" in t for t in tables) else None
    )
    if known is None or known["paragraph"].isna().all():
        return np.asarray(ids), ["the per-query files name no paragraphs (written before they did): questions are resampled one by one"]
    paragraph = known.dropna().drop_duplicates("question_id").set_index("question_id")["paragraph"].reindex(ids)
    missing = int(paragraph.isna().sum())
    notes = [f"{missing} question ids have no paragraph and count as their own cluster"] if missing else []
    return np.where(paragraph.isna(), np.asarray(ids, dtype=object), paragraph.to_numpy(dtype=object)).astype(str), notes


def compatible_interval(d: float, se: float, df: float, p: float, p_adjusted: float) -> tuple[float, float]:
    """The interval of a difference d (standard error se, df degrees of freedom, p-value p) at the
    level where its own p-value meets the family's threshold: confidence 1 - ALPHA * p / p_adjusted,
    so it excludes 0 exactly when the adjusted p < ALPHA (the reported interval and the "significant"
    flag cannot disagree). With no adjustment (p_adjusted = p) it is the plain 95% interval."""
    if se == 0 or not np.isfinite(se):
        return d, d
    level = ALPHA * (p / p_adjusted if p_adjusted > 0 else 1.0)
    half = stats.t.ppf(1 - level / 2, df) * se
    return d - half, d + half


def compare(
    entries: list[Entry],
    resamples: int = 10_000,
    seed: int = 0,
    against: int | None = None,
    adjustment: str = "holm",
    figures: dict[str, FigureSpec] = FIGURES,
) -> tuple[pd.DataFrame, list[str]]:
    """Every pair of entries (B vs A, C vs A, ..., C vs B), or each entry against entry
    `against` only, on every headline figure; and notes.

    Each entry is an arm of one or more runs (seeds). The difference of every figure carries
    both sources of chance, the training seeds and the questions resampled by paragraph
    (pipeline/analysis/seed_stats.py), in one t procedure; `adjustment` ('holm' or 'fdr_bh')
    corrects the p-values over the whole report, every comparison x figure, and each interval
    is the one compatible with that decision; `figures` are the figures compared. The same inputs and
    `seed` give the same result."""
    if len(entries) < 2:
        raise PipelineError(f"compare needs at least two entries, got {len(entries)} (experiment names, git revisions or `workspace`)")
    longs = [[cells(t, figures) for t in e.tables] for e in entries]
    lay, notes = layout([(m, long) for e, ls in zip(entries, longs) for m, long in zip(e.members, ls)], tuple(figures))
    clusters, cluster_notes = clusters_of(lay.ids, [t for e in entries for t in e.tables])
    notes += cluster_notes
    runs = [[matrices(long, lay) for long in ls] for ls in longs]
    seed_figs = [np.array([macro(m.sum(0), lay) for m in per_member]) for per_member in runs]
    figure_of = partial(macro, lay=lay)
    pairs = itertools.combinations(enumerate(entries), 2)
    if against is not None:
        pairs = [((against, entries[against]), (j, b)) for j, b in enumerate(entries) if j != against]
    rows = []
    for (i, a), (j, b) in pairs:
        result = seed_stats.difference(runs[i], runs[j], clusters, figure_of, resamples, np.random.default_rng([seed, i, j]))
        for k, figure in enumerate(lay.figures):
            rows.append({
                "comparison": f"{b.label} vs {a.label}", "figure": figure, "a_label": a.label, "b_label": b.label,
                "a": seed_figs[i][:, k].mean(), "b": seed_figs[j][:, k].mean(),
                **_seed_summary("a", seed_figs[i][:, k]), **_seed_summary("b", seed_figs[j][:, k]),
                "difference": result.difference[k], "se": result.se[k], "df": result.df[k],
                "seed_variance": result.seed_variance[k], "question_variance": result.question_variance[k], "p": result.p[k],
            })  # fmt: skip
        for label, single in ((a.label, result.a_single_run), (b.label, result.b_single_run)):
            note = f"{label} is one run: its seed variance is unknown and not in the intervals"
            if single and note not in notes:
                notes.append(note)
    table = pd.DataFrame(rows)
    table["p_adjusted"] = seed_stats.adjust(table["p"].to_numpy(), adjustment)
    bounds = [compatible_interval(r.difference, r.se, r.df, r.p, r.p_adjusted) for r in table.itertuples()]
    table.insert(table.columns.get_loc("se"), "ci_low", [low for low, _ in bounds])
    table.insert(table.columns.get_loc("se"), "ci_high", [high for _, high in bounds])
    table["significant"] = table["p_adjusted"] < ALPHA
    return table, notes


def _seed_summary(side: str, figures: np.ndarray) -> dict:
    sd = float(np.std(figures, ddof=1)) if len(figures) > 1 else float("nan")
    return {f"{side}_seeds": len(figures), f"{side}_seeds_mean": float(np.mean(figures)), f"{side}_seeds_sd": sd}


def group_entries(names: list[str], params: dict[str, dict], key: str = "seed") -> list[tuple[str, list[str]]]:
    """Pool entries whose params are equal except `key`: [(label, members)] in order of appearance.

    A group is labelled by the params that tell the groups apart (`sampler.ratio=0.5`), or by
    its first member where those are none or do not tell them apart."""

    def other(name):
        return tuple(sorted((k, repr(v)) for k, v in params[name].items() if k != key and not k.endswith(f":{key}")))

    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(other(name), []).append(name)
    keys = list(groups)
    differing = sorted({k for g in keys for k, _ in g if len({dict(h).get(k) for h in keys}) > 1})
    labels = [", ".join(f"{k}={params[groups[g][0]].get(k)}" for k in differing) for g in keys]
    if len(set(labels)) < len(labels) or not all(labels):
        labels = [groups[g][0] for g in keys]
    return [(label, groups[g]) for label, g in zip(labels, keys)]


def _fmt(figure: str, value: float) -> str:
    return "—" if math.isnan(value) else (f"{value:.2f}" if figure == "rank_distance" else f"{value:.4f}")


def _side(row, side: str) -> str:
    figure = row["figure"]
    if row[f"{side}_seeds"] > 1:
        return f"{_fmt(figure, row[f'{side}_seeds_mean'])} ± {_fmt(figure, row[f'{side}_seeds_sd'])} ({row[f'{side}_seeds']} seeds)"
    return _fmt(figure, row[side])


def markdown(result: pd.DataFrame, header: str, notes: list[str]) -> str:
    """A table to paste: one row per (pair, figure). `seed share` is the part of the difference's
    variance that comes from the training seeds (the rest from the questions)."""
    lines = [header, ""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    lines += [
        "| comparison | figure | A | B | B − A | interval | seed share | p | adjusted p | significant |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for _, r in result.iterrows():
        f = r["figure"]
        total = r["seed_variance"] + r["question_variance"]
        share = f"{r['seed_variance'] / total:.0%}" if total > 0 else "—"
        lines.append(
            f"| {r['comparison']} | {figure_label(f)} | {_side(r, 'a')} | {_side(r, 'b')} | "
            f"{_fmt(f, r['difference'])} | [{_fmt(f, r['ci_low'])}, {_fmt(f, r['ci_high'])}] | {share} | "
            f"{r['p']:.4f} | {r['p_adjusted']:.4f} | {'yes' if r['significant'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def power_markdown(seed_sd: dict[str, float]) -> str:
    """How large a true difference n seeds per arm detect (80% power, two-sided 0.05), from the seed sd this
    report's own runs measured; nothing where no arm has two runs."""
    if not seed_sd:
        return ""
    table = seed_stats.power_table(seed_sd)
    lines = ["", "Seeds needed: the smallest true difference n seeds per arm detect with 80% power at 0.05 (two-sided), "
             "from the seed sd of this report's arms of several runs (" + ", ".join(f"{figure_label(f)} {sd:.4f}" for f, sd in seed_sd.items()) +
             "); the question variance adds to it.", ""]  # fmt: skip
    lines += ["| seeds per arm | " + " | ".join(figure_label(f) for f in table.columns) + " |", "|---:|" + "---:|" * len(table.columns)]
    for seeds, row in table.iterrows():
        lines.append(f"| {seeds} | " + " | ".join(_fmt(f, row[f]) for f in table.columns) + " |")
    return "\n".join(lines) + "\n"


def plot_forest(result: pd.DataFrame, path: Path, title: str):
    """One panel per figure, one row per pair: the difference, its 95% interval, zero marked.
    Returns the matplotlib figure (closed) so its artists can be inspected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = list(dict.fromkeys(result["figure"]))
    pairs = list(dict.fromkeys(result["comparison"]))
    fig, axes = plt.subplots(1, len(figures), figsize=(3.6 * len(figures), 1.8 + 0.45 * len(pairs)), sharey=True, squeeze=False)
    for ax, figure in zip(axes[0], figures):
        rows = result[result["figure"] == figure].set_index("comparison").loc[pairs]
        y = np.arange(len(pairs))[::-1]
        err = np.vstack([rows["difference"] - rows["ci_low"], rows["ci_high"] - rows["difference"]])
        colors = ["tab:red" if s else "tab:blue" for s in rows["significant"]]
        for k, color in enumerate(colors):
            ax.errorbar(rows["difference"].iloc[k], y[k], xerr=err[:, k : k + 1], fmt="none", ecolor=color, capsize=3)
        ax.scatter(rows["difference"], y, c=colors, zorder=3)
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(y, pairs)
        ax.set_title(figure_label(figure))
        ax.set_xlabel("B − A (red: significant after the family's adjustment)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_ylim(-0.6, len(pairs) - 0.4)
    width = fig.get_figwidth()
    fig.suptitle(textwrap.fill(title, width=int(width * 14)), fontsize=9)  # about 14 characters an inch at 9 pt
    fig.tight_layout()
    write_figure(fig, path)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", nargs="+", help="experiment names, git revisions or `workspace` ([:DIR])")
    parser.add_argument("--dataset", default="xquad_r")
    parser.add_argument("--queries-dir", default="metrics/eval_queries")
    parser.add_argument("--out", default="docs/compare")
    parser.add_argument("--group", default=None, help="pool entries that differ only in this param (e.g. seed)")
    parser.add_argument("--against", default=None, help="compare each entry with this one (a label or entry) only")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adjust", choices=list(ADJUSTMENT_NAMES), default="holm", help="multiplicity adjustment over the whole report")
    args = parser.parse_args()
    if len(args.entries) < 2:
        raise PipelineError(f"compare needs at least two entries, got {len(args.entries)} (experiment names, git revisions or `workspace`)")
    if args.resamples < 100:
        raise PipelineError(f"--resamples: {args.resamples} is too few for a 95% interval (use >= 100)")
    parsed = [parse_entry(e, args.queries_dir) for e in args.entries]
    labels = [label for label, _, _ in parsed]
    if any(labels) and args.group:
        raise PipelineError("--group: entries are pooled by their LABEL= prefixes already; use one or the other")
    groups = label_groups(args.entries, labels) if any(labels) else None  # checked before anything is read
    if groups is not None and len(groups) < 2:
        raise PipelineError(f"every entry is labelled {groups[0][0]}: nothing to compare after pooling")
    tables = {e: read_queries(rev, f"{folder}/{args.dataset}.parquet") for e, (_, rev, folder) in zip(args.entries, parsed)}
    if groups is None and args.group:
        params = {e: params_at(rev) for e, (_, rev, _) in zip(args.entries, parsed)}
        groups = group_entries(list(tables), params, args.group)
        if len(groups) < 2:
            raise PipelineError(f"all entries differ only in {args.group}: nothing to compare after pooling")
    elif groups is None:
        groups = [(e, [e]) for e in tables]
    entries = [Entry(label, members, [tables[m] for m in members]) for label, members in groups]
    against = None
    if args.against:
        found = [i for i, (label, members) in enumerate(groups) if args.against == label or args.against in members]
        if not found:
            raise PipelineError(f"--against: '{args.against}' is none of the entries ({', '.join(label for label, _ in groups)})")
        against = found[0]
    result, notes = compare(entries, args.resamples, args.seed, against, args.adjust)
    for label, members in groups:
        if len(members) > 1:
            notes.append(f"{label} pools {', '.join(m.partition('=')[2] or m for m in members)}")
    source = {entry: (rev, folder == args.queries_dir) for entry, (_, rev, folder) in zip(args.entries, parsed)}  # own metrics?
    runs = pd.DataFrame(
        [run_rows(e.label, m, source[m][0], headline(t), own_params=source[m][1]) for e in entries for m, t in zip(e.members, e.tables)]
    )
    tests = len(result)
    header = (
        f"{args.dataset}: difference B − A with seed and question variance (runs of an arm are its seeds; questions "
        f"resampled by paragraph, {args.resamples} resamples; Satterthwaite t); p adjusted by "
        f"{ADJUSTMENT_NAMES[args.adjust]} over all {tests} tests of this report, and each interval is the one that excludes 0 "
        f"exactly when the adjusted p < {ALPHA} (95% where nothing is adjusted); seed {args.seed}"
    )
    text = markdown(result, header, notes) + power_markdown(
        seed_stats.pooled_seed_sd(runs.drop(columns=["run", "commit", "seed"]), "label")
    )
    write_report(args.out, text, result)
    write_table(f"{args.out}_runs.csv", runs)
    plot_forest(result, Path(f"{args.out}.png"), header)
    print(text, end="")
    print(f"wrote {args.out}.md, {args.out}.csv, {args.out}_runs.csv and {args.out}.png")


if __name__ == "__main__":
    run_stage(main)
