"""bf16 evaluation against fp32 on the same model and task: the accuracy targets of the bf16 issue, on CPU.

Targets (docs/benchmarks.md, benchmarks/eval_speed.py): Mo./Cr./Mul. mAP within 0.002 of
fp32 and rank distance within 1%; the embeddings bf16 gives back are float32 and unit-norm.
Where the CPU has no native bf16 units (AVX-512 BF16 or AMX), bf16 is emulated: slower, not
less accurate, so the targets hold there too.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline import evaluate, fetch
from pipeline.scoring.encoding import load_model
from tests.helpers import mirror_file

LANGS = ("en", "de", "zh")
MAP_TOLERANCE = 0.002
RANK_DISTANCE_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def task():
    """One XQuAD-R article in en, de, zh, as the evaluate stage lines it up."""
    parsed = []
    for lang in LANGS:
        doc = json.loads(mirror_file(f"lareqa/xquad-r/{lang}.json").read_text(encoding="utf-8"))
        parsed.append(fetch.parse_lareqa({"data": doc["data"][:1]}, lang, lang))
    questions = pa.concat_tables([q for q, _ in parsed]).to_pandas()
    candidates = pa.concat_tables([c for _, c in parsed]).to_pandas()
    return evaluate.prepare_task(questions, candidates, list(LANGS), "xquad_r", "slice")


@pytest.fixture(scope="module")
def evaluations(task, tiny_model_dir):
    model = load_model(str(tiny_model_dir), 128)
    prefixes = ("query: ", "passage: ")
    return {bf16: evaluate.evaluate_task(model, task, prefixes, batch_size=32, bf16=bf16) for bf16 in (False, True)}


def test_bf16_headline_figures_match_fp32(evaluations):
    fp32, bf16 = evaluations[False].summary, evaluations[True].summary
    for key in ("mono_map", "cross_map", "multi_map"):
        assert abs(bf16[key] - fp32[key]) <= MAP_TOLERANCE, f"{key}: fp32 {fp32[key]}, bf16 {bf16[key]}"
    rel = abs(bf16["rank_distance"] - fp32["rank_distance"]) / fp32["rank_distance"]
    assert rel <= RANK_DISTANCE_TOLERANCE, f"rank distance: fp32 {fp32['rank_distance']}, bf16 {bf16['rank_distance']}"


def test_bf16_embeddings_are_float32_and_unit_norm(evaluations, task):
    result = evaluations[True]
    for embeddings in (result.queries, result.pool):
        assert embeddings.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    assert (len(result.queries), len(result.pool)) == (len(task.query_text), len(task.candidate_text))


def test_bf16_changed_the_embeddings(evaluations):
    """Autocast took effect (else the comparison above would be vacuous), and only slightly."""
    fp32, bf16 = evaluations[False], evaluations[True]
    cosine = np.sum(fp32.pool * bf16.pool, axis=1)
    assert not np.array_equal(fp32.pool, bf16.pool)
    assert cosine.min() > 0.99
