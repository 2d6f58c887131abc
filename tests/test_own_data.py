"""Training on data of the user's own (issue #29): one row per (group, language) in a .jsonl, .parquet or
.csv file, a `save_to_disk` folder or a hub dataset, checked with one line per problem, written as the
raw tables, and trained on through translate, batches and train unchanged (docs/own-data.md)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import batches, fetch, mine, train, translate
from pipeline.common import PipelineError, read_parquet
from pipeline.contracts import CANDIDATES_SCHEMA, OWN_SOURCE, PLAN_PATH, PLAN_SCHEMA, QUESTIONS_SCHEMA, raw_tables
from pipeline.params import load_params
from tests.helpers import REPO, dvc, git, init_dvc_project, repo_stages, write_params

LANGS = ("en", "de", "fr")


def own_rows(groups: int = 8, negatives: bool = True) -> list[dict]:
    """A small FAQ in LANGS; with `negatives`, every group but the last has a hard negative per language."""
    rows = []
    for g in range(groups):
        for lang in LANGS:
            row = {"group_id": f"faq-{g}", "lang": lang, "question": f"{lang} how do I reset device {g}?"}
            row["passage"] = f"{lang} hold button {g} down for {g + 5} seconds."
            if negatives:
                row["negative"] = f"{lang} button {g} also turns the light on." if g < groups - 1 else ""
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads: in the test's own folder, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_each_passage_is_a_paragraph_and_its_negative_that_paragraph_second_sentence():
    questions, candidates = fetch.own_data_tables(pa.Table.from_pylist(own_rows(3)), "faq.jsonl")
    assert questions.schema.equals(QUESTIONS_SCHEMA) and candidates.schema.equals(CANDIDATES_SCHEMA)
    en_candidates = candidates.filter(pa.compute.equal(candidates["lang"], "en")).to_pylist()
    assert [(c["candidate"], c["paragraph"], c["sentence_index"], c["sentence"]) for c in en_candidates] == [
        (0, 0, 0, "en hold button 0 down for 5 seconds."),
        (1, 0, 1, "en button 0 also turns the light on."),
        (2, 1, 0, "en hold button 1 down for 6 seconds."),
        (3, 1, 1, "en button 1 also turns the light on."),
        (4, 2, 0, "en hold button 2 down for 7 seconds."),  # the last group has no negative: a one-sentence paragraph
    ]
    en_questions = questions.filter(pa.compute.equal(questions["lang"], "en")).to_pylist()
    assert [q["answer_candidate"] for q in en_questions] == [0, 2, 4]
    # the article and the paragraph are the group: the dev split holds out whole groups, in every language
    assert all(q["article"] == q["paragraph"] == q["group_id"] for q in questions.to_pylist())
    assert sorted(set(questions["lang"].to_pylist())) == sorted(LANGS)


def test_the_example_of_the_docs_is_valid_and_its_error_line_is_the_one_shown():
    text = (REPO / "docs/own-data.md").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in re.search(r"```json\n(.*?)```", text, re.DOTALL).group(1).splitlines()]
    assert len(rows) == 10
    questions, _ = fetch.own_data_tables(pa.Table.from_pylist(rows), "data/own/faq.jsonl")
    assert questions.num_rows == 10
    shown = re.search(r"```\nerror: (.*)\n```", text).group(1)
    with pytest.raises(PipelineError) as caught:
        fetch.own_data_tables(pa.Table.from_pylist(rows[:7] + rows[8:]), "data/own/faq.jsonl")  # without the German row 8
    assert str(caught.value) == shown


def _formats(tmp_path: Path, rows: list[dict]) -> dict[str, str]:
    """The same rows as every kind of data.train of your own, by name: the path each is read from."""
    import datasets

    frame = pd.DataFrame(rows)
    paths = {"jsonl": str(write_jsonl(tmp_path / "faq.jsonl", rows)), "parquet": str(tmp_path / "faq.parquet")}
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), paths["parquet"])
    paths["csv"] = str(tmp_path / "faq.CSV")
    frame.to_csv(paths["csv"], index=False)
    paths["save_to_disk"] = str(tmp_path / "faq_dataset")
    datasets.Dataset.from_list(rows).save_to_disk(paths["save_to_disk"])
    paths["save_to_disk, splits"] = str(tmp_path / "faq_splits")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(paths["save_to_disk, splits"])
    return paths


def test_every_format_reads_as_the_same_tables(tmp_path):
    """A Hugging Face dataset is tested through its local copy (`save_to_disk`), as the issue asks."""
    rows = own_rows(4)
    expected = fetch.own_data_tables(pa.Table.from_pylist(rows), "rows")
    for kind, path in _formats(tmp_path, rows).items():
        questions, candidates = fetch.own_data_tables(fetch.load_own_data(path), path)
        assert questions.equals(expected[0]) and candidates.equals(expected[1]), kind


def test_a_hub_id_is_read_by_datasets_and_integer_group_ids_become_text(monkeypatch):
    import datasets

    asked = []

    def hub(name, split):
        asked.append((name, split))
        return datasets.Dataset.from_list([{**row, "group_id": int(row["group_id"][4:])} for row in own_rows(2, negatives=False)])

    monkeypatch.setattr(datasets, "load_dataset", hub)
    questions, _ = fetch.own_data_tables(fetch.load_own_data("my-org/product-faq"), "my-org/product-faq")
    assert asked == [("my-org/product-faq", "train")]
    assert sorted(set(questions["group_id"].to_pylist())) == ["0", "1"]


def _without(column: str):
    return lambda rows: [{k: v for k, v in row.items() if k != column} for row in rows]


def _set(row: int, **values):
    return lambda rows: [{**r, **values} if i == row - 1 else r for i, r in enumerate(rows)]


# (id, how the rows are broken, the one line that says so after "<file>: ")
BAD_ROWS = [
    ("missing column", _without("passage"), "missing column 'passage' (it has: group_id, lang, question, negative)"),
    ("empty question", _set(5, question=""), "row 5: question is empty"),
    ("blank passage", _set(2, passage="  \t"), "row 2: passage is empty"),
    ("null group id", _set(1, group_id=None), "row 1: group_id is empty"),
    (
        "unknown language",
        _set(4, lang="xx"),
        "row 4: lang: unknown language code 'xx' (not among the 55 ISO 639-1 codes of pipeline/sources/languages.py)",
    ),
    ("upper-case language", _set(3, lang="FR"), "row 3: lang: unknown language code 'FR' (did you mean 'fr'?)"),
    ("a group twice in a language", _set(7, group_id="faq-0", lang="en"), "rows 1 and 7: group 'faq-0' has two 'en' rows"),
    (
        "a group with one language",
        lambda rows: [r for r in rows if r["group_id"] != "faq-2" or r["lang"] == "de"],
        "row 7: group 'faq-2' has one language only ('de'): a group is one question in two or more languages",
    ),
    ("question not text", lambda rows: [{**r, "question": i} for i, r in enumerate(rows)], "column 'question' holds int64, expected text"),
]


@pytest.mark.parametrize(("breaks", "message"), [case[1:] for case in BAD_ROWS], ids=[case[0] for case in BAD_ROWS])
def test_bad_rows_fail_with_one_line_naming_file_row_and_field(tmp_path, breaks, message):
    path = tmp_path / "faq.parquet"
    pq.write_table(pa.Table.from_pylist(breaks(own_rows(4))), path)
    with pytest.raises(PipelineError) as caught:
        fetch.own_data_tables(fetch.load_own_data(str(path)), str(path))
    assert str(caught.value) == f"{path}: {message}"


def test_an_empty_missing_or_unreadable_file_is_one_line(tmp_path):
    empty = pa.Table.from_pylist([], schema=pa.Table.from_pylist(own_rows(1)).schema)
    with pytest.raises(PipelineError, match=r"^faq.jsonl: no rows$"):
        fetch.own_data_tables(empty, "faq.jsonl")
    with pytest.raises(PipelineError, match=r"^params.yaml: data.train: file not found: data/own/nope.jsonl$"):
        fetch.load_own_data("data/own/nope.jsonl")
    broken = tmp_path / "faq.jsonl"
    broken.write_text('{"group_id": "a", "lang": "en"\n', encoding="utf-8")
    with pytest.raises(PipelineError) as caught:
        fetch.load_own_data(str(broken))
    assert str(caught.value).startswith(f"params.yaml: data.train: cannot read '{broken}' (") and "\n" not in str(caught.value)


def _project(root: Path, data_train: str, **params) -> None:
    write_params(
        root,
        **{"data.train": data_train, "data.dev_share": 0.25, "data.allow_eval_overlap": True, "sampler.batch_size": 4, "sampler.steps": 3},
        **params,
    )


def test_fetch_writes_the_source_own_and_warns_of_a_file_dvc_does_not_watch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fetch, "sources_to_fetch", lambda data: [OWN_SOURCE])  # the evaluation data is other tests'
    for path, warned in (("data/own/faq.jsonl", False), ("elsewhere/faq.jsonl", True)):
        write_jsonl(tmp_path / path, own_rows(4))
        _project(tmp_path, path)
        fetch.main()
        questions_path = raw_tables(OWN_SOURCE)[0]
        assert json.loads(pq.read_schema(questions_path).metadata[b"hybridir.params"]) == {"source": "own", "data.train": path}
        out, err = capsys.readouterr()
        assert f"note: data.license is not set: the licence of {path} is not declared (the model card says so)" in out
        warning = f"warning: data.train: {path} is outside data/own/, which fetch depends on: DVC will not rerun fetch when it changes"
        assert (warning in err) == warned, err
    _project(tmp_path, "data/own/faq.jsonl", **{"data.license": "CC BY 4.0"})
    fetch.main()
    assert "data.license" not in capsys.readouterr().out


def test_the_licence_is_the_declared_one_else_the_known_source_own():
    from pipeline.params import DataParams, data_license

    def data(train: str, license: str | None) -> DataParams:
        return DataParams(train=train, license=license, eval=(), squad="", squad_split="", dev_share=0.1, allow_eval_overlap=False)

    assert data_license(data("mlqa_r", None)) == "cc-by-nc-4.0"  # the Hugging Face hub's licence ids
    assert data_license(data("xquad_r", None)) == "cc-by-sa-4.0"
    assert data_license(data("data/own/faq.jsonl", None)) is None  # not declared
    assert data_license(data("data/own/faq.jsonl", "proprietary")) == "proprietary"


def _to_plan(monkeypatch, capsys, tmp_path: Path, rows: list[dict], **params) -> str:
    """fetch, translate, mine and batches on `rows` in tmp_path; returns what they printed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fetch, "sources_to_fetch", lambda data: [OWN_SOURCE])
    write_jsonl(tmp_path / "data/own/faq.jsonl", rows)
    _project(tmp_path, "data/own/faq.jsonl", **params)
    for stage in (fetch, translate, mine, batches):
        stage.main()
    return capsys.readouterr().out


def test_without_a_negative_column_no_hard_negatives_and_the_stage_says_so(tmp_path, monkeypatch, capsys):
    out = _to_plan(monkeypatch, capsys, tmp_path, own_rows(8, negatives=False), **{"sampler.negatives": "query_language"})
    assert "no query_language hard negatives: no answer has another sentence in its paragraph (data of your own gives them" in out
    assert json.loads((tmp_path / "metrics/batches.json").read_text())["negatives.planned"] == 0


def test_without_a_negative_column_mined_negatives_come_from_the_file_s_other_passages(tmp_path, monkeypatch, capsys, tiny_model_dir):
    rows = own_rows(8, negatives=False)
    shutil.copytree(tiny_model_dir, tmp_path / "models/base")
    _to_plan(monkeypatch, capsys, tmp_path, rows, **{"sampler.negatives": "mined", "mine.precision": "fp32", "mine.relative_margin": 0.0})
    plan = read_parquet(PLAN_PATH, PLAN_SCHEMA).to_pylist()
    candidates = read_parquet("data/parallel/candidates.parquet", CANDIDATES_SCHEMA).to_pandas().set_index(["lang", "candidate"])
    passage_of = {(r["group_id"], r["lang"]): r["passage"] for r in rows}
    assert all(r["negative_candidate"] is not None for r in plan)  # every pair gets one, though the file has none
    for r in plan:
        negative = candidates.loc[(r["negative_lang"], r["negative_candidate"]), "sentence"]
        assert r["negative_lang"] == r["passage_lang"] and negative.startswith(f"{r['passage_lang']} hold button ")
        assert negative != passage_of[r["group_id"], r["passage_lang"]]  # another group's passage, never its own answer
    assert json.loads((tmp_path / "metrics/batches.json").read_text())["negatives.planned"] == len(plan)


def test_a_jsonl_file_trains_end_to_end_with_its_negatives_and_a_dev_curve(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """fetch -> translate -> batches -> train, as `dvc exp run -S data.train=data/own/faq.jsonl` runs them."""
    rows = own_rows(12)
    dev_curve = {"train.eval_every": 1, "train.keep_best": "multi_map", "train.precision": "fp32"}
    out = _to_plan(monkeypatch, capsys, tmp_path, rows, **{"sampler.negatives": "query_language"}, **dev_curve)
    assert "from 9 groups" in out  # 12 groups, a quarter of them held out as the dev split
    dev_groups = set(read_parquet("data/dev/questions.parquet", QUESTIONS_SCHEMA)["group_id"].to_pylist())
    assert len(dev_groups) == 3
    # every planned hard negative is the user's negative of its group, in the query's language
    plan = read_parquet(PLAN_PATH, PLAN_SCHEMA).to_pylist()
    candidates = read_parquet("data/parallel/candidates.parquet", CANDIDATES_SCHEMA).to_pandas().set_index(["lang", "candidate"])
    negative_of = {(r["group_id"], r["lang"]): r["negative"] for r in rows}
    planned = [r for r in plan if r["negative_candidate"] is not None]
    assert planned and all(r["group_id"] not in dev_groups for r in plan)
    for r in planned:
        assert r["negative_lang"] == r["query_lang"]
        assert candidates.loc[(r["negative_lang"], r["negative_candidate"]), "sentence"] == negative_of[r["group_id"], r["negative_lang"]]
    assert len(planned) == sum(r["group_id"] != "faq-11" for r in plan)  # the group without a negative gets none

    shutil.copytree(tiny_model_dir, tmp_path / "models/base")
    monkeypatch.setattr(sys, "argv", ["train"])
    train.main()
    assert re.search(r"the weights of step [123], best by dev multi_map", capsys.readouterr().out)
    curve = (tmp_path / "metrics/train_live/plots/metrics/dev/multi_map.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["step", "multi_map"] and [line.split("\t")[0] for line in curve[1:]] == ["1", "2", "3"]
    summary = json.loads((tmp_path / "metrics/train.json").read_text())
    assert summary["kept_step"] in (1, 2, 3) and load_params().data.train == "data/own/faq.jsonl"


@pytest.mark.slow
def test_dvc_reruns_fetch_when_a_file_in_data_own_changes(tmp_path):
    write_jsonl(tmp_path / "data/own/faq.jsonl", own_rows(4))
    (tmp_path / "data/own/README.md").write_text("your files\n", encoding="utf-8")
    _project(tmp_path, "data/own/faq.jsonl")  # and data.eval's xquad_r, from the mirror
    init_dvc_project(tmp_path, repo_stages("params", "fetch"))
    assert dvc(tmp_path, "repro", "fetch").returncode == 0
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "fetched")
    assert dvc(tmp_path, "status", "fetch", "-q").returncode == 0
    write_jsonl(tmp_path / "data/own/faq.jsonl", own_rows(5))
    status = dvc(tmp_path, "status", "fetch")
    assert "modified:           data/own" in status.stdout, status.stdout
    result = dvc(tmp_path, "repro", "fetch")
    assert result.returncode == 0 and "Running stage 'fetch'" in result.stdout, result.stderr
    assert set(pq.read_table(raw_tables(OWN_SOURCE, tmp_path / "data/raw")[0])["group_id"].to_pylist()) == {f"faq-{g}" for g in range(5)}
