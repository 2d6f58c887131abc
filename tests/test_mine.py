"""Tests of the `mine` stage (hard negatives the base model ranks highest) and of `batches` picking them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import batches, mine
from pipeline.batches import plan_batches, plan_negatives
from pipeline.common import PipelineError, write_parquet
from pipeline.contracts import CANDIDATES_SCHEMA, MINED_SCHEMA, PLAN_SCHEMA, QUESTIONS_SCHEMA, pairs_stamp
from pipeline.params import load_params, mined_made_by
from pipeline.training import negatives
from pipeline.training.negatives import mine_negatives
from tests.helpers import write_params

LANGS = ("de", "en")


def corpus(n_groups: int = 8, only_en: int = 2) -> tuple[pa.Table, pa.Table]:
    """Groups g0.. in de and en (the last `only_en` in en alone); per language, paragraphs of two groups'
    answers and two more sentences. In en, one sentence repeats g0's answer and another is said twice."""
    questions, candidates = [], []
    for lang in LANGS:
        groups = [g for g in range(n_groups) if lang == "en" or g < n_groups - only_en]
        texts, answers = [], {}
        for start in range(0, len(groups), 2):
            for g in groups[start : start + 2]:
                answers[g] = len(texts)
                texts.append(f"{lang} answer of g{g}.")
            texts += [f"{lang} filler {start} a.", f"{lang} filler {start} b."]
        if lang == "en":
            texts += [texts[answers[0]], "en said twice.", "en said twice."]
        candidates += [
            {"lang": lang, "candidate": i, "paragraph": i // 4, "sentence_index": i % 4, "sentence": text} for i, text in enumerate(texts)
        ]
        questions += [
            {"group_id": f"g{g}", "lang": lang, "question": f"{lang} question {g}?", "answer_candidate": answers[g], "article": "a", "paragraph": "p"}
            for g in groups
        ]  # fmt: skip
    return pa.Table.from_pylist(questions, schema=QUESTIONS_SCHEMA), pa.Table.from_pylist(candidates, schema=CANDIDATES_SCHEMA)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def embeddings(questions: pa.Table, candidates: pa.Table, seed: int = 0, aligned: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors; equal texts embed equally, as a model embeds them. `aligned`: a perfect model, where a
    group's questions and answers in every language embed as one vector (each positive scores 1, above the rest)."""
    rng = np.random.default_rng(seed)
    texts = sorted(set(candidates["sentence"].to_pylist()))
    by_text = dict(zip(texts, unit(rng.normal(size=(len(texts), 8)))))
    if aligned:
        by_text |= {t: by_text[f"en answer of {t.split()[-1][:-1]}."] for t in texts if " answer of " in t}
        return np.stack([by_text[f"en answer of {g}."] for g in questions["group_id"].to_pylist()]), np.stack(
            [by_text[t] for t in candidates["sentence"].to_pylist()]
        )
    return unit(rng.normal(size=(questions.num_rows, 8))), np.stack([by_text[t] for t in candidates["sentence"].to_pylist()])


def brute_force(questions, candidates, question_embeddings, candidate_embeddings, top_k, margin) -> list[tuple]:
    """MINED_SCHEMA's rows, candidate by candidate, as the module docstring says."""
    cands = candidates.to_pylist()
    rows = questions.to_pylist()
    answer = {(r["group_id"], r["lang"]): next(i for i, c in enumerate(cands) if (c["lang"], c["candidate"]) == (r["lang"], r["answer_candidate"])) for r in rows}  # fmt: skip
    out = []
    for i, r in enumerate(rows):
        for lang in sorted({lang for g, lang in answer if g == r["group_id"]}):
            a = answer[(r["group_id"], lang)]
            positive = float(question_embeddings[i] @ candidate_embeddings[a])
            seen, kept = set(), []
            for j in sorted((j for j, c in enumerate(cands) if c["lang"] == lang), key=lambda j: cands[j]["candidate"]):
                sentence = cands[j]["sentence"]
                if sentence in seen:
                    continue
                seen.add(sentence)
                score = float(question_embeddings[i] @ candidate_embeddings[j])
                if sentence == cands[a]["sentence"] or score > positive - abs(positive) * margin:
                    continue
                kept.append((-score, cands[j]["candidate"]))
            out += [(r["group_id"], r["lang"], lang, rank, c) for rank, (_, c) in enumerate(sorted(kept)[:top_k])]
    return sorted(out)


def keys(mined: pa.Table) -> list[tuple]:
    return sorted(zip(*(mined[c].to_pylist() for c in ("group_id", "query_lang", "negative_lang", "rank", "negative_candidate"))))


# --- mining ---------------------------------------------------------------------------


@pytest.mark.parametrize("top_k, margin", [(1, 0.0), (3, 0.05), (20, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_mined_negatives_are_the_top_k_after_the_guards(top_k, margin, seed, monkeypatch):
    monkeypatch.setattr(negatives, "ROWS_PER_BLOCK", 5)  # several blocks per language
    questions, candidates = corpus()
    embedded = embeddings(questions, candidates, seed)
    mined, skipped = mine_negatives(questions, candidates, *embedded, top_k, margin)
    assert mined.schema.equals(MINED_SCHEMA)
    assert keys(mined) == brute_force(questions, candidates, *embedded, top_k, margin)
    scores = mined.to_pandas().groupby(["group_id", "query_lang", "negative_lang"])["score"]
    assert scores.apply(lambda s: bool(np.all(np.diff(s.to_numpy()) <= 0))).all()  # best first
    assert mine_negatives(questions, candidates, *embedded, top_k, margin)[0].equals(mined)  # deterministic
    assert skipped["skipped.same_text"] == 26 + 2  # each list's answer; g0's two en lists also its copy


def test_the_positive_its_copies_and_other_languages_are_never_mined():
    questions, candidates = corpus()
    mined = mine_negatives(questions, candidates, *embeddings(questions, candidates, aligned=True), 50, 0.0)[0].to_pylist()
    sentence = {(c["lang"], c["candidate"]): c["sentence"] for c in candidates.to_pylist()}
    answer = {(q["group_id"], q["lang"]): sentence[(q["lang"], q["answer_candidate"])] for q in questions.to_pylist()}
    for row in mined:
        assert sentence[(row["negative_lang"], row["negative_candidate"])] != answer[(row["group_id"], row["negative_lang"])]
    assert {(r["group_id"], r["negative_lang"]) for r in mined if r["group_id"] in ("g6", "g7")} == {("g6", "en"), ("g7", "en")}  # en only
    per_list = {}
    for r in mined:
        per_list.setdefault((r["group_id"], r["query_lang"], r["negative_lang"]), []).append(
            sentence[(r["negative_lang"], r["negative_candidate"])]
        )
    assert all(len(texts) == len(set(texts)) for texts in per_list.values())  # "en said twice." once
    assert len(per_list) == 6 * 4 + 2  # each question x each language of its group
    g0_en = [texts for (g, _, lang), texts in per_list.items() if (g, lang) == ("g0", "en")]
    assert g0_en and all("en answer of g0." not in texts for texts in g0_en)  # the copy of the answer too


def test_the_margin_drops_candidates_too_close_to_the_positive_whatever_its_sign():
    """One question, its answer and three others; scores set by hand: 0.97 is within 5% of a positive of 1.0,
    0.90 is not; with a positive of -0.5, -0.52 is within 10% of it and -0.6 is not."""
    questions = pa.Table.from_pylist(
        [{"group_id": "g", "lang": "en", "question": "q?", "answer_candidate": 0, "article": "a", "paragraph": "p"}],
        schema=QUESTIONS_SCHEMA,
    )
    candidates = pa.Table.from_pylist(
        [{"lang": "en", "candidate": i, "paragraph": 0, "sentence_index": i, "sentence": f"s{i}"} for i in range(4)],
        schema=CANDIDATES_SCHEMA,
    )
    q = np.array([[1.0, 0.0]])

    def at(*scores: float) -> np.ndarray:
        return np.array([[s, np.sqrt(1 - s * s)] for s in scores])

    mined, skipped = mine_negatives(questions, candidates, q, at(1.0, 0.97, 0.90, 0.2), 5, 0.05)
    assert mined["negative_candidate"].to_pylist() == [2, 3] and skipped == {"skipped.same_text": 1, "skipped.margin": 1}
    assert np.allclose(mined["score"].to_pylist(), [0.9, 0.2])
    assert mine_negatives(questions, candidates, q, at(1.0, 0.97, 0.90, 0.2), 1, 0.05)[0]["negative_candidate"].to_pylist() == [2]
    mined, skipped = mine_negatives(questions, candidates, q, at(-0.5, -0.52, -0.6, -0.49), 5, 0.1)
    assert mined["negative_candidate"].to_pylist() == [2] and skipped["skipped.margin"] == 2
    assert mine_negatives(questions, candidates, q, at(-0.5, -0.52, -0.6, -0.49), 5, 0.0)[0]["negative_candidate"].to_pylist() == [1, 2]


def test_ties_go_to_the_lower_candidate_id():
    questions = pa.Table.from_pylist(
        [{"group_id": "g", "lang": "en", "question": "q?", "answer_candidate": 3, "article": "a", "paragraph": "p"}],
        schema=QUESTIONS_SCHEMA,
    )
    candidates = pa.Table.from_pylist(
        [{"lang": "en", "candidate": i, "paragraph": 0, "sentence_index": i, "sentence": f"s{i}"} for i in (2, 0, 1, 3)],
        schema=CANDIDATES_SCHEMA,
    )
    equal = np.array([[0.6, 0.8]] * 3 + [[1.0, 0.0]])
    assert mine_negatives(questions, candidates, np.array([[1.0, 0.0]]), equal, 2, 0.05)[0]["negative_candidate"].to_pylist() == [0, 1]


def test_an_answer_outside_the_candidates_is_named():
    questions, candidates = corpus()
    broken = questions.set_column(3, "answer_candidate", pa.array([99] + questions["answer_candidate"].to_pylist()[1:], pa.int32()))
    with pytest.raises(PipelineError, match=r"^data/parallel/questions.parquet: a 'de' question's answer_candidate 99 is not in"):
        mine_negatives(broken, candidates, *embeddings(questions, candidates), 3, 0.05)


# --- batches picks them ---------------------------------------------------------------


def everything_mined(questions: pa.Table, candidates: pa.Table) -> pa.Table:
    """Every candidate of each language of a question's group, by candidate id: the first ones are answers,
    so plenty are positives of their batch and must be passed over."""
    rows = []
    langs_of = {}
    for q in questions.to_pylist():
        langs_of.setdefault(q["group_id"], []).append(q["lang"])
    by_lang = {lang: [c["candidate"] for c in candidates.to_pylist() if c["lang"] == lang] for lang in LANGS}
    for q in questions.to_pylist():
        for lang in langs_of[q["group_id"]]:
            rows += [
                {
                    "group_id": q["group_id"],
                    "query_lang": q["lang"],
                    "negative_lang": lang,
                    "rank": rank,
                    "negative_candidate": c,
                    "score": 0.0,
                }
                for rank, c in enumerate(by_lang[lang])
            ]
    return pa.Table.from_pylist(rows, schema=MINED_SCHEMA)


@pytest.mark.parametrize("mode, langs", [("mined", "passage_lang"), ("mined_query_language", "query_lang")])
@pytest.mark.parametrize("source", ["mined", "everything"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_batches_take_the_best_mined_negative_in_the_mode_s_language_that_is_no_batch_positive(source, ratio, mode, langs):
    questions, candidates = corpus(n_groups=12)
    mined = mine_negatives(questions, candidates, *embeddings(questions, candidates), 3, 0.05)[0] if source == "mined" else None
    mined = everything_mined(questions, candidates) if mined is None else mined
    groups = {}
    for q in questions.to_pylist():
        groups.setdefault(q["group_id"], []).append(q["lang"])
    plan = plan_batches(groups, ratio, "hybrid", "mono_first", 4, 12, seed=5)
    with_negatives = plan_negatives(plan, questions, candidates, mode, 5, mined)
    assert with_negatives.schema.equals(PLAN_SCHEMA)
    assert with_negatives.drop_columns(["negative_lang", "negative_candidate"]).equals(
        plan.drop_columns(["negative_lang", "negative_candidate"])
    )
    sentence = {(c["lang"], c["candidate"]): c["sentence"] for c in candidates.to_pylist()}
    answer = {(q["group_id"], q["lang"]): q["answer_candidate"] for q in questions.to_pylist()}
    offered = {}
    for m in sorted(mined.to_pylist(), key=lambda m: m["rank"]):
        offered.setdefault((m["group_id"], m["query_lang"], m["negative_lang"]), []).append(m["negative_candidate"])
    rows = with_negatives.to_pylist()
    for b in {r["batch"] for r in rows}:
        batch = [r for r in rows if r["batch"] == b]
        positives = {sentence[(r["passage_lang"], answer[(r["group_id"], r["passage_lang"])])] for r in batch}
        for r in batch:
            allowed = [c for c in offered.get((r["group_id"], r["query_lang"], r[langs]), []) if sentence[(r[langs], c)] not in positives]
            expected = (r[langs], allowed[0]) if allowed else (None, None)
            assert (r["negative_lang"], r["negative_candidate"]) == expected
    assert with_negatives["negative_candidate"].null_count < plan.num_rows
    assert plan_negatives(plan, questions, candidates, mode, 6, mined).equals(with_negatives)  # no draw: the seed changes nothing
    if ratio < 1:  # cross pairs: the two modes place their negatives in different languages
        other = plan_negatives(plan, questions, candidates, ({"mined", "mined_query_language"} - {mode}).pop(), 5, mined)
        assert not pc.all(pc.equal(other["negative_lang"], with_negatives["negative_lang"])).as_py()


def test_a_mined_candidate_outside_the_candidates_is_named():
    questions, candidates = corpus()
    mined = everything_mined(questions, candidates)
    mined = mined.set_column(4, "negative_candidate", pa.array([999] * mined.num_rows, pa.int32()))
    plan = plan_batches({f"g{g}": list(LANGS) for g in range(6)}, 0.5, "hybrid", "mono_first", 4, 3, seed=1)
    with pytest.raises(
        PipelineError, match=r"^data/mined/negatives.parquet: its '\w+' candidate 999 is not in data/parallel/candidates.parquet"
    ):
        plan_negatives(plan, questions, candidates, "mined", 1, mined)


# --- the stage ------------------------------------------------------------------------


def project(root: Path, model_dir: Path | None, **params) -> tuple[pa.Table, pa.Table]:
    """params.yaml (mlqa_r, the given overrides), the parallel tables and pairs of `corpus()`, the tiny base model."""
    defaults = {"sampler.batch_size": 4, "sampler.steps": 4, "mine.precision": "fp32", "mine.top_k": 3}
    write_params(root, **{"data.train": "mlqa_r", **defaults, **params})
    questions, candidates = corpus()
    stamp = pairs_stamp("mlqa_r", 0.1)
    write_parquet(questions, root / "data/parallel/questions.parquet", made_by=stamp)
    write_parquet(candidates, root / "data/parallel/candidates.parquet", made_by=stamp)
    pairs = questions.select(["group_id", "lang", "question"]).append_column("passage", pa.array(["p"] * questions.num_rows))
    write_parquet(pairs, root / "data/parallel/pairs.parquet", made_by=stamp)
    if model_dir is not None and not (root / "models/base").exists():
        shutil.copytree(model_dir, root / "models/base")
    return questions, candidates


def test_the_stage_mines_with_the_base_model_and_batches_plans_from_it(tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    # the tiny random model scores every pair alike: a margin of 0 leaves it the candidates below the positive
    questions, _ = project(tmp_path, tiny_model_dir, **{"sampler.negatives": "mined", "mine.relative_margin": 0.0})
    mine.main()
    mined = pq.read_table(tmp_path / "data/mined/negatives.parquet")
    stamp = json.loads(mined.schema.metadata[b"hybridir.params"])
    assert stamp["sampler.negatives"] == "mined" and stamp["mine.top_k"] == 3 and stamp["model.query_prefix"] == "query: "
    assert 0 < mined.num_rows <= 3 * (6 * 4 + 2) and set(mined["negative_lang"].to_pylist()) == set(LANGS)
    metrics = json.loads((tmp_path / "metrics/mine.json").read_text())
    assert metrics["questions"] == questions.num_rows and metrics["lists"] == 26 and metrics["negatives"] == mined.num_rows
    assert metrics["machine"]["precision"] == "fp32" and metrics["seconds.encode"] >= 0
    out = capsys.readouterr().out
    assert f"mine: {mined.num_rows} negatives for 26 (question, language) lists of 14 questions" in out

    table_bytes = (tmp_path / "data/mined/negatives.parquet").read_bytes()
    mine.main()  # the same embeddings, the same table
    assert (tmp_path / "data/mined/negatives.parquet").read_bytes() == table_bytes
    batches.main()
    plan = pq.read_table(tmp_path / "data/batches/plan.parquet")
    chosen = [r for r in plan.to_pylist() if r["negative_candidate"] is not None]
    assert chosen and all(r["negative_lang"] == r["passage_lang"] for r in chosen)
    assert "mined hard negatives" in capsys.readouterr().out

    # in the query's language: the same table (its stamp says `mined`), so batches reads the one already mined
    project(tmp_path, tiny_model_dir, **{"sampler.negatives": "mined_query_language", "mine.relative_margin": 0.0})
    batches.main()
    plan = pq.read_table(tmp_path / "data/batches/plan.parquet")
    chosen = [r for r in plan.to_pylist() if r["negative_candidate"] is not None]
    assert chosen and all(r["negative_lang"] == r["query_lang"] for r in chosen)
    assert any(r["query_lang"] != r["passage_lang"] for r in chosen)
    assert "mined_query_language hard negatives" in capsys.readouterr().out
    mine.main()
    assert (tmp_path / "data/mined/negatives.parquet").read_bytes() == table_bytes


def test_under_another_mode_the_stage_writes_an_empty_table_without_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    project(tmp_path, None, **{"sampler.negatives": "query_language"})  # no models/base: it is not loaded
    mine.main()
    first = (tmp_path / "data/mined/negatives.parquet").read_bytes()
    assert pq.read_table(tmp_path / "data/mined/negatives.parquet").num_rows == 0
    assert json.loads((tmp_path / "metrics/mine.json").read_text()) == {"mode": "query_language", "negatives": 0}
    assert "mine: sampler.negatives is query_language, nothing to mine" in capsys.readouterr().out
    write_params(tmp_path, **{"data.train": "mlqa_r", "sampler.negatives": "query_language", "mine.top_k": 5, "mine.relative_margin": 0.2})
    mine.main()
    assert (tmp_path / "data/mined/negatives.parquet").read_bytes() == first  # inert params: the same bytes, nothing reruns after it


@pytest.mark.parametrize(
    "made_with, message",
    [
        (None, r"^data/mined/negatives.parquet: file not found \(run the stage that makes it first\)$"),
        (
            {"sampler.negatives": "query_language"},
            r'^data/mined/negatives.parquet: made with sampler.negatives="query_language", but params.yaml has sampler.negatives="mined" '
            r"\(stale output: run `dvc repro`\)$",
        ),
        (
            {"sampler.negatives": "mined", "mine.top_k": 5},
            r"^data/mined/negatives.parquet: made with mine.top_k=5, but params.yaml has mine.top_k=3 ",
        ),
    ],
    ids=["missing", "another mode", "other mining params"],
)
def test_batches_refuses_a_missing_or_stale_mined_table_in_one_line(tmp_path, monkeypatch, made_with, message):
    monkeypatch.chdir(tmp_path)
    if made_with is not None:  # the table of an earlier `mine` run under these params
        project(tmp_path, None, **made_with)
        if made_with["sampler.negatives"] == "mined":
            questions, candidates = corpus()
            table = everything_mined(questions, candidates)
            write_parquet(table, tmp_path / "data/mined/negatives.parquet", made_by=mined_made_by(load_params(tmp_path / "params.yaml")))
        else:
            mine.main()
    project(tmp_path, None, **{"sampler.negatives": "mined"})
    with pytest.raises(PipelineError, match=message) as err:
        batches.main()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data/batches").exists()
