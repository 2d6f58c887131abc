"""Data-parallel training on torch.distributed: the process group, collectives, and the torchrun launch.

Under `torchrun` (or with HYBRIDIR_PROCESSES > 1, which launches it) every rank embeds
its slice of each planned batch; passages and hard negatives are gathered so each query
is still scored against the whole planned batch, and weight gradients (the language
adversary's too) are averaged, so N processes
take exactly the steps one process would take on the same plan.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.common import PipelineError, first_line


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def lead(self) -> bool:
        """Rank 0 alone logs and writes checkpoints, metrics and the model."""
        return self.rank == 0

    def share(self, batch: list) -> list:
        """This rank's contiguous slice of a planned batch (its size is checked to divide evenly)."""
        per_rank = len(batch) // self.size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def gather(self, tensor: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Every rank's `tensor`, concatenated in rank order (detached). `rows`: how many rows each
        rank has, where they differ (every rank must know them): shorter ones are padded to send."""
        if self.size == 1:
            return tensor.detach()
        if rows is not None:
            padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
            padded[: len(tensor)] = tensor.detach()
            return torch.cat([part[:n] for part, n in zip(self._all_gather(padded), rows)])
        return torch.cat(self._all_gather(tensor.detach()))

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return parts

    def each_rank(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order: what ranks must agree on, each
        rank seeing all of them, so a disagreement stops every rank alike."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average `tensor` over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
            tensor /= self.size
        return tensor

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Average weight gradients over ranks, in one all-reduce of a flat buffer."""
        if self.size == 1:
            return
        grads = [w.grad for w in model.parameters() if w.grad is not None]
        flat = self.mean_(torch.cat([g.flatten() for g in grads]))
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))

    def barrier(self) -> None:
        """Wait here until every rank arrives (the others, while rank 0 scores the dev split)."""
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1:
            dist.barrier()
            dist.destroy_process_group()


def init_world(timeout_s: float) -> World:
    """Join the torchrun process group, if there is one; fail within `timeout_s` if it cannot form."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if torch.cuda.is_available():  # before the group forms: NCCL binds each rank to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        with c_stderr_held_back():  # c10d logs a C++ stack trace for a failed connection
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))
            dist.barrier()
    except Exception as err:  # DistStoreError, RuntimeError, ValueError: all mean no process group
        raise PipelineError(
            f"torch.distributed: no process group of {size} at {where} within {timeout_s:g} s "
            f"(HYBRIDIR_RENDEZVOUS_TIMEOUT_S): {first_line(err)}"
        ) from None
    return World(rank=dist.get_rank(), size=dist.get_world_size())


@contextlib.contextmanager
def c_stderr_held_back():
    """Collect what C++ code writes to file descriptor 2; pass it on only if the block succeeds."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(processes: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as `processes` ranks on this machine; returns their exit code."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run([*torchrun, "-m", module, *argv]).returncode


def check_scale_out(world_size: int, batch_size: int, chunk_size: int | None) -> None:
    """Errors a distributed or cached-gradient run would otherwise meet only after start-up."""
    if batch_size % world_size:
        raise PipelineError(
            f"params.yaml: sampler.batch_size: {batch_size} is not divisible by the {world_size} processes (HYBRIDIR_PROCESSES)"
        )
    if chunk_size is not None and chunk_size > batch_size // world_size:
        raise PipelineError(
            f"params.yaml: train.chunk_size: {chunk_size} is larger than the {batch_size // world_size} "
            f"pairs each of the {world_size} processes embeds per batch"
        )
