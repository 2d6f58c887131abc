"""The `train` stage: contrastive fine-tuning of the shared encoder on the batch plan.

InfoNCE with in-batch negatives: each query is scored against every passage of its
planned batch (L2-normalized embeddings, temperature `train.temperature`), so what a
batch holds (monolingual or cross-lingual pairs) is exactly what the model learns to
separate. AdamW, linear warm-up then linear decay. Batches follow the plan in order;
checkpoints (model, optimizer, scheduler, RNG, plan position) are written atomically
every `train.checkpoint_every` steps, and `--resume` continues a killed run from the
last one, ending in the same state as an uninterrupted run.

Scale-out, on torch.distributed: under `torchrun` (or with `train.processes` > 1,
which launches it) every rank embeds its slice of each planned batch and the passages
of all ranks are gathered, so each query is still scored against the whole planned
batch: N processes train on exactly the plan's batches. `train.chunk_size` computes
the full-batch loss with cached gradients (GradCache, Gao et al. 2021): embed in
chunks without a graph, take the loss's gradient with respect to the embeddings, then
re-embed each chunk with its gradient, so a batch of 4096 pairs needs the memory of
`chunk_size` pairs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.batches import PLAN_PATH, PLAN_SCHEMA
from pipeline.common import PipelineError, atomic_path, first_line, load_params, param, read_parquet, run_stage, stage_parser, write_json
from pipeline.sources import PAIRS_PATH, PAIRS_SCHEMA

CHECKPOINT_PATH = Path("models/checkpoints/train.pt")


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    temperature: float
    warmup_ratio: float
    weight_decay: float
    max_length: int
    query_prefix: str
    passage_prefix: str
    checkpoint_every: int
    seed: int
    freeze_embeddings: bool = True
    chunk_size: int | None = None  # GradCache chunk (pairs per forward pass); None = whole batch at once


def check_config(config: TrainConfig) -> None:
    """Reject bad hyper-parameters before any work, naming the param."""
    rules = [
        ("train.lr", config.lr, config.lr > 0, "must be > 0"),
        ("train.temperature", config.temperature, config.temperature > 0, "must be > 0"),
        ("train.warmup_ratio", config.warmup_ratio, 0 <= config.warmup_ratio <= 1, "is outside [0, 1]"),
        ("train.weight_decay", config.weight_decay, config.weight_decay >= 0, "must be >= 0"),
        ("model.max_length", config.max_length, config.max_length >= 8, "must be >= 8"),
        ("train.checkpoint_every", config.checkpoint_every, config.checkpoint_every >= 1, "must be >= 1"),
    ]
    if config.chunk_size is not None and (isinstance(config.chunk_size, bool) or not isinstance(config.chunk_size, int) or config.chunk_size < 1):
        raise PipelineError(f"params.yaml: train.chunk_size: {config.chunk_size!r} must be null or an integer >= 1")
    if not isinstance(config.freeze_embeddings, bool):
        raise PipelineError(f"params.yaml: train.freeze_embeddings: {config.freeze_embeddings!r} is not true/false")
    for name, value, ok, why in rules:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
            raise PipelineError(f"params.yaml: {name}: {value!r} {why if isinstance(value, (int, float)) else 'is not a number'}")


def info_nce_loss(queries: torch.Tensor, passages: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """Cross-entropy of each query over all passages of the batch; its own passage is the target.

    `queries` may be one rank's slice of the batch, starting at row `offset` of `passages`.
    """
    queries = F.normalize(queries, dim=-1)
    passages = F.normalize(passages, dim=-1)
    logits = queries @ passages.T / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device) + offset)


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    def share(self, batch: list[str]) -> list[str]:
        """This rank's contiguous slice of a planned batch (its size is checked to divide evenly)."""
        per_rank = len(batch) // self.size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]


def loss_and_embedding_grads(queries: torch.Tensor, passages: torch.Tensor, temperature: float, world: World):
    """The planned batch's loss and its gradient w.r.t. this rank's query and passage embeddings.

    Passages of all ranks are gathered; each rank's loss is its queries' mean over the
    gathered passages, and the passage gradients of all ranks' losses are summed, so
    after averaging weight gradients over ranks the step equals one process on the
    whole batch.
    """
    queries = queries.detach().requires_grad_()
    if world.size > 1:
        gathered = [torch.empty_like(passages) for _ in range(world.size)]
        dist.all_gather(gathered, passages.detach().contiguous())
        all_passages = torch.cat(gathered)
    else:
        all_passages = passages.detach()
    all_passages.requires_grad_()
    offset = world.rank * len(queries)
    loss = info_nce_loss(queries, all_passages, temperature, offset)
    loss.backward()
    passage_grad = all_passages.grad
    if world.size > 1:
        dist.all_reduce(passage_grad)
    return loss.detach(), queries.grad, passage_grad[offset : offset + len(passages)]


def contrastive_step(model, queries: list[str], passages: list[str], temperature: float, world: World, chunk_size: int | None, bf16: bool) -> torch.Tensor:
    """Accumulate the gradient of one planned batch (this rank's share) into the model; returns this rank's loss.

    With `chunk_size`, embeddings are first computed chunk by chunk without a graph and
    each chunk is then re-embedded, replaying its random state (dropout), with the
    gradient the whole-batch loss gives it.
    """

    def forward(texts: list[str]) -> torch.Tensor:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            return embed(model, texts).float()

    if chunk_size is None:
        q, p = forward(queries), forward(passages)
        loss, q_grad, p_grad = loss_and_embedding_grads(q, p, temperature, world)
        torch.autograd.backward([q, p], [q_grad, p_grad])
        return loss
    chunks = [queries[i : i + chunk_size] for i in range(0, len(queries), chunk_size)]
    n_query_chunks = len(chunks)
    chunks += [passages[i : i + chunk_size] for i in range(0, len(passages), chunk_size)]
    rng_states, embeddings = [], []
    with torch.no_grad():
        for chunk in chunks:
            rng_states.append(rng_state())
            embeddings.append(forward(chunk))
    after = rng_state()
    loss, q_grad, p_grad = loss_and_embedding_grads(
        torch.cat(embeddings[:n_query_chunks]), torch.cat(embeddings[n_query_chunks:]), temperature, world
    )
    grads = list(q_grad.split(chunk_size)) + list(p_grad.split(chunk_size))
    for chunk, state, grad in zip(chunks, rng_states, grads):
        set_rng_state(state)
        forward(chunk).backward(grad)
    set_rng_state(after)
    return loss


def average_gradients(model, world: World) -> None:
    """Average weight gradients over ranks, in one all-reduce of a flat buffer."""
    if world.size == 1:
        return
    grads = [w.grad for w in model.parameters() if w.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(part.view_as(grad))


def rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def plan_texts(plan: pa.Table, pairs: pa.Table, query_prefix: str, passage_prefix: str) -> tuple[list[list[str]], list[list[str]]]:
    """The (queries, passages) of every planned batch, in plan order, with the model's prefixes."""
    columns = (pairs[c].to_pylist() for c in ("group_id", "lang", "question", "passage"))
    texts = {(g, lang): (q, p) for g, lang, q, p in zip(*columns)}
    batch, group, q_lang, p_lang = (plan[c].to_pylist() for c in ("batch", "group_id", "query_lang", "passage_lang"))
    n_batches = max(batch) + 1 if batch else 0
    batch_queries: list[list[str]] = [[] for _ in range(n_batches)]
    batch_passages: list[list[str]] = [[] for _ in range(n_batches)]
    for b, g, ql, pl in zip(batch, group, q_lang, p_lang):
        for lang in (ql, pl):
            if (g, lang) not in texts:
                raise PipelineError(f"{PLAN_PATH}: group {g} has no pair in language '{lang}' in {PAIRS_PATH}")
        batch_queries[b].append(query_prefix + texts[(g, ql)][0])
        batch_passages[b].append(passage_prefix + texts[(g, pl)][1])
    return batch_queries, batch_passages


def freeze_token_embeddings(model: torch.nn.Module) -> int:
    """Freeze the token embedding table; returns how many weights that takes out of training.

    XLM-R's table (250k x 384, 80% of e5-small) would otherwise get a dense gradient and
    AdamW state every step, and weight decay would drift the rows of every token never seen
    in training, such as the languages the retriever is only evaluated on.
    """
    embeddings = model[0].auto_model.get_input_embeddings()
    embeddings.weight.requires_grad_(False)
    return embeddings.weight.numel()


def make_optimizer(model: torch.nn.Module, config: TrainConfig, steps: int):
    """AdamW (no decay on biases and LayerNorm, as usual for BERT) with linear warm-up and decay."""
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for weight in model.parameters():
        if weight.requires_grad:
            (no_decay if weight.ndim < 2 else decay).append(weight)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    warmup = math.ceil(config.warmup_ratio * steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, steps)


def embed(model, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings with gradients (dynamic padding to the longest text of the call)."""
    features = model.tokenize(texts)
    features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return model(features)["sentence_embedding"]


def run_fingerprint(*parts: bytes) -> str:
    """Identifies what a checkpoint was made from, so --resume never mixes two different runs."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def save_checkpoint(path: Path, step: int, model, optimizer, scheduler, fingerprint: str) -> None:
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: str) -> int:
    """Restore a checkpoint of this very run and return its step; 0 when there is none to use."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location=model.device, weights_only=False)
    if state.get("fingerprint") != fingerprint:
        print(f"{path}: checkpoint is from other inputs or params; starting from step 0")
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def train(
    model,
    batch_queries: list[list[str]],
    batch_passages: list[list[str]],
    config: TrainConfig,
    checkpoint: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    log=None,
    stop_after: int | None = None,
    world: World = World(),
) -> dict:
    """Fine-tune `model` in place on the planned batches; returns the run's summary figures.

    `log(step, metrics)` receives loss, learning rate and throughput after each step;
    `stop_after` ends the run early (after that many steps), as a crash would. Only
    rank 0 logs and writes checkpoints; every rank resumes from them.
    """
    torch.manual_seed(config.seed)
    steps = len(batch_queries)
    if config.freeze_embeddings:
        freeze_token_embeddings(model)
    optimizer, scheduler = make_optimizer(model, config, steps)
    start = load_checkpoint(checkpoint, model, optimizer, scheduler, fingerprint) if checkpoint and resume else 0
    use_bf16 = model.device.type == "cuda"
    model.train()
    loss_value, pairs_done, seconds = float("nan"), 0, 0.0
    lead = world.rank == 0
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step", disable=not lead or None)
    for step in progress:
        began = time.perf_counter()
        loss = contrastive_step(
            model, world.share(batch_queries[step]), world.share(batch_passages[step]),
            config.temperature, world, config.chunk_size, use_bf16,
        )  # fmt: skip
        average_gradients(model, world)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world.size > 1:
            dist.all_reduce(loss)
            loss /= world.size
        loss_value = loss.item()
        elapsed = time.perf_counter() - began
        seconds += elapsed
        pairs_done += len(batch_queries[step])
        metrics = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "pairs_per_s": len(batch_queries[step]) / elapsed}
        progress.set_postfix(loss=f"{loss_value:.3f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
        if log is not None and lead:
            log(step + 1, metrics)
        if checkpoint and lead and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(checkpoint, step + 1, model, optimizer, scheduler, fingerprint)
        if stop_after is not None and step + 1 - start >= stop_after:
            break
    model.eval()
    return {
        "steps": steps,
        "resumed_from_step": start,
        "final_loss": round(loss_value, 6),
        "pairs_per_s": round(pairs_done / seconds, 3) if seconds else None,
        "device": str(model.device),
        "processes": world.size,
    }


def init_world(timeout_s: float) -> World:
    """Join the torchrun process group, if there is one; fail within `timeout_s` if it cannot form."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        with c_stderr_held_back():  # c10d logs a C++ stack trace for a failed connection
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))
            dist.barrier()
    except Exception as err:  # DistStoreError, RuntimeError, ValueError: all mean no process group
        raise PipelineError(
            f"torch.distributed: no process group of {size} at {where} within {timeout_s:g} s "
            f"(train.rendezvous_timeout_s): {first_line(err)}"
        ) from None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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


def check_scale_out(processes, timeout_s, world_size: int, batch_size: int, chunk_size: int | None) -> None:
    """Errors a distributed or cached-gradient run would otherwise meet only after start-up."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise PipelineError(f"params.yaml: train.processes: {processes!r} must be an integer >= 1")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise PipelineError(f"params.yaml: train.rendezvous_timeout_s: {timeout_s!r} must be > 0")
    if batch_size % world_size:
        raise PipelineError(f"params.yaml: sampler.batch_size: {batch_size} is not divisible by the {world_size} processes")
    if chunk_size is not None and chunk_size > batch_size // world_size:
        raise PipelineError(
            f"params.yaml: train.chunk_size: {chunk_size} is larger than the {batch_size // world_size} "
            f"pairs each of the {world_size} processes embeds per batch"
        )


def main() -> None:
    parser = stage_parser(__doc__, out="models/retriever", metrics="metrics/train.json")
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--live", default="metrics/train_live", help="dvclive directory (loss/lr curves)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this run")
    args = parser.parse_args()
    params = load_params(args.params)
    config = TrainConfig(
        lr=param(params, "train.lr"),
        temperature=param(params, "train.temperature"),
        warmup_ratio=param(params, "train.warmup_ratio"),
        weight_decay=param(params, "train.weight_decay"),
        max_length=param(params, "model.max_length"),
        query_prefix=param(params, "model.query_prefix"),
        passage_prefix=param(params, "model.passage_prefix"),
        checkpoint_every=param(params, "train.checkpoint_every"),
        seed=param(params, "seed"),
        freeze_embeddings=param(params, "train.freeze_embeddings"),
        chunk_size=param(params, "train.chunk_size"),
    )
    check_config(config)
    processes, timeout_s = param(params, "train.processes"), param(params, "train.rendezvous_timeout_s")
    sampler = {key: param(params, f"sampler.{key}") for key in ("ratio", "unit", "batch_size", "steps")}
    launched = "WORLD_SIZE" in os.environ  # started by torchrun: one of its processes
    world_size = int(os.environ["WORLD_SIZE"]) if launched else processes
    check_scale_out(processes, timeout_s, world_size, sampler["batch_size"], config.chunk_size)
    plan = read_parquet(PLAN_PATH, PLAN_SCHEMA, made_by={"seed": config.seed, "sampler": sampler})
    pairs = read_parquet(PAIRS_PATH, PAIRS_SCHEMA, made_by={"data.train": param(params, "data.train")})
    batch_queries, batch_passages = plan_texts(plan, pairs, config.query_prefix, config.passage_prefix)
    if not Path(args.base, "modules.json").exists():
        raise PipelineError(f"{args.base}: not a sentence-transformers model (run `dvc repro base_model`)")
    if not launched and processes > 1:  # one process per rank, on this machine
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        sys.exit(subprocess.run([*torchrun, "-m", "pipeline.train", *sys.argv[1:]]).returncode)
    world = init_world(timeout_s)

    from dvclive import Live
    from sentence_transformers import SentenceTransformer

    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(args.base, device=device)
    model.max_seq_length = config.max_length
    fingerprint = run_fingerprint(
        PLAN_PATH.read_bytes(), PAIRS_PATH.read_bytes(), json.dumps(config.__dict__, sort_keys=True).encode(),
        Path(args.base, "model.safetensors").read_bytes() if Path(args.base, "model.safetensors").exists() else b"",
    )
    if world.rank == 0:
        with Live(dir=args.live, save_dvc_exp=False, dvcyaml=False, resume=args.resume) as live:
            def log(step: int, metrics: dict) -> None:
                live.step = step
                for name, value in metrics.items():
                    live.log_metric(f"train/{name}", value, plot=True)
                live.next_step()

            summary = train(model, batch_queries, batch_passages, config, CHECKPOINT_PATH, args.resume, fingerprint, log, world=world)
        with atomic_path(args.out, is_dir=True) as tmp:
            model.save(str(tmp))
        write_json(summary, args.metrics)
        CHECKPOINT_PATH.unlink(missing_ok=True)
        print(
            f"wrote {args.out}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{summary['pairs_per_s']} pairs/s on {summary['processes']} x {summary['device']}"
        )
    else:
        train(model, batch_queries, batch_passages, config, CHECKPOINT_PATH, args.resume, fingerprint, world=world)
    if world.size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_stage(main)
