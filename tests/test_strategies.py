"""Training under the strategies of docs/strategies.md: the multitask loss, hard negatives in the
loss, the gradient-reversal layer and the language adversary, noisy queries; each equal under
cached gradients and two processes; a few tiny training steps with each, and the stage once.
(What `batches` plans for them is tested in tests/test_batches.py.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline import train
from pipeline.common import PipelineError
from pipeline.scoring import encoding
from pipeline.scoring.noise import Noise, perturb
from pipeline.training.adversary import GradientReversal, LanguageAdversary, adversary_grads
from pipeline.training.distributed import World
from pipeline.training.loss import contrastive_step, info_nce_loss, same_task_mask
from pipeline.training.planned import PlannedBatch, plan_texts, query_noise_draws
from tests.helpers import (
    CONFIG,
    SEED,
    corpus_of,
    load,
    make_pairs,
    make_plan,
    run_train_stage,
    stage_dir,
    step_in_one_and_two_processes,
    without_dropout,
)

TOL = 1e-5


def planned(steps: int = 2, batch_size: int = 4, schedule: str = "hybrid", negatives: str = "none", noise=None) -> list[PlannedBatch]:
    """The tiny pairs' planned batches, as `train` reads them."""
    pairs = make_pairs()
    plan = make_plan(pairs, steps=steps, batch_size=batch_size, schedule=schedule, negatives=negatives)
    candidates = corpus_of(pairs)[1] if negatives != "none" else None
    return plan_texts(plan, pairs, "query: ", "passage: ", candidates, schedule == "multitask", noise)


def gradients(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": w.grad.clone() for i, m in enumerate(modules) for name, w in m.named_parameters() if w.grad is not None}


# --- the losses, by hand -------------------------------------------------------------


def info_nce_by_hand(q: torch.Tensor, columns: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over queries of -log softmax(own positive) over `columns` (the positives first)."""
    logits = F.normalize(q, dim=-1) @ F.normalize(columns, dim=-1).T / temperature
    return -torch.stack([logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(len(q))]).mean()


def test_multitask_loss_is_the_share_weighted_sum_of_each_tasks_info_nce():
    torch.manual_seed(0)
    tasks = ["mono", "mono", "cross", "cross", "cross", "cross"]
    negatives = ["n0", None, "n2", None, "n4", "n5"]  # rows 0, 2, 4, 5 have a hard negative
    batch = PlannedBatch(["q"] * 6, ["p"] * 6, negatives=negatives, tasks=tasks)
    q, p, n = torch.randn(6, 8), torch.randn(6, 8), torch.randn(4, 8)
    loss = info_nce_loss(q, torch.cat([p, n]), 0.05, same_task=same_task_mask(batch, World(), "cpu"))

    mono = info_nce_by_hand(q[:2], torch.cat([p[:2], n[:1]]), 0.05)  # its rows' positives, its rows' negatives
    cross = info_nce_by_hand(q[2:], torch.cat([p[2:], n[1:]]), 0.05)
    assert torch.allclose(loss, 2 / 6 * mono + 4 / 6 * cross, atol=1e-6)


def test_every_query_is_scored_against_every_positive_and_hard_negative():
    torch.manual_seed(1)
    q, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)
    assert torch.allclose(info_nce_loss(q, torch.cat([p, n]), 0.05), info_nce_by_hand(q, torch.cat([p, n]), 0.05), atol=1e-6)
    # a hard negative equal to a query's own positive leaves that query at log 2 at best
    same = info_nce_loss(torch.eye(2, 8), torch.cat([torch.eye(2, 8), torch.eye(1, 8)]), 0.05)
    assert same.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() / 2, abs=1e-4)


@pytest.mark.parametrize("weight", [0.5, 0.3])
def test_gradient_reversal_gives_minus_weight_times_the_plain_gradient(weight):
    torch.manual_seed(2)
    x = torch.randn(5, 8, requires_grad=True)
    classifier, target = torch.nn.Linear(8, 3), torch.tensor([0, 1, 2, 1, 0])
    plain = torch.autograd.grad(F.cross_entropy(classifier(x), target), x)[0]
    reversed_ = torch.autograd.grad(F.cross_entropy(classifier(GradientReversal.apply(x, weight)), target), x)[0]
    assert torch.equal(GradientReversal.apply(x, weight), x)  # the identity on the way forward
    if weight == 0.5:  # a power of two scales exactly
        assert torch.equal(reversed_, -weight * plain)
    assert torch.allclose(reversed_, -weight * plain, atol=1e-7)


@pytest.mark.slow
def test_the_encoder_gets_the_classifiers_gradient_reversed_and_the_classifier_its_own(tiny_model_dir):
    """Through the adversary, the encoder's weight gradients are -weight x those of the plain classifier loss."""
    texts, langs = ["query: eins", "query: two", "passage: drei", "passage: four"], ["de", "en", "de", "en"]
    results = {}
    for weight in (None, 0.5):
        model = without_dropout(load(tiny_model_dir))
        torch.manual_seed(3)
        adversary = LanguageAdversary(32, ["de", "en"], weight or 0.0)
        embeddings = encoding.embed(model, texts)
        target = torch.tensor([["de", "en"].index(lang) for lang in langs])
        logits = adversary.classifier(embeddings) if weight is None else adversary(embeddings)
        F.cross_entropy(logits, target).backward()
        results[weight] = gradients(model), gradients(adversary)
    (plain_encoder, plain_classifier), (encoder, classifier) = results[None], results[0.5]
    assert plain_encoder.keys() == encoder.keys() and len(encoder) > 10
    for name, grad in encoder.items():
        assert torch.allclose(grad, -0.5 * plain_encoder[name], atol=1e-7), name
    for name, grad in classifier.items():
        assert torch.equal(grad, plain_classifier[name]), name


def test_adversary_grads_reverse_the_mean_cross_entropy_and_report_its_accuracy():
    torch.manual_seed(4)
    adversary = LanguageAdversary(8, ["de", "en", "es"], 0.25)
    embeddings = [torch.randn(3, 8), torch.randn(3, 8), torch.randn(2, 8)]
    langs = ["de", "en", "es", "de", "en", "es", "de", "de"]
    figures, grads = adversary_grads(adversary, embeddings, langs, 8, World())
    x = torch.cat(embeddings).requires_grad_()
    target = torch.tensor([adversary.langs.index(lang) for lang in langs])
    logits = adversary.classifier(x)
    loss = F.cross_entropy(logits, target)
    loss.backward()
    assert torch.allclose(torch.cat(grads), -0.25 * x.grad, atol=1e-7)
    assert figures["adversary_loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    assert figures["adversary_accuracy"].item() == (logits.argmax(-1) == target).float().mean().item()


# --- noisy queries ------------------------------------------------------------------


def test_noisy_queries_are_a_seeded_share_perturbed_as_the_robustness_report_does():
    noises = [Noise.parse("typo_0.2"), Noise.parse("lowercase")]
    draws = query_noise_draws(4000, noises, 0.3, seed=7)
    assert draws == query_noise_draws(4000, noises, 0.3, seed=7)
    assert draws != query_noise_draws(4000, noises, 0.3, seed=8)
    picked = [d for d in draws if d is not None]
    assert abs(len(picked) / 4000 - 0.3) < 0.03 and {d[0].name for d in picked} == {"typo_0.2", "lowercase"}
    assert query_noise_draws(10, noises, 0.0, seed=7) == [None] * 10 == query_noise_draws(10, [], 0.5, seed=7)

    clean = planned(steps=3)
    draws = query_noise_draws(12, [Noise.parse("typo_0.3")], 0.5, seed=7)
    noisy = planned(steps=3, noise=draws)
    changed = 0
    for i, draw in enumerate(draws):
        before, after = clean[i // 4].queries[i % 4], noisy[i // 4].queries[i % 4]
        assert after.startswith("query: ")  # the prefix is never perturbed
        want = before if draw is None else "query: " + perturb(before.removeprefix("query: "), *draw)
        assert after == want
        changed += after != before
    assert changed >= 3
    assert [b.passages for b in noisy] == [b.passages for b in clean]


# --- cached gradients and two processes ------------------------------------------------

EVERY_OPTION = dict(schedule="multitask", negatives="paragraph")


@pytest.mark.slow
def test_cached_gradients_with_every_option_equal_the_whole_batch(tiny_model_dir):
    batch = planned(steps=1, batch_size=8, **EVERY_OPTION)[0]
    assert set(batch.tasks) == {"mono", "cross"} and len(batch.negative_texts()) >= 4
    results = {}
    for chunk in (None, 3):
        model = without_dropout(load(tiny_model_dir))
        torch.manual_seed(5)
        adversary = LanguageAdversary(32, ["de", "en", "es"], 0.5)
        loss, figures = contrastive_step(model, batch, 0.05, World(), chunk, bf16=False, adversary=adversary)
        results[chunk] = loss.item(), figures["adversary_accuracy"].item(), gradients(model, adversary)
    (loss, accuracy, grads), (cached_loss, cached_accuracy, cached) = results[None], results[3]
    assert abs(loss - cached_loss) < TOL and accuracy == cached_accuracy
    assert grads.keys() == cached.keys() and any(name.startswith("1.") for name in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, cached[name], atol=TOL), name


def _one_step(rank: int, world_size: int, port: int, model_dir: str, out: str) -> None:
    """One optimizer step on one planned batch with every option on, as rank `rank` of `world_size` (gloo)."""
    import torch.distributed as dist

    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = without_dropout(load(Path(model_dir)))
    batch = planned(steps=1, batch_size=8, **EVERY_OPTION)[0]
    # some rows without a negative, unevenly over the ranks: the gather pads the shorter share
    batch = replace(batch, negatives=[None, None, None, *batch.negatives[3:]], negative_langs=[None, None, None, *batch.negative_langs[3:]])
    config = replace(CONFIG, warmup_ratio=0.0, lr=1e-5, adversarial_weight=0.5)
    summary = train.train(model, [batch], config, SEED, train.TrainRun(world=World(rank=rank, size=world_size)))
    if rank == 0:
        torch.save({"loss": summary["final_loss"], "accuracy": summary["final_adversary_accuracy"], "state": model.state_dict()}, out)
    if world_size > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_with_every_option_take_the_same_step_as_one(tiny_model_dir, tmp_path):
    results = step_in_one_and_two_processes(_one_step, tiny_model_dir, tmp_path)
    one, two = results[1], results[2]
    assert abs(one["loss"] - two["loss"]) < TOL and one["accuracy"] == two["accuracy"]
    before, moved = load(tiny_model_dir).state_dict(), 0
    for name, weight in one["state"].items():
        assert torch.allclose(weight, two["state"][name], atol=TOL), name
        moved += not torch.equal(weight, before[name])
    assert moved > 10


# --- training with each option, and the stage ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampler, config",
    [
        ({"schedule": "sequential"}, {}),
        ({"schedule": "multitask"}, {}),
        ({"negatives": "query_language"}, {}),
        ({}, {"adversarial_weight": 0.5}),
        ({}, {"query_noise": ("typo_0.1", "lowercase")}),
    ],
    ids=["sequential", "multitask", "negatives", "adversarial", "query_noise"],
)
def test_the_tiny_model_trains_a_few_steps_with_each_option(tiny_model_dir, sampler, config):
    draws = None
    if config.get("query_noise"):
        draws = query_noise_draws(12, [Noise.parse(n) for n in config["query_noise"]], 0.5, SEED)
    batches = planned(steps=3, noise=draws, **sampler)
    model = load(tiny_model_dir)
    before = {name: w.clone() for name, w in model.state_dict().items()}
    history = []
    run = train.TrainRun(log=lambda step, metrics: history.append(metrics))
    summary = train.train(model, batches, replace(CONFIG, **config), SEED, run)
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert any(not torch.equal(w, before[name]) for name, w in model.state_dict().items())
    if "adversarial_weight" in config:
        assert all(0 <= row["adversary_accuracy"] <= 1 and row["adversary_loss"] > 0 for row in history)
        assert summary["final_adversary_accuracy"] == pytest.approx(history[-1]["adversary_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_the_stage_trains_with_every_option_at_once(tmp_path, tiny_model_dir):
    cwd = stage_dir(
        tmp_path,
        tiny_model_dir,
        steps=3,
        sampler={"schedule": "multitask", "negatives": "paragraph"},
        adversarial_weight=0.5,
        query_noise=["typo_0.1"],
    )
    result = run_train_stage(cwd)
    assert result.returncode == 0, result.stderr
    summary = json.loads((cwd / "metrics/train.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["final_adversary_accuracy"] <= 1
    assert 0 < summary["noisy_queries"] < 12
    curve = (cwd / "metrics/train_live/plots/metrics/train/adversary_accuracy.tsv").read_text().splitlines()
    assert curve[0].split("\t")[:2] == ["step", "adversary_accuracy"] and len(curve) == 4
    assert load(cwd / "models/retriever").encode(["query: hello"]).shape == (1, 32)


@pytest.mark.slow
def test_a_killed_adversarial_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    batches = planned(steps=4, schedule="multitask", negatives="paragraph")
    config = replace(CONFIG, adversarial_weight=0.5)
    uninterrupted = load(tiny_model_dir)
    whole = train.train(uninterrupted, batches, config, SEED)
    checkpoint = tmp_path / "train.pt"
    train.train(
        load(tiny_model_dir), batches, config, SEED, train.TrainRun(checkpoint, fingerprint="run", stop_after=3, checkpoint_every=2)
    )
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 2 and saved["adversary"] is not None
    assert all("adversary_accuracy" in row for row in saved["history"])
    resumed = load(tiny_model_dir)
    summary = train.train(resumed, batches, config, SEED, train.TrainRun(checkpoint, resume=True, fingerprint="run", checkpoint_every=2))
    assert summary["resumed_from_step"] == 2
    assert summary["final_adversary_accuracy"] == pytest.approx(whole["final_adversary_accuracy"], abs=1e-6)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_an_adversary_needs_two_languages_to_tell_apart(tiny_model_dir):
    batch = PlannedBatch(["query: a", "query: b"], ["passage: a", "passage: b"], query_langs=["en"] * 2, passage_langs=["en"] * 2)
    with pytest.raises(PipelineError, match=r"^params.yaml: train.adversarial_weight: the plan has one language \(en\)"):
        train.train(load(tiny_model_dir), [batch], replace(CONFIG, adversarial_weight=0.5), SEED)
