"""Checkpoints of a training run: written atomically, resumed only by the run that made them.

A checkpoint holds the model, optimizer, scheduler, RNG states, the plan position, the
curves logged so far and, under `train.keep_best`, the best dev step's weights; its fingerprint (a hash of the plan, the data, the params and the
base weights) keeps `--resume` from ever mixing two different runs. Every rank of a
distributed run reads the checkpoint from its own disk, so the ranks check that they start
from one step of one run (`check_ranks_agree`): on nodes without a shared folder one would
resume at step k and the others at 0, and their collectives would still pair up.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from pipeline.common import PipelineError, atomic_outputs, first_line
from pipeline.training.distributed import World

log = logging.getLogger(__name__)


def rng_state() -> list:
    """Torch's RNG states as tensors (None without CUDA), so a checkpoint loads with weights_only."""
    return [torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None]


def set_rng_state(state: list) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def run_fingerprint(*parts: bytes) -> str:
    """Identifies what a checkpoint was made from, so --resume never mixes two different runs."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def save_checkpoint(
    path: Path, step: int, model, optimizer, scheduler, fingerprint: str, history: list[dict], adversary=None, best: dict | None = None
) -> None:
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "adversary": adversary.state_dict() if adversary is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "history": history,  # the logged curves up to `step`, to rebuild the log on resume
        "best": best,  # train.keep_best: the best dev step so far ({step, value, weights}), or None
    }
    with atomic_outputs(path) as (tmp,):
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: str, adversary=None) -> tuple[int, list[dict], dict | None]:
    """Restore a checkpoint of this very run: (its step, the curves logged up to it, the best dev step so
    far, its weights on the CPU); (0, [], None) when there is none to use. A checkpoint that cannot be read
    (killed mid-save, disk full) is ignored, not fatal; `weights_only` means a checkpoint file can never run code."""
    if not path.exists():
        return 0, [], None
    try:
        state = torch.load(path, map_location=model.device, weights_only=True)
        step, history, best = int(state["step"]), list(state["history"]), state["best"]
    except Exception as err:  # truncated zip, bad pickle, missing key: all mean "unusable"
        log.warning(f"{path}: unusable checkpoint ({first_line(err)}); ignored, training from step 0")
        return 0, [], None
    if state.get("fingerprint") != fingerprint:
        log.info(f"{path}: checkpoint is from other inputs or params; starting from step 0")
        return 0, [], None
    model.load_state_dict(state["model"])
    if adversary is not None:
        adversary.load_state_dict(state["adversary"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if best is not None:
        best["weights"] = {name: weight.cpu() for name, weight in best["weights"].items()}
    return step, history, best


def check_ranks_agree(world: World, path: Path, step: int, fingerprint: str) -> None:
    """Stop every rank, with one line, unless all start at the same step of a run of the same inputs."""
    starts = world.each_rank((step, fingerprint))
    if len(set(starts)) > 1:
        found = ", ".join(f"rank {rank} at step {at} of inputs {inputs[:8]}" for rank, (at, inputs) in enumerate(starts))
        raise PipelineError(
            f"{path}: the {world.size} processes would start from different points ({found}): every node must see "
            f"the same checkpoint and inputs (a shared folder), or remove {path} on every node"
        )
