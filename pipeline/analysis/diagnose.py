"""Why a fine-tuned model loses monolingual (or cross-lingual) queries: what it ranks first.

    python -m pipeline.analysis.diagnose BEFORE AFTER [--dataset xquad_r] [--queries-dir metrics/eval_queries] [--out docs/siblings]

BEFORE and AFTER are entries as `pipeline.analysis.compare` takes them (an experiment, a git
revision or `workspace`, with `:DIR`), e.g. `workspace:metrics/eval_base_queries workspace`
for the zero-shot base against the fine-tuned model. For each setting (mono, cross) it
counts, over the same (question, query language, passage language) rows, what each model
ranks first: the answer, a sibling (another sentence of the answer's paragraph) or a
sentence of another paragraph; and, for the queries AFTER lost (answer first before, not
after), what took the answer's place. LAReQA's pool holds every sentence of a paragraph
and in-batch negatives never do, so if the lost queries are mostly siblings, hard
negatives from the answer's paragraph (`sampler.negatives`) are the cure.
"""

from __future__ import annotations

import argparse

import pandas as pd

from pipeline.analysis.runs import parse_entry, read_queries
from pipeline.common import PipelineError, run_stage, write_report
from pipeline.contracts import QUERIES_SCHEMA

KINDS = ("answer", "sibling", "other")
KEYS = ["setting", "query_lang", "passage_lang", "question_id"]


def top1_transitions(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per setting and (top-1 before, top-1 after): the number of rows, over the rows both have."""
    pairs = before[before["setting"] != "multi"].merge(
        after[after["setting"] != "multi"], on=KEYS, suffixes=("_before", "_after"), validate="one_to_one"
    )
    if pairs.empty:
        raise PipelineError("the two per-query tables share no mono or cross rows (different datasets or languages?)")
    counts = pairs.groupby(["setting", "top1_before", "top1_after"]).size()
    full = pd.MultiIndex.from_product([["mono", "cross"], KINDS, KINDS], names=["setting", "before", "after"])
    return counts.reindex(full, fill_value=0).rename("queries").reset_index()


def summary_table(transitions: pd.DataFrame) -> pd.DataFrame:
    """Per setting: each model's share of rows by top-1 kind, its share of errors that are
    siblings, and what the queries AFTER lost were lost to."""
    rows = []
    for setting, t in transitions.groupby("setting", sort=False):
        total = t["queries"].sum()
        before, after = t.groupby("before")["queries"].sum(), t.groupby("after")["queries"].sum()
        lost = t[(t["before"] == "answer") & (t["after"] != "answer")].set_index("after")["queries"]
        row = {"setting": setting, "queries": int(total)}
        for name, kinds in (("before", before), ("after", after)):
            for kind in KINDS:
                row[f"{name}_{kind}"] = kinds.get(kind, 0) / total
            errors = kinds.get("sibling", 0) + kinds.get("other", 0)
            row[f"{name}_sibling_errors"] = kinds.get("sibling", 0) / errors if errors else float("nan")
        row["lost"] = int(lost.sum())
        row["lost_to_sibling"] = lost.get("sibling", 0) / lost.sum() if lost.sum() else float("nan")
        row["gained"] = int(t[(t["before"] != "answer") & (t["after"] == "answer")]["queries"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame, before: str, after: str, dataset: str) -> str:
    lines = [
        f"{dataset}: top-1 of {before} (before) and {after} (after), over the rows both scored",
        "",
        "| setting | queries | answer first before → after | sibling first | other paragraph first "
        "| errors that are siblings | lost (answer first before, not after) | lost to a sibling | gained |",
        "|---|---:|---|---|---|---|---:|---:|---:|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.setting} | {r.queries} | {r.before_answer:.3f} → {r.after_answer:.3f} | {r.before_sibling:.3f} → {r.after_sibling:.3f} "
            f"| {r.before_other:.3f} → {r.after_other:.3f} | {r.before_sibling_errors:.3f} → {r.after_sibling_errors:.3f} "
            f"| {r.lost} | {r.lost_to_sibling:.3f} | {r.gained} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="experiment, git revision or `workspace` ([:DIR])")
    parser.add_argument("after")
    parser.add_argument("--dataset", default="xquad_r")
    parser.add_argument("--queries-dir", default="metrics/eval_queries")
    parser.add_argument("--out", default=None, help="also write <out>.md and <out>.csv")
    args = parser.parse_args()
    tables = []
    for entry in (args.before, args.after):
        _, rev, folder = parse_entry(entry, args.queries_dir)
        tables.append(read_queries(rev, f"{folder}/{args.dataset}.parquet", schema=QUERIES_SCHEMA))
    summary = summary_table(top1_transitions(*tables))
    text = markdown(summary, args.before, args.after, args.dataset)
    if args.out:
        write_report(args.out, text, summary)
    print(text, end="")


if __name__ == "__main__":
    run_stage(main)
