"""Contrastive training on the batch plan: loss, plan order, resumption, the stage end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from pipeline import train
from pipeline.common import PipelineError
from pipeline.scoring import encoding
from pipeline.training.loss import info_nce_loss
from pipeline.training.planned import plan_texts
from tests.helpers import CONFIG, SEED, load, make_pairs, make_plan, run_train_stage, stage_dir


def test_info_nce_is_cross_entropy_over_in_batch_passages():
    torch.manual_seed(0)
    q, p = torch.randn(5, 8), torch.randn(5, 8)
    qn, pn = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    logits = qn @ pn.T / 0.05
    expected = -torch.stack([logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(5)]).mean()
    assert torch.allclose(info_nce_loss(q, p, 0.05), expected, atol=1e-6)
    # a perfect match (each query equal to its passage, others orthogonal) costs almost nothing
    eye = torch.eye(5, 8)
    assert info_nce_loss(eye, eye, 0.05) < 1e-6


def test_plan_texts_follow_the_plan_with_prefixes():
    pairs = make_pairs()
    plan = make_plan(pairs)
    batches = plan_texts(plan, pairs, "query: ", "passage: ")
    assert len(batches) == 6 and all(len(b.queries) == len(b.passages) == 4 for b in batches)
    first = plan.slice(0, 1).to_pylist()[0]
    g = first["group_id"][1:]
    assert batches[0].queries[0] == f"query: {first['query_lang']} question {g} about topic {int(g) * 7}"
    assert batches[0].passages[0].startswith(f"passage: {first['passage_lang']} passage {g}:")
    assert batches[0].negatives is None and batches[0].tasks is None  # the plan has neither


def test_plan_texts_names_a_pair_missing_from_the_pairs_file():
    pairs = make_pairs()
    plan = make_plan(pairs)
    without_de = pairs.filter(pa.compute.not_equal(pairs["lang"], "de"))
    with pytest.raises(PipelineError, match="has no pair in language 'de'"):
        plan_texts(plan, without_de, "query: ", "passage: ")


def batch_loss(model, batch) -> float:
    with torch.no_grad():  # judged without dropout: a training step's own loss is noisy
        return info_nce_loss(encoding.embed(model, batch.queries), encoding.embed(model, batch.passages), 0.05).item()


@pytest.mark.slow
def test_training_lowers_the_loss(tiny_model_dir):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=1), pairs, "query: ", "passage: ")
    model = load(tiny_model_dir)
    before = batch_loss(model, batches[0])
    unfrozen = replace(CONFIG, freeze_embeddings=False)
    summary = train.train(model, batches * 30, unfrozen, SEED)
    assert summary["steps"] == 30 and batch_loss(model, batches[0]) < 0.5 * before


@pytest.mark.slow
def test_frozen_token_embeddings_stay_while_the_encoder_trains(tiny_model_dir):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=2), pairs, "query: ", "passage: ")
    model = load(tiny_model_dir)
    embeddings_before = model[0].auto_model.get_input_embeddings().weight.detach().clone()
    layer_before = model[0].auto_model.encoder.layer[0].attention.self.query.weight.detach().clone()
    train.train(model, batches, CONFIG, SEED)
    assert torch.equal(model[0].auto_model.get_input_embeddings().weight, embeddings_before)
    assert not torch.equal(model[0].auto_model.encoder.layer[0].attention.self.query.weight, layer_before)


def test_a_killed_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=6), pairs, "query: ", "passage: ")
    uninterrupted = load(tiny_model_dir)
    train.train(uninterrupted, batches, CONFIG, SEED)

    checkpoint = tmp_path / "train.pt"
    killed = load(tiny_model_dir)
    train.train(killed, batches, CONFIG, SEED, train.TrainRun(checkpoint, fingerprint="run", stop_after=3, checkpoint_every=2))
    assert torch.load(checkpoint, weights_only=True)["step"] == 2  # step 3 was lost with the crash
    resumed = load(tiny_model_dir)
    summary = train.train(resumed, batches, CONFIG, SEED, train.TrainRun(checkpoint, resume=True, fingerprint="run", checkpoint_every=2))
    assert summary["resumed_from_step"] == 2
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_checkpoint_of_other_inputs_is_not_resumed(tiny_model_dir, tmp_path):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=2), pairs, "query: ", "passage: ")
    checkpoint = tmp_path / "train.pt"
    train.train(load(tiny_model_dir), batches, CONFIG, SEED, train.TrainRun(checkpoint, fingerprint="old plan", checkpoint_every=2))
    summary = train.train(
        load(tiny_model_dir), batches, CONFIG, SEED, train.TrainRun(checkpoint, resume=True, fingerprint="new", checkpoint_every=2)
    )
    assert summary["resumed_from_step"] == 0


@pytest.mark.slow
def test_stage_writes_a_loadable_model_metrics_and_curves(tmp_path, tiny_model_dir):
    cwd = stage_dir(tmp_path, tiny_model_dir)
    result = run_train_stage(cwd)
    assert result.returncode == 0, result.stderr
    model = load(cwd / "models/retriever")
    assert model.encode(["query: hello"]).shape == (1, 32)
    summary = json.loads((cwd / "metrics/train.json").read_text())
    assert summary["steps"] == 3 and summary["pairs_per_s"] > 0
    assert summary["machine"]["device"] == "cpu" and summary["machine"]["precision"] == "fp32" and summary["machine"]["cores"] >= 1
    loss_curve = (cwd / "metrics/train_live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss_curve[0].split("\t")[:2] == ["step", "loss"] and len(loss_curve) == 4
    assert not (cwd / "models/checkpoints/train.pt").exists()


@pytest.mark.slow
def test_stage_rejects_a_zero_temperature_without_writing(tmp_path, tiny_model_dir):
    cwd = stage_dir(tmp_path, tiny_model_dir, temperature=0)
    result = run_train_stage(cwd)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: params.yaml: train.temperature: 0 must be > 0"]
    assert not (cwd / "models/retriever").exists()


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tiny_model_dir):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=6), pairs, "query: ", "passage: ")
    exploding = replace(CONFIG, lr=1e30, freeze_embeddings=False, warmup_ratio=0.0)
    with pytest.raises(
        PipelineError,
        match=r"^train: loss is nan at step [2-6]: training diverged \(train.lr 1e\+30, train.temperature 0.05\); no model was written$",
    ):
        train.train(load(tiny_model_dir), batches, exploding, SEED)


def test_bf16_training_is_deterministic_and_close_to_fp32(tiny_model_dir):
    """Same seed, same precision: the same weights; bf16 and fp32 runs land near each other."""
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=4), pairs, "query: ", "passage: ")
    bf16 = replace(CONFIG, precision="bf16")
    runs = []
    for config in (bf16, bf16, CONFIG):
        model = load(tiny_model_dir)
        runs.append((train.train(model, batches, config, SEED), model.state_dict()))
    (first, a), (second, b), (fp32, c) = runs
    assert first["machine"]["precision"] == "bf16" and fp32["machine"]["precision"] == "fp32"
    assert first["final_loss"] == second["final_loss"]
    for name, weight in a.items():
        assert torch.equal(weight, b[name]), name
    assert abs(first["final_loss"] - fp32["final_loss"]) < 0.05
