"""pipeline.analysis.diagnose: what took the answer's place in the queries fine-tuning lost."""

from __future__ import annotations

import sys

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.analysis import diagnose
from pipeline.common import run_stage, write_parquet
from pipeline.contracts import QUERIES_SCHEMA


def per_query(top1: dict[tuple[str, str, str], str]) -> pd.DataFrame:
    """Rows (setting, question id, passage language) -> top-1 kind; query language en; one multi row."""
    rows = [
        {"setting": s, "query_lang": "en", "passage_lang": p, "question_id": q, "ap": 1.0 if k == "answer" else 0.5, "top1": k}
        for (s, q, p), k in top1.items()
    ]
    rows.append({"setting": "multi", "query_lang": "en", "passage_lang": None, "question_id": "q1", "ap": 0.7, "own_language_first": 1.0})
    return pd.DataFrame(rows).reindex(columns=QUERIES_SCHEMA.names)


BEFORE = per_query({
    ("mono", "q1", "en"): "answer", ("mono", "q2", "en"): "answer", ("mono", "q3", "en"): "answer",
    ("mono", "q4", "en"): "other", ("cross", "q1", "de"): "sibling", ("cross", "q2", "de"): "answer",
})  # fmt: skip
AFTER = per_query({
    ("mono", "q1", "en"): "sibling", ("mono", "q2", "en"): "sibling", ("mono", "q3", "en"): "answer",
    ("mono", "q4", "en"): "answer", ("cross", "q1", "de"): "answer", ("cross", "q2", "de"): "other",
})  # fmt: skip


def test_transitions_count_each_rows_top1_before_and_after():
    t = diagnose.top1_transitions(BEFORE, AFTER).set_index(["setting", "before", "after"])["queries"]
    assert len(t) == 18 and t.sum() == 6  # every (setting, kind, kind), zeros included
    assert t["mono", "answer", "sibling"] == 2 and t["mono", "answer", "answer"] == 1 and t["mono", "other", "answer"] == 1
    assert t["cross", "sibling", "answer"] == 1 and t["cross", "answer", "other"] == 1


def test_summary_says_what_the_lost_queries_were_lost_to():
    summary = diagnose.summary_table(diagnose.top1_transitions(BEFORE, AFTER)).set_index("setting")
    mono, cross = summary.loc["mono"], summary.loc["cross"]
    assert mono["queries"] == 4 and mono["before_answer"] == 0.75 and mono["after_answer"] == 0.5
    assert mono["before_sibling_errors"] == 0.0 and mono["after_sibling_errors"] == 1.0
    assert mono["lost"] == 2 and mono["lost_to_sibling"] == 1.0 and mono["gained"] == 1
    assert cross["lost"] == 1 and cross["lost_to_sibling"] == 0.0 and cross["gained"] == 1
    assert cross["before_sibling_errors"] == 1.0 and cross["after_sibling_errors"] == 0.0


def test_rows_only_one_side_scored_are_left_out_and_disjoint_tables_are_one_line():
    extra = pd.concat([AFTER, per_query({("mono", "q9", "en"): "other"}).iloc[:1]], ignore_index=True)
    assert diagnose.top1_transitions(BEFORE, extra)["queries"].sum() == 6
    other_lang = AFTER.assign(query_lang="de")
    with pytest.raises(diagnose.PipelineError, match="share no mono or cross rows"):
        diagnose.top1_transitions(BEFORE, other_lang)


def test_cli_reads_two_folders_of_the_workspace(tmp_path, monkeypatch, capsys):
    for folder, table in (("base_q", BEFORE), ("tuned_q", AFTER)):
        (tmp_path / folder).mkdir()
        write_parquet(pa.Table.from_pandas(table, QUERIES_SCHEMA, preserve_index=False), tmp_path / folder / "xquad_r.parquet")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diagnose", "workspace:base_q", "workspace:tuned_q", "--out", "siblings"])
    run_stage(diagnose.main)
    printed = capsys.readouterr().out
    assert "| mono | 4 | 0.750 → 0.500 |" in printed and (tmp_path / "siblings.md").read_text() == printed
    assert pd.read_csv(tmp_path / "siblings.csv").set_index("setting").loc["mono", "lost_to_sibling"] == 1.0
