"""Tests of the noisy-query robustness report: the perturbations themselves, the query sample,
and that only perturbed queries are encoded again."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import evaluate
from pipeline.scoring.lareqa import RetrievalTask, sample_queries, score_task, settings_of, subset_queries
from pipeline.scoring.noise import Noise, perturb, strip_diacritics, typo
from pipeline.scoring.robustness import noise_robustness
from tests.helpers import mirror_file

NOISES = [Noise.parse(name) for name in ("typo_0.05", "typo_0.15", "no_diacritics", "lowercase")]


def _questions(lang: str, n: int = 200) -> list[str]:
    doc = json.loads(mirror_file(f"lareqa/xquad-r/{lang}.json").read_text(encoding="utf-8"))
    return [qa["question"] for art in doc["data"] for p in art["paragraphs"] for qa in p["qas"]][:n]


# --- parsing ---------------------------------------------------------------------------


def test_noise_names_parse():
    assert Noise.parse("typo_0.05") == Noise("typo_0.05", "typo", 0.05)
    assert Noise.parse("typo_1") == Noise("typo_1", "typo", 1.0)
    assert Noise.parse("no_diacritics") == Noise("no_diacritics", "no_diacritics")
    assert Noise.parse("lowercase") == Noise("lowercase", "lowercase")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("typo_0", r"'typo_0': a typo rate must be a number in \(0, 1\]"),
        ("typo_1.5", "a typo rate must be"),
        ("typo_x", "a typo rate must be"),
        ("typo", "a typo rate must be"),
        ("blur", r"unknown noise 'blur' \(known: typo_<rate>, no_diacritics, lowercase\)"),
    ],
)
def test_bad_noise_names(name, match):
    with pytest.raises(ValueError, match=match):
        Noise.parse(name)


# --- typos -----------------------------------------------------------------------------


def _letters_removed(text: str) -> str:
    return "".join(ch for ch in text if not ch.isalpha())


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=60), st.floats(0.01, 1.0), st.integers(0, 2**31))
def test_typos_touch_only_letters_and_keep_the_script(text, rate, seed):
    import random

    noisy = typo(text, rate, random.Random(seed))
    assert _letters_removed(noisy) == _letters_removed(text)  # digits, spaces, punctuation in place
    assert set(noisy) <= set(text)  # new letters come from the query's own letters
    if not any(ch.isalpha() for ch in text):
        assert noisy == text


def test_typos_are_seeded_by_seed_noise_and_text_alone():
    text = "How many balls did Josh Norman intercept?"
    typo_5, typo_15 = Noise.parse("typo_0.05"), Noise.parse("typo_0.15")
    assert perturb(text, typo_15, 0) == perturb(text, typo_15, 0)
    outputs = {perturb(text, typo_15, seed) for seed in range(20)}
    assert len(outputs) > 15  # another seed, other typos
    assert perturb(text, typo_5, 0) != perturb(text, typo_15, 0)


@pytest.mark.parametrize("lang", ["en", "ru", "ar"])
def test_typo_rate_is_the_share_of_letters_edited(lang):
    """Edits counted by difflib's alignment: about `rate` of the letters, for each rate."""
    import difflib

    questions = _questions(lang)
    letters = sum(ch.isalpha() for q in questions for ch in q)
    for noise in NOISES[:2]:
        edits = 0
        for q in questions:
            matcher = difflib.SequenceMatcher(a=q, b=perturb(q, noise, 0), autojunk=False)
            edits += sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")
        share = edits / letters
        assert 0.6 * noise.rate < share < 1.6 * noise.rate, (noise.name, share)


# --- diacritics and case -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("¿Cuántos balones interceptó?", "¿Cuantos balones intercepto?"),
        ("Wie viele Bälle fing er ab?", "Wie viele Balle fing er ab?"),
        ("Πόσους πόντους παρέδωσε;", "Ποσους ποντους παρεδωσε;"),
        ("Panthers savunması kaç sayı bırakmıştır?", "Panthers savunması kac sayı bırakmıstır?"),  # ı has no dot to strip
        ("Đội thủ đã thua bao nhiêu điểm?", "Đoi thu đa thua bao nhieu điem?"),
        ("От чего всё зависят аптекари?", "От чего все зависят аптекари?"),
        ("Йошкар-Ола", "Йошкар-Ола"),  # the breve of й makes another letter: kept
        ("كم عدد الاعتراضات التي سُجلت؟", "كم عدد الاعتراضات التي سجلت؟"),  # damma is optional
        ("أين ولد؟", "أين ولد؟"),  # hamza is part of the letter
    ],
)
def test_strip_diacritics_examples(text, want):
    assert strip_diacritics(text) == want


@pytest.mark.parametrize("lang", ["hi", "th", "zh"])
def test_scripts_without_diacritics_are_left_as_they_are(lang):
    """Devanagari and Thai vowel signs are combining marks, but part of the letter: nothing changes."""
    questions = _questions(lang)
    assert any(unicodedata.combining(ch) for q in questions for ch in unicodedata.normalize("NFD", q)) or lang == "zh"
    assert [strip_diacritics(q) for q in questions] == questions


def test_lowercase():
    noise = Noise.parse("lowercase")
    assert perturb("Wie viele Bälle fing Josh Norman ab?", noise, 0) == "wie viele bälle fing josh norman ab?"
    assert perturb("约什·诺曼拦截了多少球？", noise, 0) == "约什·诺曼拦截了多少球？"


# --- the query sample ------------------------------------------------------------------


def _task(langs: list[str], per_lang: list[int], texts: list[str] | None = None) -> RetrievalTask:
    """Queries of each language answered by candidate i of every language (a parallel pool)."""
    n_groups = max(per_lang)
    query_lang = np.concatenate([np.full(n, x) for x, n in enumerate(per_lang)])
    group = np.concatenate([np.arange(n) for n in per_lang])
    offsets = np.arange(len(langs) + 1) * n_groups
    return RetrievalTask(
        langs=langs,
        query_lang=query_lang,
        query_id=np.array([f"g{g}" for g in group]),
        query_paragraph=np.array([f"p{g}" for g in group]),
        query_text=texts or [f"Question {g} in {langs[x]}" for g, x in zip(group, query_lang)],
        candidate_text=[f"Passage {c} in {lang}" for lang in langs for c in range(n_groups)],
        pool_offsets=offsets,
        answers=np.stack([offsets[y] + group for y in range(len(langs))], axis=1),
        candidate_paragraph=np.tile(np.arange(n_groups), len(langs)),
    )


def test_the_sample_takes_up_to_n_queries_of_each_language_and_depends_on_the_language_alone():
    task = _task(["en", "de", "zh"], [30, 5, 30])
    rows = sample_queries(task, 10, seed=0)
    assert np.all(np.diff(rows) > 0)
    assert np.bincount(task.query_lang[rows]).tolist() == [10, 5, 10]
    assert np.array_equal(rows, sample_queries(task, 10, seed=0))
    assert not np.array_equal(rows, sample_queries(task, 10, seed=1))
    # without de, en and zh keep the very same questions
    without_de = _task(["en", "zh"], [30, 30])
    kept = sample_queries(without_de, 10, seed=0)
    pick = lambda t, r, x: sorted(t.query_text[i] for i in r if t.query_lang[i] == x)  # noqa: E731
    assert pick(task, rows, 0) == pick(without_de, kept, 0) and pick(task, rows, 2) == pick(without_de, kept, 1)
    assert np.array_equal(sample_queries(task, None, seed=0), np.arange(65))


def test_subset_queries_keeps_the_pool():
    task = _task(["en", "de"], [6, 6])
    sub = subset_queries(task, np.array([1, 7]))
    assert sub.query_text == ["Question 1 in en", "Question 1 in de"]
    assert sub.candidate_text == task.candidate_text and sub.answers.tolist() == [[1, 7], [1, 7]]


# --- the report: only perturbed queries are encoded again ---------------------------------


class CharModel(torch.nn.Module):
    """Stands in for a SentenceTransformer (a torch module): a normalized bag of characters; records every call."""

    def __init__(self):
        super().__init__()
        self.encoded: list[str] = []

    def encode(self, texts, **kwargs):
        self.encoded += list(texts)
        out = np.zeros((len(texts), 97))
        for i, text in enumerate(texts):
            for ch in text:
                out[i, ord(ch) % 97] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_noise_report_encodes_only_changed_queries_and_matches_a_full_re_encoding():
    langs = ["en", "zh"]
    en = [f"What did Player {i} intercept in {1990 + i}?" for i in range(12)]
    zh = [f"第{i}名球员拦截了多少球？" for i in range(12)]
    task = _task(langs, [12, 12], texts=en + zh)
    model = CharModel()
    prefixes = ("query: ", "passage: ")
    clean = evaluate.evaluate_task(model, task, prefixes, batch_size=4)
    model.encoded.clear()

    report = noise_robustness(model, task, clean.queries, clean.pool, NOISES, prefixes[0], 4, per_lang=8, seed=0)

    assert report["queries"] == 16
    assert not [t for t in model.encoded if not t.startswith("query: ")]  # never a passage
    rows = sample_queries(task, 8, seed=0)
    sample = subset_queries(task, rows)
    for noise in NOISES:
        noisy = [perturb(t, noise, 0) for t in sample.query_text]
        figures = report[noise.name]
        changed = {"query: " + n for n, t in zip(noisy, sample.query_text) if n != t}
        assert figures["unchanged"] == 16 - sum(n != t for n, t in zip(noisy, sample.query_text))
        # every noisy figure equals scoring queries encoded from scratch
        direct = CharModel().encode(["query: " + t for t in noisy])
        want = settings_of(score_task(sample, direct.astype(np.float32), clean.pool))
        for key in ("mono_map", "cross_map", "multi_map"):
            assert figures[key] == pytest.approx(want[key], abs=1e-6)
            assert figures[key.replace("_map", "_drop")] == pytest.approx(report["clean"][key] - want[key], abs=1e-6)
        assert changed <= set(model.encoded)
    lowercase = report["lowercase"]
    assert lowercase["unchanged_by_lang"] == {"en": 0, "zh": 8}  # Chinese has no case
    assert report["no_diacritics"]["unchanged"] == 16  # nothing to strip in either
    assert report["no_diacritics"]["multi_drop"] == 0.0
    # encoded in the report: each distinct changed query once per noise that changed it, nothing else
    assert len(model.encoded) == sum(len({perturb(t, n, 0) for t in sample.query_text if perturb(t, n, 0) != t}) for n in NOISES)
