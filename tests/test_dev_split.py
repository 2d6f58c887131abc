"""The dev split: articles of the training source held out, never trained on, scored apart (issue #28).

Article and paragraph ids are shared across languages (`fetch.link_across_languages`), so a
held-out article takes every translation of every question in it, and no paragraph leaks.
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import evaluate, fetch, translate
from pipeline.common import PipelineError, read_parquet
from pipeline.contracts import CANDIDATES_SCHEMA, DEV_DIR, PAIRS_PATH, PAIRS_SCHEMA, QUESTIONS_SCHEMA, pairs_stamp
from pipeline.params import load_params
from pipeline.sources.catalogue import XQUAD_R
from tests.helpers import mirror_file, write_params, write_raw

LANGS = ("de", "en", "zh")
ARTICLES = 10


def test_units_linked_by_a_question_are_one_across_languages():
    rows = [
        # group, lang, local article, local paragraph
        ("g1", "de", "de:0", "de:0"),
        ("g1", "en", "en:5", "en:7"),
        ("g2", "en", "en:5", "en:7"),  # g2 shares g1's English paragraph: one paragraph with g1 in every language
        ("g2", "zh", "zh:3", "zh:1"),
        ("g3", "de", "de:0", "de:2"),  # same German article as g1, another paragraph
        ("g4", "zh", "zh:9", "zh:9"),  # alone
    ]
    table = pa.table(
        {
            "group_id": [r[0] for r in rows],
            "lang": [r[1] for r in rows],
            "question": ["?"] * len(rows),
            "answer_candidate": pa.array([0] * len(rows), pa.int32()),
            "article": [r[2] for r in rows],
            "paragraph": [r[3] for r in rows],
        },
        schema=QUESTIONS_SCHEMA,
    )
    linked = fetch.link_across_languages(table).to_pandas()
    article, paragraph = linked["article"].tolist(), linked["paragraph"].tolist()
    assert article[:5] == ["a00000"] * 5 and article[5] == "a00001"
    assert paragraph[:4] == ["p00000"] * 4 and paragraph[4] == "p00001" and paragraph[5] == "p00002"
    assert fetch.link_across_languages(table).equals(fetch.link_across_languages(table))  # deterministic


@pytest.fixture(scope="module")
def source() -> tuple[pa.Table, pa.Table]:
    """The first ARTICLES articles of XQuAD-R in LANGS, as `fetch` writes them."""
    parsed = []
    for lang in LANGS:
        doc = json.loads(mirror_file(f"{XQUAD_R.mirror_dir}/{lang}.json").read_text(encoding="utf-8"))
        parsed.append(fetch.parse_lareqa({"data": doc["data"][:ARTICLES]}, lang, lang))
    return fetch.link_across_languages(pa.concat_tables([q for q, _ in parsed])), pa.concat_tables([c for _, c in parsed])


def test_the_dev_articles_are_a_share_of_them_chosen_without_any_seed(source):
    questions, _ = source
    dev = translate.dev_articles(questions, 0.2, "x")
    assert len(dev) == 2 and dev == translate.dev_articles(questions, 0.2, "x")
    assert translate.dev_articles(questions, 0.0, "x") == set()
    with pytest.raises(PipelineError, match=r"data.dev_share: 0.01 of the 10 articles of x holds out 0: a dev split needs"):
        translate.dev_articles(questions, 0.01, "x")


def test_the_split_shares_no_question_and_keeps_every_dev_answer(source):
    questions, candidates = source
    dev = translate.dev_articles(questions, 0.2, "x")
    train_q, dev_q, dev_c = translate.split_dev(questions, candidates, dev)
    assert train_q.num_rows + dev_q.num_rows == questions.num_rows
    assert not set(train_q["group_id"].to_pylist()) & set(dev_q["group_id"].to_pylist())
    assert set(dev_q["article"].to_pylist()) == dev and not set(train_q["article"].to_pylist()) & dev
    assert not set(train_q["paragraph"].to_pylist()) & set(dev_q["paragraph"].to_pylist())
    # the dev pool is the held-out paragraphs' sentences, renumbered 0..n-1 per language, every answer the same sentence
    sentence = {(r["lang"], r["candidate"]): r["sentence"] for r in candidates.to_pylist()}
    original = {(r["group_id"], r["lang"]): r["answer_candidate"] for r in questions.to_pylist()}
    dev_sentence = {(r["lang"], r["candidate"]): r["sentence"] for r in dev_c.to_pylist()}
    for row in dev_q.to_pylist():
        assert dev_sentence[row["lang"], row["answer_candidate"]] == sentence[row["lang"], original[row["group_id"], row["lang"]]]
    for lang in LANGS:
        numbers = dev_c.filter(pc.equal(dev_c["lang"], lang))["candidate"].to_pylist()
        assert numbers == list(range(len(numbers)))
    assert dev_c.num_rows < candidates.num_rows / 3


def test_translate_trains_on_the_rest_and_evaluate_scores_the_dev_split(source, tmp_path, monkeypatch, tiny_model_dir, capsys):
    write_raw(tmp_path, *source)
    write_params(tmp_path, **{"data.train": "xquad_r", "data.dev_share": 0.2, "evaluate.noise": ["lowercase"]})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as refused:  # training on the test set's own questions
        translate.main()
    train_groups = len(set(source[0]["group_id"].to_pylist()))
    assert str(refused.value).startswith("data/raw/xquad_r/questions.parquet: ") and " of its questions are training questions" in str(
        refused.value
    )
    assert int(str(refused.value).split(": ")[1].split(" ")[0].replace(",", "")) < train_groups  # the dev split's are not counted
    assert str(refused.value).endswith("(set data.allow_eval_overlap: true if that is what you want)")
    assert not (tmp_path / DEV_DIR).exists() and not (tmp_path / PAIRS_PATH).exists()
    write_params(
        tmp_path, **{"data.train": "xquad_r", "data.dev_share": 0.2, "data.allow_eval_overlap": True, "evaluate.noise": ["lowercase"]}
    )
    translate.main()
    params = load_params("params.yaml")
    stamp = pairs_stamp("xquad_r", 0.2)
    pairs = read_parquet(PAIRS_PATH, PAIRS_SCHEMA, made_by=stamp)
    dev_q = read_parquet(DEV_DIR / "questions.parquet", QUESTIONS_SCHEMA, made_by=stamp)
    read_parquet(DEV_DIR / "candidates.parquet", CANDIDATES_SCHEMA, made_by=stamp)
    assert not set(pairs["group_id"].to_pylist()) & set(dev_q["group_id"].to_pylist())
    report = json.loads((tmp_path / "metrics/translate.json").read_text())
    assert report["dev.articles"] == 2 and report["dev.questions"] == dev_q.num_rows > 0
    assert report["groups"] + report["dev.groups"] == len(set(source[0]["group_id"].to_pylist()))

    questions, candidates, _ = evaluate.read_source_tables("dev", params.data)
    assert len(questions) == dev_q.num_rows
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model", str(tiny_model_dir), "--dataset", "dev", "--out", "dev.json"])
    evaluate.main()
    scored = json.loads((tmp_path / "dev.json").read_text())
    assert set(scored) == {"machine", "prefixes", "timing", "dev"} and 0 < scored["dev"]["mono_map"] <= 1
    assert "noise" not in scored["dev"]  # the dev split is for choices: headline figures only
    assert not (tmp_path / "metrics/eval_mteb").exists()
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model", str(tiny_model_dir), "--dataset", "dev,xquad_r", "--out", "both.json"])
    with pytest.raises(PipelineError, match=r"--dataset: evaluate the dev split alone"):
        evaluate.main()
