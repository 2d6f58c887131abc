"""Compare runs per query: headline differences with paired-bootstrap intervals and randomization p-values.

    python -m pipeline.analysis.compare A B [C ...] [--dataset xquad_r] [--queries-dir metrics/eval_queries]
                               [--out docs/compare] [--group seed] [--against A] [--resamples 10000] [--seed 0]

Each entry is a DVC experiment name, a git revision or `workspace`, optionally followed by
`:DIR` to read another folder of per-query files (`workspace:metrics/eval_base_queries` is the
zero-shot base) and preceded by `LABEL=`, which names it in the tables; entries sharing a
label are pooled (their seeds, say). Past revisions are read through `dvc.api.open`, from the
DVC cache: nothing is re-run. `--group seed` pools entries whose params differ only in `seed`.
`--against LABEL` compares every other entry with that one only, instead of every pair.

Why per query: two runs' headline mAPs differ by a few thousandths; whether that is more
than chance depends on how much each question's score moves, which only per-query results
show. The unit of independence is the question id: its translations (one row per language
and pair) share one difficulty, so they are resampled and swapped together.

For every pair of entries and every headline figure it writes `<out>.md` (the table),
`<out>.csv` and `<out>.png` (a forest plot of the differences), and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.analysis.runs import figure_label, flatten, label_groups, parse_entry, read_queries
from pipeline.common import PipelineError, first_line, run_stage, write_figure, write_report

# Headline figure -> (setting, column): each is a macro-average over the setting's cells
# (mono: languages X of (X, X); cross: ordered pairs X != Y; multi: query languages X) of
# the cell's mean column value, as `evaluate` computes them for metrics/eval.json.
FIGURES = {
    "mono_map": ("mono", "ap"),
    "cross_map": ("cross", "ap"),
    "multi_map": ("multi", "ap"),
    "multi_recall_at_10": ("multi", "recall_at_10"),
    "rank_distance": ("multi", "rank_distance"),
}
ALPHA = 0.05
BATCH = 1000  # resamples per vectorized call: a [BATCH, n_ids] weight matrix stays ~10 MiB


def cells(table: pd.DataFrame) -> pd.DataFrame:
    """Long form of a per-query table: question_id, column ('figure|cell'), value; nulls dropped."""
    setting = table["setting"].to_numpy(object)
    query, passage = table["query_lang"].to_numpy(object), table["passage_lang"].to_numpy(object)
    ids = table["question_id"].to_numpy(object)
    parts = []
    for figure, (name, column) in FIGURES.items():
        values = table[column].to_numpy(float)
        rows = (setting == name) & ~np.isnan(values)
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


def headline(table: pd.DataFrame) -> dict[str, float]:
    """The headline figures of one per-query table (NaN for a figure without rows)."""
    means = cells(table).groupby("column")["value"].mean()
    figure = means.index.str.split("|").str[0]
    return {name: float(means[figure == name].mean()) if (figure == name).any() else float("nan") for name in FIGURES}


@dataclass
class Layout:
    """Which question ids (rows) and cells (columns) the matrices of every entry share."""

    ids: pd.Index
    columns: pd.Index  # 'figure|cell', grouped by figure in FIGURES order
    figures: list[str]  # figures with at least one shared cell
    groups: list[np.ndarray]  # per figure, its column positions


def layout(tables: list[tuple[str, pd.DataFrame]]) -> tuple[Layout, list[str]]:
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
    order = {name: i for i, name in enumerate(FIGURES)}
    columns = pd.Index(sorted(columns, key=lambda c: (order[c.split("|")[0]], c)))
    of_column = np.array([c.split("|")[0] for c in columns])
    figures = [f for f in FIGURES if (of_column == f).any()]
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


def _weights(idx: np.ndarray, n: int) -> np.ndarray:
    """[b, m] resampled ids -> [b, n] how often each id was drawn (one bincount for the batch)."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values, written out because statsmodels is not a dependency and the
    method is this short: the k-th smallest of m p-values (k = 0, 1, ...) times m - k, made
    non-decreasing in that order, capped at 1."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def paired_stats(a: np.ndarray, b: np.ndarray, lay: Layout, resamples: int, rng: np.random.Generator):
    """Difference B - A of every figure, its 95% bootstrap interval and randomization p-value.

    `a`, `b`: [n_ids, 2 * n_cells] matrices on the same ids. The bootstrap draws question ids
    with replacement and recomputes both entries' macro-averages from those ids' rows (BCa,
    as scipy's default); the randomization test swaps the two entries' rows of each id
    independently with probability 1/2. Both statistics are vectorized weighted sums."""
    n = len(lay.ids)
    both = np.hstack([a, b])
    width = a.shape[1]

    def boot(idx, axis=-1):
        # The one sample is the question ids (what `paired=True` would resample for
        # per-question vectors, without copying hundreds of cells per drawn id).
        idx = np.asarray(idx)
        flat = idx.reshape(-1, idx.shape[-1])
        totals = _weights(flat, n) @ both
        diff = macro(totals[:, width:], lay) - macro(totals[:, :width], lay)
        return np.moveaxis(diff.reshape(*idx.shape[:-1], -1), -1, 0)  # bootstrap wants figures first

    grand = a.sum(0) + b.sum(0)
    delta = b - a

    def swapped(x, y, axis=-1):
        # permutation_type='samples' keeps each id in place and swaps which entry it came
        # from: x holds i (A's row) or n + i (B's row), so x's totals are A's plus the swaps.
        x = np.asarray(x)
        flip = (x.reshape(-1, x.shape[-1]) >= n).astype(float)
        side_x = a.sum(0) + flip @ delta
        diff = macro(grand - side_x, lay) - macro(side_x, lay)
        return diff.reshape(*x.shape[:-1], -1)  # permutation_test wants figures last

    observed = boot(np.arange(n))
    with warnings.catch_warnings():
        # Identical entries: BCa is undefined (its acceleration is 0/0); handled below.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        boot_res = stats.bootstrap((np.arange(n),), boot, n_resamples=resamples, batch=BATCH, vectorized=True, rng=rng)
    low, high = np.atleast_1d(boot_res.confidence_interval.low), np.atleast_1d(boot_res.confidence_interval.high)
    # BCa is NaN when every resample gives the same difference (e.g. a run with itself):
    # the percentile interval is then that value.
    dist = boot_res.bootstrap_distribution
    bad = ~(np.isfinite(low) & np.isfinite(high))
    low[bad] = np.percentile(dist[bad], 2.5, axis=-1)
    high[bad] = np.percentile(dist[bad], 97.5, axis=-1)
    perm = stats.permutation_test(
        (np.arange(n), np.arange(n) + n), swapped, permutation_type="samples", n_resamples=resamples, batch=BATCH, vectorized=True, rng=rng
    )
    return observed, low, high, np.atleast_1d(perm.pvalue)


@dataclass
class Entry:
    """One side of a comparison: a run, or the runs of a group pooled over seeds."""

    label: str
    members: list[str]
    tables: list[pd.DataFrame]


def compare(entries: list[Entry], resamples: int = 10_000, seed: int = 0, against: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every pair of entries (B vs A, C vs A, ..., C vs B), or each entry against entry
    `against` only, on every headline figure; and notes.

    A group's matrix is the mean over its seeds per question id and cell, so its figure is
    the seeds' mean figure and the paired tests see each question's seed-averaged score;
    the seeds' own figures give the mean ± sd columns. Holm's correction runs over the
    figures of one pair. The same inputs and `seed` give the same intervals and p-values."""
    if len(entries) < 2:
        raise PipelineError(f"compare needs at least two entries, got {len(entries)} (experiment names, git revisions or `workspace`)")
    longs = [[cells(t) for t in e.tables] for e in entries]
    lay, notes = layout([(m, long) for e, ls in zip(entries, longs) for m, long in zip(e.members, ls)])
    mats, seed_figs = [], []
    for ls in longs:
        per_member = [matrices(long, lay) for long in ls]
        mats.append(np.mean(per_member, axis=0))
        seed_figs.append(np.array([macro(m.sum(0), lay) for m in per_member]))
    rows = []
    pairs = itertools.combinations(enumerate(entries), 2)
    if against is not None:
        pairs = [((against, entries[against]), (j, b)) for j, b in enumerate(entries) if j != against]
    for (i, a), (j, b) in pairs:
        rng = np.random.default_rng([seed, i, j])
        diff, low, high, p = paired_stats(mats[i], mats[j], lay, resamples, rng)
        fig_a, fig_b = macro(mats[i].sum(0), lay), macro(mats[j].sum(0), lay)
        for k, (figure, p_holm) in enumerate(zip(lay.figures, holm(p))):
            rows.append(
                {
                    "comparison": f"{b.label} vs {a.label}",
                    "figure": figure,
                    "a_label": a.label,
                    "b_label": b.label,
                    "a": fig_a[k],
                    "b": fig_b[k],
                    **_seed_summary("a", seed_figs[i][:, k]),
                    **_seed_summary("b", seed_figs[j][:, k]),
                    "difference": diff[k],
                    "ci_low": low[k],
                    "ci_high": high[k],
                    "p": p[k],
                    "p_holm": p_holm,
                    "significant": bool(p_holm < ALPHA),
                }
            )
    return pd.DataFrame(rows), notes


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
    """A table to paste: one row per (pair, figure)."""
    lines = [header, ""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    lines += ["| comparison | figure | A | B | B − A | 95% CI | p | Holm p | significant |", "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for _, r in result.iterrows():
        f = r["figure"]
        lines.append(
            f"| {r['comparison']} | {figure_label(f)} | {_side(r, 'a')} | {_side(r, 'b')} | "
            f"{_fmt(f, r['difference'])} | [{_fmt(f, r['ci_low'])}, {_fmt(f, r['ci_high'])}] | "
            f"{r['p']:.4f} | {r['p_holm']:.4f} | {'yes' if r['significant'] else 'no'} |"
        )
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
        ax.set_xlabel("B − A (red: significant after Holm)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_ylim(-0.6, len(pairs) - 0.4)
    fig.suptitle(title, fontsize=9)
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
        import dvc.api
        from dvc.exceptions import DvcException

        params = {}
        for e, (_, rev, _) in zip(args.entries, parsed):
            try:
                params[e] = flatten(dvc.api.params_show(rev=None if rev == "workspace" else rev))
            except DvcException as err:
                raise PipelineError(f"{rev}: cannot read its params ({first_line(err)})") from None
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
    result, notes = compare(entries, args.resamples, args.seed, against)
    for label, members in groups:
        if len(members) > 1:
            notes.append(f"{label} pools {', '.join(m.partition('=')[2] or m for m in members)}")
    header = (
        f"{args.dataset}: paired bootstrap over question ids ({args.resamples} resamples, BCa 95% CI) "
        f"and paired randomization test, Holm over the figures of each comparison; seed {args.seed}"
    )
    text = markdown(result, header, notes)
    write_report(args.out, text, result)
    plot_forest(result, Path(f"{args.out}.png"), header)
    print(text, end="")
    print(f"wrote {args.out}.md, {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    run_stage(main)
