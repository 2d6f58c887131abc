"""Tests of the `evaluate` stage: hand-worked scores, task building on a mirror slice, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from pipeline import evaluate, fetch
from pipeline.analysis import compare
from pipeline.common import PipelineError, _restore_hint, read_parquet, refuse_declared_outputs, run_stage
from pipeline.contracts import QUERIES_SCHEMA, QUESTIONS_SCHEMA
from pipeline.scoring import lareqa, mteb_tasks
from pipeline.scoring.encoding import encode_unique, load_model, saved_prefixes
from pipeline.scoring.lareqa import RetrievalTask, build_task, headline_figures, score_task, select_langs
from pipeline.scoring.metrics import ranks_of
from tests.helpers import REPO, mirror_file, write_params, write_raw

# --- score_task / summarize on hand-made scores --------------------------------------
#
# Languages en, de; groups g0, g1, g2; g2 has no de version (as in MLQA-R).
# Pool: en 0..11 (0, 1, 2 answer g0, g1, g2; 3..11 distractors), de 12..13 (answers of g0, g1).
# The pool embeddings are one-hot, so a query embedding is its row of scores.

EN, DE = 0, 1
POOL = 14
QUERIES = [  # (lang, answers [en, de], {pool index: score}; everything else scores 0)
    (EN, [0, 12], {0: 0.9, 1: 0.1, 2: 0.2, 3: 0.3, 12: 0.8}),
    (DE, [0, 12], {0: 0.2, **{i: 0.5 for i in range(3, 12)}, 12: 0.6, 13: 0.7}),
    (EN, [1, 13], {0: 0.5, 1: 0.4, 2: 0.1, 3: 0.6, 12: 0.2, 13: 0.3}),
    (DE, [1, 13], {0: 0.3, 1: 0.3, 3: 0.1, 12: 0.2, 13: 0.9}),  # en answer tied with candidate 0
    (EN, [2, -1], {2: 0.7, 3: 0.9, 13: 0.3}),
]
# Worked by hand (ranks are tie-pessimistic):
#   query  en pool: rank AP  R@1 | de pool: rank AP R@1 | multi ranks  AP                  R@10 dist
#   en g0          1    1    1   |          1    1   1  | 1, 2         1                   1    1
#   de g0          10   .1   0   |          2    .5  0  | 12, 2        (1/2 + 2/12)/2=1/3  .5   10
#   en g1          3    1/3  0   |          1    1   1  | 3, 4         (1/3 + 2/4)/2=5/12  1    1
#   de g1          2    .5   0   |          1    1   1  | 3, 1         (1 + 2/3)/2=5/6     1    2
#   en g2          2    .5   0   |          -           | 2            1/2                 1    0
PAIR_MAP = [[(1 + 1 / 3 + 1 / 2) / 3, 1.0], [(0.1 + 0.5) / 2, (0.5 + 1) / 2]]
PAIR_R1 = [[1 / 3, 1.0], [0.0, 0.5]]
LANG_MULTI_MAP = [(1 + 5 / 12 + 1 / 2) / 3, (1 / 3 + 5 / 6) / 2]
LANG_R10 = [1.0, (0.5 + 1) / 2]
LANG_DIST = [(1 + 1 + 0) / 3, (10 + 2) / 2]
# nDCG@10 of the multi ranks: gain 1/log2(rank + 1) for ranks <= 10, over the ideal list of R items
IDEAL_2 = 1 + 1 / np.log2(3)
LANG_NDCG = [
    (1 + (1 / np.log2(4) + 1 / np.log2(5)) / IDEAL_2 + 1 / np.log2(3)) / 3,  # ranks (1, 2), (3, 4), (2)
    ((1 / np.log2(3)) / IDEAL_2 + (1 / np.log2(4) + 1) / IDEAL_2) / 2,  # ranks (12, 2): 12 is cut; (3, 1)
]


def synthetic_task() -> tuple[RetrievalTask, np.ndarray, np.ndarray]:
    queries = np.zeros((len(QUERIES), POOL), dtype=np.float32)
    for q, (_, _, row) in enumerate(QUERIES):
        for c, score in row.items():
            queries[q, c] = score
    task = RetrievalTask(
        langs=["en", "de"],
        query_lang=np.array([lang for lang, _, _ in QUERIES]),
        query_id=np.array([f"g{answers[0]}" for _, answers, _ in QUERIES]),  # en answer c answers group gc
        query_paragraph=np.array([f"p{answers[0] // 2}" for _, answers, _ in QUERIES]),
        query_text=[f"q{q}" for q in range(len(QUERIES))],
        candidate_text=[f"c{c}" for c in range(POOL)],
        pool_offsets=np.array([0, 12, 14]),
        answers=np.array([answers for _, answers, _ in QUERIES], dtype=np.int64),
        candidate_paragraph=np.arange(POOL) // 2,  # paragraphs of two sentences
    )
    return task, queries, np.eye(POOL, dtype=np.float32)


def test_score_task_matches_hand_worked_ranks():
    scores = score_task(*synthetic_task())
    np.testing.assert_allclose(scores.pair_map.to_numpy(), PAIR_MAP, atol=1e-6)
    np.testing.assert_allclose(scores.pair_recall_at_1.to_numpy(), PAIR_R1, atol=1e-6)
    assert list(scores.pair_map.index) == list(scores.pair_map.columns) == ["en", "de"]
    assert list(scores.languages.index) == ["en", "de"]
    np.testing.assert_allclose(scores.languages["multi_map"], LANG_MULTI_MAP, atol=1e-6)
    np.testing.assert_allclose(scores.languages["multi_recall_at_10"], LANG_R10, atol=1e-6)
    np.testing.assert_allclose(scores.languages["rank_distance"], LANG_DIST, atol=1e-6)
    np.testing.assert_allclose(scores.languages["multi_ndcg_at_10"], LANG_NDCG, atol=1e-6)


def test_language_preference_and_top1_kinds_on_hand_worked_ranks():
    """Own-language first: every query's best answer is in its own language (see the table);
    chance is 1 / its answer languages. Top-1 in each pool (paragraphs: pairs 0-1, 2-3, ...)."""
    scores = score_task(*synthetic_task())
    np.testing.assert_allclose(scores.languages["language_preference"], [1.0, 1.0])
    np.testing.assert_allclose(scores.languages["language_preference_chance"], [(0.5 + 0.5 + 1) / 3, 0.5])
    pairs = scores.queries[scores.queries["setting"] != "multi"]
    top1 = {(q, p): kind for q, p, kind in zip(pairs["question_id"] + pairs["query_lang"], pairs["passage_lang"], pairs["top1"])}
    assert top1 == {
        ("g0en", "en"): "answer", ("g0en", "de"): "answer",
        ("g0de", "en"): "other", ("g0de", "de"): "sibling",  # en: 0.5 ties at 3..11 beat 0.2; de: 13 (0.7) shares g0's paragraph
        ("g1en", "en"): "other", ("g1en", "de"): "answer",  # en: 3 (0.6) is paragraph 1, the answer 1 is paragraph 0
        ("g1de", "en"): "sibling", ("g1de", "de"): "answer",  # en: 0 ties with the answer 1, same paragraph
        ("g2en", "en"): "sibling",  # en: 3 (0.9) shares paragraph 1 with the answer 2
    }  # fmt: skip
    summary = headline_figures(scores)
    assert summary["mono_sibling_errors"] == pytest.approx(2 / 3)  # errors: g0 de>de sibling, g1 en>en other, g2 en>en sibling
    assert summary["cross_sibling_errors"] == pytest.approx(1 / 2)  # g0 de>en other, g1 de>en sibling


def test_figures_by_resource_class_average_the_languages_of_each_class():
    languages = pd.DataFrame(
        {
            "mono_map": [0.9, 0.8, 0.5, 0.6],
            "multi_map": [0.6, 0.4, 0.2, 0.3],
            "rank_distance": [10.0, 20.0, 90.0, 50.0],
            "language_preference": [0.5, 0.3, 0.9, 0.7],
            "multi_ndcg_at_10": [0.0] * 4,  # not a class figure
        },
        index=["en", "de", "th", "hi"],  # classes 5, 5, 3, 4 (Joshi et al. 2020)
    )
    table = lareqa.by_resource_class(languages)
    assert table.index.tolist() == [3, 4, 5] and table.columns.tolist() == ["languages", *lareqa.CLASS_FIGURES]
    assert table.loc[5].tolist() == pytest.approx([2, 0.85, 0.5, 15.0, 0.4])
    assert table.loc[3].tolist() == pytest.approx([1, 0.5, 0.2, 90.0, 0.9])


def test_summarize_macro_averages_pairs_and_query_languages():
    summary = headline_figures(score_task(*synthetic_task()))
    expected = {
        "mono_map": (PAIR_MAP[0][0] + PAIR_MAP[1][1]) / 2,
        "cross_map": (PAIR_MAP[0][1] + PAIR_MAP[1][0]) / 2,
        "mono_recall_at_1": (1 / 3 + 1 / 2) / 2,
        "cross_recall_at_1": (1 + 0) / 2,
        "multi_map": sum(LANG_MULTI_MAP) / 2,  # over languages, not over the 5 queries
        "multi_recall_at_10": sum(LANG_R10) / 2,
        "multi_ndcg_at_10": sum(LANG_NDCG) / 2,
        "rank_distance": sum(LANG_DIST) / 2,  # 3.33; the mean over queries would be 2.8
        "language_preference": 1.0,
        "language_preference_chance": ((0.5 + 0.5 + 1) / 3 + 0.5) / 2,
        "mono_sibling_errors": 2 / 3,
        "cross_sibling_errors": 1 / 2,
    }
    assert summary.keys() == {*expected, "lang", "resource_class"}
    assert summary["resource_class"] == {"5": pytest.approx({"languages": 2, **{k: expected[k] for k in lareqa.CLASS_FIGURES}}, abs=1e-6)}
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-6), key
    assert list(summary["lang"]) == ["en", "de"]
    assert summary["lang"]["de"] == pytest.approx(
        {
            "mono_map": 0.75,
            "multi_map": 7 / 12,
            "multi_recall_at_10": 0.75,
            "multi_ndcg_at_10": LANG_NDCG[1],
            "rank_distance": 6.0,
            "language_preference": 1.0,
            "language_preference_chance": 0.5,
        },
        abs=1e-6,
    )
    assert summary["lang"]["en"]["mono_map"] == pytest.approx(11 / 18, abs=1e-6)
    json.dumps(summary, allow_nan=False)  # plain floats, JSON-ready


@pytest.mark.parametrize("block", [1, 2, 3])
def test_block_size_does_not_change_results(block):
    task, queries, pool = synthetic_task()
    whole, blocked = score_task(task, queries, pool, block=512), score_task(task, queries, pool, block=block)
    pd.testing.assert_frame_equal(blocked.pair_map, whole.pair_map)
    pd.testing.assert_frame_equal(blocked.pair_recall_at_1, whole.pair_recall_at_1)
    pd.testing.assert_frame_equal(blocked.languages, whole.languages)


@pytest.mark.parametrize(
    ("budget", "block", "rows"),
    [
        (2 * POOL + 1, None, [2, 2, 1]),  # SCORE_BUDGET // pool = 2 queries a block
        (1, None, [1] * 5),  # a pool over the budget still scores one query at a time
        (1, 4, [4, 1]),  # an explicit block overrides the budget
    ],
)
def test_default_block_follows_the_score_budget(budget, block, rows, monkeypatch):
    task, queries, pool = synthetic_task()
    seen = []

    def spy(scores, relevant_idx):
        if scores.shape[1] == POOL:  # the multilingual call, once per block
            seen.append(scores.shape[0])
        return ranks_of(scores, relevant_idx)

    monkeypatch.setattr(lareqa, "SCORE_BUDGET", budget)
    monkeypatch.setattr(lareqa, "ranks_of", spy)
    blocked, whole = score_task(task, queries, pool, block=block), score_task(task, queries, pool, block=512)
    assert seen == [*rows, 5]  # then the one block of the block=512 run
    pd.testing.assert_frame_equal(blocked.pair_map, whole.pair_map)
    pd.testing.assert_frame_equal(blocked.languages, whole.languages)


def test_score_task_on_random_embeddings_agrees_with_a_direct_computation():
    """Random pools of 3 languages with missing groups: every pair and multi figure from first principles."""
    rng = np.random.default_rng(0)
    langs, sizes = ["en", "de", "zh"], [7, 5, 6]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    groups = 12
    present = rng.random((groups, 3)) < 0.7
    present[:, 0] = True
    answer = np.stack([np.where(present[:, y], offsets[y] + rng.integers(0, sizes[y], groups), -1) for y in range(3)], 1)
    rows = [(g, x) for g in range(groups) for x in range(3) if present[g, x]]
    task = RetrievalTask(
        langs=langs,
        query_lang=np.array([x for _, x in rows]),
        query_id=np.array([f"g{g}" for g, _ in rows]),
        query_paragraph=np.array([f"p{g // 3}" for g, _ in rows]),
        query_text=[f"{g}{x}" for g, x in rows],
        candidate_text=[str(c) for c in range(offsets[-1])],
        pool_offsets=offsets,
        answers=answer[[g for g, _ in rows]],
        candidate_paragraph=np.concatenate([np.arange(n) // 3 for n in sizes]),
    )
    queries = rng.normal(size=(len(rows), 8)).astype(np.float32)
    pool = rng.normal(size=(offsets[-1], 8)).astype(np.float32)
    got = score_task(task, queries, pool, block=3)
    scores = queries @ pool.T
    paragraph = task.candidate_paragraph
    ap = {(x, y): [] for x in range(3) for y in range(3)}
    multi, own_first, top1 = {x: [] for x in range(3)}, {x: [] for x in range(3)}, []
    for q, (g, x) in enumerate(rows):
        for y in range(3):
            if answer[g, y] >= 0:
                own = scores[q, offsets[y] : offsets[y + 1]]
                ap[x, y].append(1 / (own >= scores[q, answer[g, y]]).sum())
                first = offsets[y] + int(np.argmax(own))  # random scores: no ties
                kind = "answer" if first == answer[g, y] else "sibling" if paragraph[first] == paragraph[answer[g, y]] else "other"
                top1.append((q, y, kind))
        ranks = sorted(int((scores[q] >= scores[q, a]).sum()) for a in answer[g] if a >= 0)
        multi[x].append(np.mean([(k + 1) / r for k, r in enumerate(ranks)]))
        best = max((a for a in answer[g] if a >= 0), key=lambda a: scores[q, a])
        own_first[x].append(float(offsets[x] <= best < offsets[x + 1]))
    for x in range(3):
        for y in range(3):
            want = np.mean(ap[x, y]) if ap[x, y] else np.nan
            np.testing.assert_allclose(got.pair_map.iloc[x, y], want, atol=1e-6, err_msg=f"{langs[x]}->{langs[y]}")
        np.testing.assert_allclose(got.languages["multi_map"].iloc[x], np.mean(multi[x]), atol=1e-6)
        np.testing.assert_allclose(got.languages["language_preference"].iloc[x], np.mean(own_first[x]), atol=1e-12)
    pairs = got.queries[got.queries["setting"] != "multi"]
    assert sorted(zip(pairs["question_id"], pairs["query_lang"], pairs["passage_lang"], pairs["top1"])) == sorted(
        (task.query_id[q], langs[rows[q][1]], langs[y], kind) for q, y, kind in top1
    )
    assert {kind for *_, kind in top1} == {"answer", "sibling", "other"}  # the draw exercises every kind


# --- build_task on a slice of the mirror -----------------------------------------------


def _doc(lang: str, articles: int = 2) -> dict:
    doc = json.loads(mirror_file(f"lareqa/xquad-r/{lang}.json").read_text(encoding="utf-8"))
    return {"data": doc["data"][:articles]}


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return {lang: _doc(lang) for lang in ("en", "de", "es")}


@pytest.fixture(scope="module")
def tables(docs) -> tuple[pa.Table, pa.Table]:
    parsed = [fetch.parse_lareqa(doc, lang, f"{lang}.json") for lang, doc in docs.items()]
    return pa.concat_tables([q for q, _ in parsed]), pa.concat_tables([c for _, c in parsed])


def _answer_texts(doc: dict) -> dict[str, str]:
    return {qa["id"]: qa["answers"][0]["text"] for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]}


def _questions_text(doc: dict) -> dict[str, str]:
    return {qa["id"]: qa["question"] for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]}


def _sentences(doc: dict) -> list[str]:
    return [p["context"][a:b] for art in doc["data"] for p in art["paragraphs"] for a, b in p["sentence_breaks"]]


def test_build_task_follows_langs_order_and_indexes_answer_sentences(docs, tables):
    questions, candidates = (t.to_pandas() for t in tables)
    dropped = set(questions.loc[questions["lang"] == "de", "group_id"].iloc[:5])  # absent in de, as in MLQA-R
    questions = questions[~((questions["lang"] == "de") & questions["group_id"].isin(dropped))]
    questions = questions.assign(question=questions["question"] + " #" + questions["group_id"])  # a query's group
    # shuffled rows must not matter
    task = build_task(questions.sample(frac=1, random_state=0), candidates.sample(frac=1, random_state=1), ["en", "de"], "x")

    assert task.langs == ["en", "de"]
    en, de = _sentences(docs["en"]), _sentences(docs["de"])
    assert task.pool_offsets.tolist() == [0, len(en), len(en) + len(de)]
    assert task.candidate_text == en + de  # en first although "de" < "en"; es left out
    n_en = (questions["lang"] == "en").sum()
    assert len(task.query_text) == n_en + (questions["lang"] == "de").sum() and task.answers.shape == (len(task.query_text), 2)

    answer_text = {lang: _answer_texts(docs[lang]) for lang in ("en", "de")}
    checked = absent = 0
    for q, (text, x) in enumerate(zip(task.query_text, task.query_lang)):
        question, group = text.rsplit(" #", 1)
        assert question == _questions_text(docs[task.langs[x]])[group]
        for y, lang in enumerate(task.langs):
            index = task.answers[q, y]
            if lang == "de" and group in dropped:
                assert index == -1
                absent += 1
                continue
            assert task.pool_offsets[y] <= index < task.pool_offsets[y + 1]
            assert answer_text[lang][group] in task.candidate_text[index]
            checked += 1
    assert absent == 5 and checked > 300
    assert (task.answers[:, 0] >= 0).all()  # every group exists in en


def test_build_task_rejects_an_answer_outside_its_pool(tables):
    questions, candidates = (t.to_pandas() for t in tables)
    n_de = (candidates["lang"] == "de").sum()
    questions.loc[questions.index[questions["lang"] == "de"][3], "answer_candidate"] = n_de
    with pytest.raises(PipelineError, match=r"^x/questions\.parquet: answer_candidate \d+ of question .+ \(de\)"):
        build_task(questions, candidates, ["de", "en"], "x")


def test_build_task_rejects_a_language_without_candidates(tables):
    questions, candidates = (t.to_pandas() for t in tables)
    with pytest.raises(PipelineError, match="language 'de' has no candidates"):
        build_task(questions, candidates[candidates["lang"] != "de"], ["en", "de"], "x")


def test_a_repeated_language_code_is_rejected():
    """--langs en,de,en would count en's pool twice (answers past the pool); it is an input error instead."""
    with pytest.raises(PipelineError, match=r"^xquad_r: language code\(s\) repeated: 'en'$"):
        select_langs(["de", "en", "es"], ["en", "de", "en"], "xquad_r")
    with pytest.raises(PipelineError, match=r"^xquad_r: language code\(s\) repeated: 'de', 'en'$"):
        select_langs(["de", "en", "es"], ["en", "de", "en", "de"], "xquad_r")
    assert select_langs(["de", "en", "es"], ["es", "en"], "xquad_r") == ["es", "en"]  # order kept


def test_an_empty_language_code_is_named():
    """`--langs en,` splits into 'en' and '': the error shows the empty code (issue 27), not a blank."""
    with pytest.raises(PipelineError, match=r"^xquad_r: unknown language code\(s\) '' \(available: de, en, es\)$"):
        select_langs(["de", "en", "es"], "en,".split(","), "xquad_r")
    with pytest.raises(PipelineError, match=r"^xquad_r: unknown language code\(s\) ' en' \(available: de, en, es\)$"):
        select_langs(["de", "en", "es"], "de, en".split(","), "xquad_r")


# --- encode_unique ----------------------------------------------------------------------


class RecordingModel(torch.nn.Module):
    """Stands in for a SentenceTransformer: records what it encodes, runs itself once per batch as
    sentence-transformers does, and embeds a text by its length and first char."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[str], dict]] = []

    @staticmethod
    def embed(text: str) -> list[float]:
        return [len(text), ord(text[0]) if text else 0]

    def forward(self, features: dict) -> dict:
        return features

    def encode(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        for start in range(0, len(texts), kwargs["batch_size"]):
            self({"input_ids": texts[start : start + kwargs["batch_size"]]})
        return np.array([self.embed(t) for t in texts], dtype=np.float64)


def test_encode_unique_encodes_each_distinct_text_once(capsys):
    texts = ["query: a", "passage: b", "query: a", "passage: bb", "passage: b", "passage: b", "query: c"]
    model = RecordingModel()
    embeddings, index = encode_unique(model, texts, batch_size=3)
    assert len(model.calls) == 1
    encoded, kwargs = model.calls[0]
    assert sorted(encoded) == sorted(set(texts))  # each once
    assert kwargs["batch_size"] == 3 and kwargs["normalize_embeddings"] is True and kwargs["show_progress_bar"] is False
    shown = capsys.readouterr()  # the project's own progress, counted by batch: 3 then 1 of 4 distinct texts
    assert [line.split(" [")[0] for line in shown.out.splitlines()] == ["encoding:  75% 3/4", "encoding: 100% 4/4"]
    assert "\r" not in shown.out + shown.err
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, 2)
    np.testing.assert_array_equal(embeddings[index], [RecordingModel.embed(t) for t in texts])


# --- strict model loading ----------------------------------------------------------------


def _copy_with(tiny_model_dir: Path, dest: Path, model_type: str | None = None, drop: str | None = None) -> Path:
    """The tiny model with config.json's model_type replaced, or one weight taken out of model.safetensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, dest)
    if model_type:
        config = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    if drop:
        weights = load_file(dest / "model.safetensors")
        save_file({name: w for name, w in weights.items() if name != drop}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_weights_that_do_not_fit_the_architecture_are_refused(tiny_model_dir, tmp_path):
    """config.json edited to gpt2 (issue 27) would build a random GPT-2 and score it; a missing weight a random layer."""
    assert load_model(str(tiny_model_dir), 64).encode(["query: hi"]).shape == (1, 32)  # the project's models load
    gpt2 = _copy_with(tiny_model_dir, tmp_path / "gpt2", model_type="gpt2")
    with pytest.raises(PipelineError, match=rf"^{gpt2}: the weights do not fit the GPT2Model that config.json describes \(\d+ missing: "):
        load_model(str(gpt2), 64)
    lacking = _copy_with(tiny_model_dir, tmp_path / "lacking", drop="pooler.dense.weight")
    with pytest.raises(PipelineError, match=rf"^{lacking}: the weights do not fit the BertModel .*\(1 missing: pooler.dense.weight\)"):
        load_model(str(lacking), 64)


# --- the CLI, end to end with a tiny model ----------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, docs) -> Path:
    """A stage directory with params.yaml and data/raw/xquad_r of 1 article x en, de, es."""
    root = tmp_path_factory.mktemp("evaluate")
    parsed = [fetch.parse_lareqa({"data": doc["data"][:1]}, lang, lang) for lang, doc in docs.items()]
    write_raw(root, pa.concat_tables([q for q, _ in parsed]), pa.concat_tables([c for _, c in parsed]))
    return root


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_end_to_end(workdir, tiny_model_dir):
    out = _cli(workdir, "--model", str(tiny_model_dir), "--dataset", "xquad_r", "--langs", "en,de", "--out", "m.json", "--plots", "plots")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((workdir / "m.json").read_text(encoding="utf-8"))
    assert list(report) == ["machine", "prefixes", "timing", "xquad_r"] and report["machine"]["precision"] in ("bf16", "fp32")
    assert report["prefixes"] == {"query": "", "passage": ""}  # by hand: the model's own prompts, and the tiny model has none
    assert "prefixes: query '' (the model was saved with none), passage '' (the model was saved with none)" in out.stdout
    assert "\r" not in out.stdout + out.stderr and "encoding: 100% " in out.stdout  # progress lines, not a bar's frames
    assert report["timing"]["xquad_r"]["texts_per_s"] > 0
    summary = report["xquad_r"]
    n_questions = len(pd.read_parquet(workdir / "data/raw/xquad_r/questions.parquet").query("lang == 'en'"))
    for key in ("mono_map", "cross_map", "multi_map", "mono_recall_at_1", "cross_recall_at_1", "multi_recall_at_10"):
        assert 0 <= summary[key] <= 1, key
    assert summary["rank_distance"] >= 0
    assert set(summary["lang"]) == {"en", "de"}  # write_json sorts keys
    assert set(summary["lang"]["en"]) == {
        "mono_map", "multi_map", "multi_recall_at_10", "multi_ndcg_at_10", "rank_distance", "language_preference", "language_preference_chance",
    }  # fmt: skip
    assert "xquad_r: Mo. mAP" in out.stdout
    assert (workdir / "results/model/mteb/README.txt").read_text(encoding="utf-8") == mteb_tasks.RESULTS_NOTE  # never an empty out

    # per-query results: every headline figure is the macro-average of them, recomputed independently
    per_query = read_parquet(workdir / "m_queries" / "xquad_r.parquet", QUERIES_SCHEMA).to_pandas()
    assert set(per_query["setting"]) == {"mono", "cross", "multi"}
    assert per_query.groupby("setting").size().to_dict() == {"mono": 2 * n_questions, "cross": 2 * n_questions, "multi": 2 * n_questions}
    recomputed = compare.headline(per_query)
    for key in ("mono_map", "cross_map", "multi_map", "multi_recall_at_10", "rank_distance"):
        assert recomputed[key] == pytest.approx(summary[key], abs=1e-6), key  # eval.json rounds to 6 digits
    multi = per_query[per_query["setting"] == "multi"]
    own_first = multi.groupby("query_lang")["own_language_first"].mean().mean()
    assert summary["language_preference"] == pytest.approx(own_first, abs=1e-6)
    mono = per_query[per_query["setting"] == "mono"]
    assert set(mono["top1"]) <= {"answer", "sibling", "other"} and mono["top1"].notna().all() and multi["top1"].isna().all()
    assert (mono["top1"] == "answer").mean() == pytest.approx(summary["mono_recall_at_1"], abs=1e-6)  # same size per language

    pairs = pd.read_csv(workdir / "plots" / "pairs.csv")
    assert len(pairs) == 4 and list(pairs.columns) == ["dataset", "query_lang", "passage_lang", "map"]
    assert set(zip(pairs.query_lang, pairs.passage_lang)) == {("en", "en"), ("en", "de"), ("de", "en"), ("de", "de")}
    mono = pairs[pairs.query_lang == pairs.passage_lang].set_index("query_lang")["map"]
    assert mono["en"] == pytest.approx(summary["lang"]["en"]["mono_map"], abs=1e-6)
    languages = pd.read_csv(workdir / "plots" / "languages.csv")
    assert languages["lang"].tolist() == ["en", "de"]
    classes = pd.read_csv(workdir / "plots" / "resource_classes.csv")  # en and de are both class 5
    assert classes["resource_class"].tolist() == ["class 5"] and classes["languages"].tolist() == [2]
    assert classes["multi_map"].iloc[0] == pytest.approx(summary["resource_class"]["5"]["multi_map"], abs=1e-6)
    assert "class 5 (2 languages" in out.stdout

    # the noise report (params.yaml's default noises; fewer than noise_queries questions: all of them)
    noise = summary["noise"]
    assert noise["queries"] == len(pd.read_parquet(workdir / "data/raw/xquad_r/questions.parquet").query("lang in ['en', 'de']"))
    assert set(noise) == {"queries", "clean", "typo_0.05", "typo_0.15", "no_diacritics", "lowercase"}
    for name in ("typo_0.05", "typo_0.15", "no_diacritics", "lowercase"):
        figures = noise[name]
        assert figures["unchanged"] == sum(figures["unchanged_by_lang"].values())
    assert noise["lowercase"]["unchanged"] == 0  # every en and de question starts with a capital
    for key in ("mono_map", "cross_map", "multi_map"):  # every question is in the sample: clean = the headline
        assert noise["clean"][key] == pytest.approx(summary[key], abs=1e-6)
    curve = pd.read_csv(workdir / "plots" / "noise.csv")
    assert curve["noise"].tolist() == ["clean", "typo_0.05", "typo_0.15", "no_diacritics", "lowercase"]
    assert list(curve.columns) == ["dataset", "noise", "mono_map", "cross_map", "multi_map"]
    assert "xquad_r under noise" in out.stdout
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]  # no leftovers of atomic writes


def _assert_error(code: int, stderr: str, match: str, out: Path) -> None:
    """Exit 2, `error: ...` as the only stderr line (no traceback, no progress bars), no output written."""
    assert code == 2
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert match in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_cli_unknown_dataset(workdir):
    out = _cli(workdir, "--model", "nowhere", "--dataset", "xquad_r,nope", "--out", "bad.json")
    _assert_error(out.returncode, out.stderr, "unknown evaluation dataset 'nope'", workdir / "bad.json")


@pytest.mark.slow
def test_cli_model_that_does_not_load(workdir, tmp_path):
    (tmp_path / "empty").mkdir()
    out = _cli(workdir, "--model", str(tmp_path / "empty"), "--dataset", "xquad_r", "--out", "bad.json")
    _assert_error(out.returncode, out.stderr, "not a sentence-transformers model (no modules.json)", workdir / "bad.json")


def _run_in_process(cwd: Path, monkeypatch, capfd, *args: str) -> tuple[int, str]:
    """`python -m pipeline.evaluate ARGS` in this process (the model is loaded already, saving ~10 s a run)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["evaluate", *args])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_stage(evaluate.main)
    return exit_.value.code, capfd.readouterr().err


def test_cli_unknown_language(workdir, tiny_model_dir, monkeypatch, capfd):
    code, err = _run_in_process(
        workdir, monkeypatch, capfd, "--model", str(tiny_model_dir), "--dataset", "xquad_r", "--langs", "en,xx", "--out", "bad.json"
    )
    _assert_error(code, err, "unknown language code(s) 'xx' (available: de, en, es)", workdir / "bad.json")


def _with_prompts(tiny_model_dir: Path, dest: Path, prompts: dict[str, str]) -> Path:
    """The tiny model saved with these prompts (config_sentence_transformers.json), as e5 models on the hub are."""
    shutil.copytree(tiny_model_dir, dest)
    config = json.loads((dest / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    (dest / "config_sentence_transformers.json").write_text(json.dumps({**config, "prompts": prompts}), encoding="utf-8")
    return dest


def test_saved_prefixes_are_the_prompts_encode_query_and_encode_document_use(tiny_model_dir, tmp_path):
    model = _with_prompts(tiny_model_dir, tmp_path / "e5", {"query": "query: ", "passage": "passage: ", "document": ""})
    assert saved_prefixes(str(model)) == {"query": ("query: ", "query"), "passage": ("passage: ", "passage")}
    assert saved_prefixes(str(tiny_model_dir)) == {"query": ("", "query"), "passage": ("", "document")}  # none saved
    assert saved_prefixes(str(tmp_path / "nowhere"))["query"] == ("", "query")  # loading it says why it is not there


@pytest.mark.parametrize(
    ("source", "flags", "expected"),
    [
        ("model", (None, None), {"query": ("q: ", "the model's saved prompt 'query'"), "passage": ("", "the model was saved with none")}),
        ("params", (None, None), {"query": ("query: ", "params.yaml model.query_prefix"), "passage": ("passage: ", "params.yaml model.passage_prefix")}),
        ("model", (None, "doc: "), {"query": ("q: ", "the model's saved prompt 'query'"), "passage": ("doc: ", "--passage-prefix")}),
        ("params", ("", None), {"query": ("", "--query-prefix"), "passage": ("passage: ", "params.yaml model.passage_prefix")}),
    ],
)  # fmt: skip
def test_prefixes_are_the_models_own_unless_the_stage_or_a_flag_says_otherwise(source, flags, expected):
    saved = {"query": ("q: ", "query"), "passage": ("", "document")}
    assert evaluate.choose_prefixes(source, ("query: ", "passage: "), saved, *flags) == expected


def test_a_model_scored_by_hand_gets_its_own_prompts_and_the_output_says_so(workdir, tiny_model_dir, tmp_path, monkeypatch, capfd):
    model = _with_prompts(tiny_model_dir, tmp_path / "prompted", {"query": "q: ", "document": "d: "})
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model", str(model), "--langs", "en", "--out", str(tmp_path / "e.json")])
    run_stage(evaluate.main)
    printed = capfd.readouterr().out
    assert "prefixes: query 'q: ' (the model's saved prompt 'query'), passage 'd: ' (the model's saved prompt 'document')" in printed
    assert json.loads((tmp_path / "e.json").read_text())["prefixes"] == {"query": "q: ", "passage": "d: "}


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("xquad_r", "data/raw/xquad_r: not made yet; run `dvc repro fetch` first"),
        ("mlqa_r", "data/raw/mlqa_r: not made yet; add it to data.eval in params.yaml, then run `dvc repro fetch`"),
    ],
)
def test_a_dataset_not_fetched_says_to_run_fetch_first(tmp_path, monkeypatch, capfd, dataset, message):
    write_params(tmp_path, **{"data.train": "xquad_r"})  # data.eval is [xquad_r]: mlqa_r is not fetched at all
    code, err = _run_in_process(tmp_path, monkeypatch, capfd, "--model", "unused", "--dataset", dataset, "--out", "bad.json")
    _assert_error(code, err, message, tmp_path / "bad.json")


@pytest.fixture
def out_of_range_dir(tables, tmp_path) -> tuple[Path, int]:
    """A stage directory whose first en question points one past the last en candidate."""
    questions, candidates = tables
    n_en = pc.sum(pc.equal(candidates["lang"], "en")).as_py()
    answers = questions["answer_candidate"].to_pylist()
    answers[pc.equal(questions["lang"], "en").to_pylist().index(True)] = n_en
    questions = questions.set_column(3, "answer_candidate", pa.array(answers, pa.int32()))
    write_raw(tmp_path, questions, candidates)
    read_parquet(tmp_path / "data/raw/xquad_r/questions.parquet", QUESTIONS_SCHEMA)  # the file itself is valid
    return tmp_path, n_en


def test_cli_answer_out_of_range(out_of_range_dir, tiny_model_dir, monkeypatch, capfd):
    root, n_en = out_of_range_dir
    code, err = _run_in_process(root, monkeypatch, capfd, "--model", str(tiny_model_dir), "--dataset", "xquad_r", "--out", "bad.json")
    _assert_error(code, err, f"answer_candidate {n_en} of question", root / "bad.json")


@pytest.mark.parametrize("case", ["unknown_language", "empty_language", "repeated_language", "answer_out_of_range"])
def test_bad_input_is_rejected_before_the_model_loads(case, workdir, out_of_range_dir, monkeypatch, capfd):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(evaluate, "load_model", no_model)
    root, args, match = {
        "unknown_language": (workdir, ["--langs", "en,xx"], "xquad_r: unknown language code(s) 'xx'"),
        "empty_language": (workdir, ["--langs", "en,"], "xquad_r: unknown language code(s) '' (available: de, en, es)"),
        "repeated_language": (workdir, ["--langs", "en,de,en"], "xquad_r: language code(s) repeated: 'en'"),
        "answer_out_of_range": (out_of_range_dir[0], [], f"answer_candidate {out_of_range_dir[1]} of question"),
    }[case]
    code, err = _run_in_process(root, monkeypatch, capfd, "--model", "unused", "--dataset", "xquad_r", "--out", "bad.json", *args)
    _assert_error(code, err, match, root / "bad.json")


@pytest.mark.slow
def test_scored_by_hand_results_go_to_an_untracked_folder_named_after_the_model(workdir, tiny_model_dir, tmp_path, monkeypatch):
    """Without --out, `python -m pipeline.evaluate --model X` once replaced the tracked metrics/eval.json (issue 27)."""
    root = tmp_path / "project"
    shutil.copytree(workdir, root, ignore=shutil.ignore_patterns("results", "metrics"))
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model", str(tiny_model_dir), "--dataset", "xquad_r", "--langs", "en,de"])
    run_stage(evaluate.main)
    assert json.loads((root / "results/model/eval.json").read_text())["xquad_r"]["lang"].keys() == {"en", "de"}
    assert (root / "results/model/eval_queries/xquad_r.parquet").exists() and (root / "results/model/mteb").is_dir()
    assert not (root / "metrics").exists()
    assert evaluate.results_dir("intfloat/multilingual-e5-small") == Path("results/multilingual-e5-small")  # a hub id


@pytest.fixture(scope="module")
def dvc_project(workdir, tmp_path_factory) -> Path:
    """The evaluation inputs in a DVC project whose dvc.yaml is the repository's (the tests only read it)."""
    root = tmp_path_factory.mktemp("dvc") / "project"
    shutil.copytree(workdir, root, ignore=shutil.ignore_patterns("results", "metrics"))
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=root, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}
    )
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "metrics/eval.json"], "metrics/eval.json: is an output of stage evaluate@retriever in dvc.yaml, which only `dvc repro` writes (choose another path)"),
        (["--out", "metrics/eval_base.json"], "metrics/eval_base.json: is an output of stage evaluate@base in dvc.yaml"),
        (["--out", "elsewhere.json", "--mteb-results", "metrics/eval_mteb"], "metrics/eval_mteb: is an output of stage evaluate@retriever"),
        (["--out", "elsewhere.json", "--plots", "metrics/eval_plots/extra"], "metrics/eval_plots/extra: would replace metrics/eval_plots, an output of stage evaluate@retriever"),
        (["--out", "elsewhere.json", "--plots", "models"], "models: would replace models/"),
    ],
)  # fmt: skip
def test_outside_dvc_repro_no_declared_output_is_written(dvc_project, monkeypatch, capfd, args, message):
    monkeypatch.delenv("DVC_STAGE", raising=False)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(evaluate, "load_model", no_model)
    before = sorted(path for path in dvc_project.rglob("*") if ".dvc" not in path.parts)
    code, err = _run_in_process(dvc_project, monkeypatch, capfd, "--model", "models/retriever", "--dataset", "xquad_r", *args)
    _assert_error(code, err, message, dvc_project / "elsewhere.json")
    assert sorted(path for path in dvc_project.rglob("*") if ".dvc" not in path.parts) == before


def test_under_dvc_repro_the_stage_writes_its_outputs_and_its_hint_names_each(dvc_project, monkeypatch):
    """DVC sets DVC_STAGE for a stage's command: its outputs are its own to write, and a failure's hint says how to
    restore what DVC removed: the cached ones by `dvc checkout`, the rest by git (not the persist MTEB results)."""
    monkeypatch.chdir(dvc_project)
    monkeypatch.setenv("DVC_STAGE", "evaluate@retriever")
    refuse_declared_outputs(["metrics/eval.json", "metrics/eval_queries", "metrics/eval_plots", "metrics/eval_mteb"])
    assert _restore_hint() == (
        " (dvc removed this stage's outputs before running it: `dvc checkout evaluate@retriever` restores metrics/eval_queries; "
        "`git checkout -- metrics/eval_plots metrics/eval.json` restores the rest as last committed)"
    )
    monkeypatch.delenv("DVC_STAGE")
    assert _restore_hint() == ""


def test_per_query_rows_give_the_headline_figures_exactly():
    """compare.py's macro-average of the per-query rows is eval.json's figure, not an approximation of it."""
    scores = score_task(*synthetic_task())
    pair_map, diagonal = scores.pair_map.to_numpy(), np.eye(2, dtype=bool)
    recomputed = compare.headline(scores.queries)
    assert abs(recomputed["mono_map"] - np.nanmean(pair_map[diagonal])) < 1e-9
    assert abs(recomputed["cross_map"] - np.nanmean(pair_map[~diagonal])) < 1e-9
    assert abs(recomputed["multi_map"] - scores.languages["multi_map"].mean()) < 1e-9
    assert abs(recomputed["rank_distance"] - scores.languages["rank_distance"].mean()) < 1e-9
    assert len(scores.queries) == 5 + 4 + 5  # 5 queries mono, 4 with a cross answer (g2 has no de), 5 multi


@pytest.mark.slow
def test_cli_checks_where_it_writes_before_any_work(workdir, tiny_model_dir):
    """An output under a file fails in seconds with one line, before the model loads; nothing is written."""
    out = _cli(workdir, "--model", str(tiny_model_dir), "--out", "params.yaml/eval.json", "--plots", "late_plots")
    _assert_error(
        out.returncode,
        out.stderr,
        "params.yaml/eval.json: cannot write there (params.yaml is a file, not a folder)",
        workdir / "late_plots",
    )
    assert "Loading weights" not in out.stderr


@pytest.mark.slow
def test_cli_names_a_missing_model_directory(workdir):
    out = _cli(workdir, "--model", "/nonexistent", "--out", "gone.json")
    _assert_error(out.returncode, out.stderr, "/nonexistent: no such directory", workdir / "gone.json")
