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
from pipeline.contracts import HEADLINE_FIGURES
from pipeline.scoring import encoding
from pipeline.scoring.tasks import evaluate_task, prepare_task
from pipeline.training.loss import info_nce_loss
from pipeline.training.planned import plan_texts
from tests.helpers import CONFIG, SEED, corpus_of, load, make_pairs, make_plan, run_train_stage, stage_dir


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


# --- the dev curve (train.eval_every) and keeping the best step (train.keep_best) ----------------

DEV_TASK = prepare_task(*(table.to_pandas() for table in corpus_of(make_pairs(4, first=100))), None, "dev", "dev")
PREFIXES = ("query: ", "passage: ")


def score_dev(model, bf16: bool) -> dict[str, float]:
    """What the stage's dev scorer does (train.dev_scorer), on a dev split of 4 groups the plan never names."""
    summary = evaluate_task(model, DEV_TASK, PREFIXES, batch_size=8, bf16=bf16).summary
    return {name: summary[name] for name in HEADLINE_FIGURES}


def scripted(values: list[float]):
    """A dev scorer whose multi_map is `values`, one per call: which step is best is the test's choice."""
    left = iter(values)
    return lambda model, bf16: {"mono_map": 0.0, "cross_map": 0.0, "multi_map": next(left)}


def logged(run: train.TrainRun) -> list[tuple[int, dict]]:
    """Make `run` record what it logs; returns the record."""
    rows = []
    run.log = lambda step, metrics: rows.append((step, metrics))
    return rows


def dev_points(rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    return [(step, {k: v for k, v in metrics.items() if k.startswith("dev/")}) for step, metrics in rows if "dev/multi_map" in metrics]


def test_the_dev_split_is_scored_every_eval_every_steps_and_after_the_last(tiny_model_dir):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=5), pairs, *PREFIXES)
    model = load(tiny_model_dir)
    run = train.TrainRun(dev=score_dev)
    rows = logged(run)
    train.train(model, batches, replace(CONFIG, eval_every=2), SEED, run)
    points = dev_points(rows)
    assert [step for step, _ in points] == [2, 4, 5]
    assert all(set(figures) == {"dev/mono_map", "dev/cross_map", "dev/multi_map"} for _, figures in points)
    assert points[-1][1] == {f"dev/{name}": value for name, value in score_dev(model, False).items()}  # the model as it ends
    assert model.training is False and all("loss" in metrics for _, metrics in rows)
    unscored = load(tiny_model_dir)
    train.train(unscored, batches, CONFIG, SEED)
    for (name, a), b in zip(model.state_dict().items(), unscored.state_dict().values()):  # scoring leaves training as it was
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="train.eval_every > 0 needs TrainRun.dev"):
        train.train(load(tiny_model_dir), batches, replace(CONFIG, eval_every=2), SEED)


def test_keep_best_keeps_the_weights_of_the_best_dev_step(tiny_model_dir):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=5), pairs, *PREFIXES)
    kept = load(tiny_model_dir)
    config = replace(CONFIG, eval_every=1, keep_best="multi_map")
    summary = train.train(kept, batches, config, SEED, train.TrainRun(dev=scripted([0.1, 0.3, 0.5, 0.5, 0.2])))
    assert summary["kept_step"] == 3 and summary["kept_dev_multi_map"] == 0.5  # the first of two equal bests
    after_three = load(tiny_model_dir)
    train.train(after_three, batches, CONFIG, SEED, train.TrainRun(stop_after=3))  # the same run, stopped after step 3
    last = load(tiny_model_dir)
    train.train(last, batches, CONFIG, SEED)
    for (name, weight), at_three in zip(kept.state_dict().items(), after_three.state_dict().values()):
        assert torch.equal(weight, at_three), name
    assert any(not torch.equal(a, b) for a, b in zip(kept.state_dict().values(), last.state_dict().values()))


def test_a_resumed_run_logs_the_same_dev_points_and_keeps_the_same_best(tiny_model_dir, tmp_path):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=6), pairs, *PREFIXES)
    config = replace(CONFIG, eval_every=1, keep_best="multi_map")
    values = [0.2, 0.6, 0.4, 0.3, 0.5, 0.1]  # best at step 2, before the checkpoint of step 4 the resumed run starts from
    uninterrupted = load(tiny_model_dir)
    whole = train.TrainRun(dev=scripted(values))
    whole_log = logged(whole)
    expected = train.train(uninterrupted, batches, config, SEED, whole)

    checkpoint = tmp_path / "train.pt"
    killed = train.TrainRun(checkpoint, fingerprint="run", stop_after=5, checkpoint_every=4, dev=scripted(values[:5]))
    train.train(load(tiny_model_dir), batches, config, SEED, killed)
    assert torch.load(checkpoint, weights_only=True)["best"]["step"] == 2
    resumed_model = load(tiny_model_dir)
    resumed = train.TrainRun(checkpoint, resume=True, fingerprint="run", checkpoint_every=4, dev=scripted(values[4:]))
    resumed_log = logged(resumed)
    summary = train.train(resumed_model, batches, config, SEED, resumed)
    assert summary["resumed_from_step"] == 4 and summary["kept_step"] == expected["kept_step"] == 2
    assert dev_points(resumed_log) == dev_points(whole_log) and [step for step, _ in resumed_log] == [1, 2, 3, 4, 5, 6]
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.slow
def test_stage_logs_the_dev_curve_beside_the_loss(tmp_path, tiny_model_dir):
    cwd = stage_dir(tmp_path, tiny_model_dir, eval_every=2, keep_best="cross_map")
    result = run_train_stage(cwd)
    assert result.returncode == 0, result.stderr
    for name in HEADLINE_FIGURES:
        curve = (cwd / f"metrics/train_live/plots/metrics/dev/{name}.tsv").read_text().splitlines()
        assert curve[0].split("\t") == ["step", name] and [line.split("\t")[0] for line in curve[1:]] == ["2", "3"]
    summary = json.loads((cwd / "metrics/train.json").read_text())
    assert summary["kept_step"] in (2, 3) and 0 <= summary["kept_dev_cross_map"] <= 1
    assert f"the weights of step {summary['kept_step']}, best by dev cross_map" in result.stdout
