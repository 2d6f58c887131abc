"""Scale-out of `train`: cached-gradient batches and torch.distributed data parallel (gloo, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline import train
from pipeline.common import PipelineError
from pipeline.scoring import encoding
from pipeline.training.distributed import World
from pipeline.training.loss import contrastive_step, info_nce_loss
from pipeline.training.planned import PlannedBatch, plan_texts
from tests.helpers import (
    CONFIG,
    SEED,
    free_port,
    load,
    make_pairs,
    make_plan,
    run_train_stage,
    stage_dir,
    step_in_one_and_two_processes,
    without_dropout,
)

pytestmark = pytest.mark.slow  # subprocesses, torchrun, dvc or a grid: `pytest -m 'not slow'` skips it

TOL = 1e-5


def planned_batch(size: int = 8) -> PlannedBatch:
    pairs = make_pairs()
    return plan_texts(make_plan(pairs, steps=1, batch_size=size), pairs, "query: ", "passage: ")[0]


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: w.grad.clone() for name, w in model.named_parameters() if w.grad is not None}


def test_cached_gradients_equal_the_whole_batch_and_sentence_transformers(tiny_model_dir):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    batch = planned_batch(8)
    queries, passages = batch.queries, batch.passages
    results = {}
    for chunk in (None, 3, 8):  # whole batch; uneven chunks; one chunk
        model = without_dropout(load(tiny_model_dir))
        loss, _ = contrastive_step(model, batch, 0.05, World(), chunk, bf16=False)
        results[chunk] = loss.item(), gradients(model)
    reference = without_dropout(load(tiny_model_dir))
    st_loss = CachedMultipleNegativesRankingLoss(reference, scale=1 / 0.05, mini_batch_size=3)
    features = [reference.tokenize(queries), reference.tokenize(passages)]
    value = st_loss(features, None)
    value.backward()
    results["sentence-transformers"] = value.item(), gradients(reference)

    plain_loss, plain_grads = results[None]
    assert len(plain_grads) > 10
    for name, (loss, grads) in results.items():
        assert abs(loss - plain_loss) < TOL, name
        assert grads.keys() == plain_grads.keys(), name
        for weight, grad in grads.items():
            assert torch.allclose(grad, plain_grads[weight], atol=TOL), (name, weight)


def test_cached_gradients_replay_dropout(tiny_model_dir):
    """With dropout on, each re-embedded chunk must see the masks of its first pass."""
    batch = planned_batch(8)
    queries, passages = batch.queries, batch.passages
    cached = load(tiny_model_dir).train()
    torch.manual_seed(0)
    loss, _ = contrastive_step(cached, batch, 0.05, World(), 4, bf16=False)
    direct = load(tiny_model_dir).train()
    torch.manual_seed(0)  # the same masks: the same chunks in the same order, with the graph kept
    parts = [encoding.embed(direct, c) for c in (queries[:4], queries[4:], passages[:4], passages[4:])]
    expected = info_nce_loss(torch.cat(parts[:2]), torch.cat(parts[2:]), 0.05)
    expected.backward()
    assert abs(loss.item() - expected.item()) < TOL
    want = gradients(direct)
    for name, grad in gradients(cached).items():
        assert torch.allclose(grad, want[name], atol=TOL), name


def _one_step(rank: int, world_size: int, port: int, model_dir: str, out: str) -> None:
    """One optimizer step on the same planned batch, as rank `rank` of `world_size` (gloo)."""
    import torch.distributed as dist

    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = without_dropout(load(Path(model_dir)))
    batch = planned_batch(8)
    world = World(rank=rank, size=world_size)
    # AdamW's first step is lr * g / (|g| + eps): for weights whose gradient is ~eps, the
    # last-bit differences of summing over 2 ranks move the update by up to lr * 0.1, so a
    # small lr keeps that below the tolerance while every weight still moves.
    config = replace(CONFIG, warmup_ratio=0.0, lr=1e-5)
    summary = train.train(model, [batch], config, SEED, train.TrainRun(world=world))
    if rank == 0:
        torch.save({"loss": summary["final_loss"], "state": model.state_dict()}, out)
    if world_size > 1:
        dist.destroy_process_group()


def test_two_gloo_processes_take_the_same_step_as_one(tiny_model_dir, tmp_path):
    results = step_in_one_and_two_processes(_one_step, tiny_model_dir, tmp_path)
    one, two = results[1], results[2]
    assert abs(one["loss"] - two["loss"]) < TOL
    before = load(tiny_model_dir).state_dict()
    moved = 0
    for name, weight in one["state"].items():
        assert torch.allclose(weight, two["state"][name], atol=TOL), name
        moved += not torch.equal(weight, before[name])
    assert moved > 10  # the step really changed the weights


RESUME_STEPS = 4


def _resume_from_own_folder(rank: int, world_size: int, port: int, model_dir: str, out: str) -> None:
    """Rank `rank` of a gloo group resumes from its own folder's checkpoint (out/rank<r>/train.pt), as
    each node of a run without a shared filesystem does; writes the step it resumed from, or its error line."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=RESUME_STEPS), pairs, "query: ", "passage: ")
    run = train.TrainRun(Path(out) / f"rank{rank}" / "train.pt", resume=True, fingerprint="run", world=World(rank, world_size))
    try:
        result = train.train(load(Path(model_dir)), batches, CONFIG, SEED, run)["resumed_from_step"]
    except PipelineError as err:
        result = str(err)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_ranks_resume_together_or_all_stop_with_one_line(tiny_model_dir, tmp_path, shared):
    """Every rank reads the checkpoint from its own disk: without a shared folder rank 0 would resume at
    step 2 and rank 1 at 0, their collectives still pairing up (issue 27). They must agree, or all stop."""
    import torch.multiprocessing as mp

    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=RESUME_STEPS), pairs, "query: ", "passage: ")
    first = tmp_path / "rank0" / "train.pt"
    train.train(load(tiny_model_dir), batches, CONFIG, SEED, train.TrainRun(first, fingerprint="run", checkpoint_every=2, stop_after=2))
    assert torch.load(first, weights_only=True)["step"] == 2
    if shared:  # the same checkpoint on both nodes
        (tmp_path / "rank1").mkdir()
        shutil.copy(first, tmp_path / "rank1" / "train.pt")
    mp.spawn(_resume_from_own_folder, args=(2, free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    if shared:
        assert results == [2, 2]
        return
    for rank, message in enumerate(results):
        assert message.startswith(f"{tmp_path / f'rank{rank}' / 'train.pt'}: the 2 processes would start from different points (")
        assert "rank 0 at step 2 of inputs " in message and "rank 1 at step 0 of inputs " in message
        assert message.endswith("every node must see the same checkpoint and inputs (a shared folder), or remove "
                                f"{tmp_path / f'rank{rank}' / 'train.pt'} on every node")  # fmt: skip


def test_stage_launches_torchrun_with_train_processes(tmp_path, tiny_model_dir):
    """With a dev curve: rank 0 scores the dev split while rank 1 waits, after every step."""
    cwd = stage_dir(tmp_path, tiny_model_dir, chunk_size=1, eval_every=1, keep_best="multi_map")
    result = run_train_stage(cwd, HYBRIDIR_PROCESSES="2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((cwd / "metrics/train.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3 and summary["kept_step"] in (1, 2, 3)
    for curve in ("train/loss", "dev/multi_map"):  # rank 0 only
        assert len((cwd / f"metrics/train_live/plots/metrics/{curve}.tsv").read_text().splitlines()) == 4
    assert load(cwd / "models/retriever").encode(["query: hi"]).shape == (1, 32)


@pytest.mark.parametrize(
    ("train_params", "settings", "message"),
    [
        ({}, {"HYBRIDIR_PROCESSES": "3"}, "error: params.yaml: sampler.batch_size: 4 is not divisible by the 3 processes (HYBRIDIR_PROCESSES)"),
        ({"chunk_size": 3}, {"HYBRIDIR_PROCESSES": "2"}, "error: params.yaml: train.chunk_size: 3 is larger than the 2 pairs each of the 2 processes embeds per batch"),
        ({"chunk_size": 5}, {}, "error: params.yaml: train.chunk_size: 5 is larger than the 4 pairs of a batch (sampler.batch_size)"),
        ({"chunk_size": 0}, {}, "error: params.yaml: train.chunk_size: 0 must be >= 1"),
        ({}, {"HYBRIDIR_PROCESSES": "0"}, "error: environment: HYBRIDIR_PROCESSES: 0 must be >= 1"),
    ],
)  # fmt: skip
def test_bad_scale_out_params_fail_before_start(tmp_path, tiny_model_dir, train_params, settings, message):
    cwd = stage_dir(tmp_path, tiny_model_dir, **train_params)
    result = run_train_stage(cwd, **settings)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert not (cwd / "models/retriever").exists()


def test_unreachable_rendezvous_times_out_with_one_line(tmp_path, tiny_model_dir):
    cwd = stage_dir(tmp_path, tiny_model_dir)
    port = free_port()  # nobody listens there: rank 0 never comes
    env = {
        **os.environ,
        "HYBRIDIR_RENDEZVOUS_TIMEOUT_S": "3",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: torch.distributed: no process group of 2 at 127.0.0.1:{port} within 3 s"), (
        result.stderr
    )
    assert time.monotonic() - began < 60
