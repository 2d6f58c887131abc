"""The `train` stage: contrastive fine-tuning of the shared encoder on the batch plan.

InfoNCE with in-batch negatives: each query is scored against every passage of its
planned batch (L2-normalized embeddings, temperature `train.temperature`), so what a
batch holds (monolingual or cross-lingual pairs) is exactly what the model learns to
separate. AdamW, linear warm-up then linear decay. Batches follow the plan in order;
checkpoints (model, optimizer, scheduler, RNG, plan position) are written atomically
every `train.checkpoint_every` steps, and `--resume` continues a killed run from the
last one, ending in the same state as an uninterrupted run. The checkpoint is the
source of truth for where a run is: it carries the logged curves too, and the dvclive
log is rebuilt from it on resume (whatever a kill left of the log). Forward passes run
under bf16 autocast where `train.precision` allows; the loss and softmax stay fp32.

Scale-out on torch.distributed is in pipeline/distributed.py: N processes train on
exactly the plan's batches. `train.chunk_size` computes
the full-batch loss with cached gradients (GradCache, Gao et al. 2021): embed in
chunks without a graph, take the loss's gradient with respect to the embeddings, then
re-embed each chunk with its gradient, so a batch of 4096 pairs needs the memory of
`chunk_size` pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.common import PipelineError, atomic_outputs, first_line, load_params, param, read_parquet, run_stage, stage_parser, write_json
from pipeline.contracts import BASE_MODEL_DIR, PAIRS_PATH, PAIRS_SCHEMA, PLAN_PATH, PLAN_SCHEMA, SAMPLER_PARAMS, pairs_stamp, plan_stamp
from pipeline.distributed import World, check_scale_out, init_world, launched_by_torchrun, relaunch_under_torchrun
from pipeline.encoding import autocast, check_model_dir, load_model, use_bf16

CHECKPOINT_PATH = Path("models/checkpoints/train.pt")


@dataclass(frozen=True)
class TrainConfig:
    """The hyper-parameters of a run (params.yaml's train.* and model.* that training reads)."""

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
    precision: str = "fp32"  # auto | fp32 | bf16 (autocast of the forward passes)


@dataclass
class TrainRun:
    """How one call of `train` runs: checkpointing, resumption, logging and the process group."""

    checkpoint: Path | None = None
    resume: bool = False
    fingerprint: str = ""  # what the checkpoint must have been made from to be resumed
    log: Callable[[int, dict], None] | None = None  # (step, metrics) after each step, rank 0 only
    stop_after: int | None = None  # end after this many steps, as a crash would (tests)
    world: World = field(default_factory=World)


def info_nce_loss(queries: torch.Tensor, passages: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """Cross-entropy of each query over all passages of the batch; its own passage is the target.

    `queries` may be one rank's slice of the batch, starting at row `offset` of `passages`.
    """
    queries = F.normalize(queries, dim=-1)
    passages = F.normalize(passages, dim=-1)
    logits = queries @ passages.T / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device) + offset)


def loss_and_embedding_grads(queries: torch.Tensor, passages: torch.Tensor, temperature: float, world: World):
    """The planned batch's loss and its gradient w.r.t. this rank's query and passage embeddings.

    Passages of all ranks are gathered; each rank's loss is its queries' mean over the
    gathered passages, and the passage gradients of all ranks' losses are summed, so
    after averaging weight gradients over ranks the step equals one process on the
    whole batch.
    """
    queries = queries.detach().requires_grad_()
    all_passages = world.gather(passages).requires_grad_()
    offset = world.rank * len(queries)
    loss = info_nce_loss(queries, all_passages, temperature, offset)
    loss.backward()
    passage_grad = world.sum_(all_passages.grad)
    return loss.detach(), queries.grad, passage_grad[offset : offset + len(passages)]


def contrastive_step(
    model, queries: list[str], passages: list[str], temperature: float, world: World, chunk_size: int | None, bf16: bool
) -> torch.Tensor:
    """Accumulate the gradient of one planned batch (this rank's share) into the model; returns this rank's loss.

    With `chunk_size`, embeddings are first computed chunk by chunk without a graph and
    each chunk is then re-embedded, replaying its random state (dropout), with the
    gradient the whole-batch loss gives it.
    """

    def forward(texts: list[str]) -> torch.Tensor:
        with autocast(model.device.type, bf16):
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


def rng_state() -> list:
    """Torch's RNG states as tensors (None without CUDA), so a checkpoint loads with weights_only."""
    return [torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None]


def set_rng_state(state: list) -> None:
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


def save_checkpoint(path: Path, step: int, model, optimizer, scheduler, fingerprint: str, history: list[dict]) -> None:
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "history": history,  # the logged curves up to `step`, to rebuild the log on resume
    }
    with atomic_outputs(path) as (tmp,):
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: str) -> tuple[int, list[dict]]:
    """Restore a checkpoint of this very run: (its step, the curves logged up to it); (0, []) when there is
    none to use. A checkpoint that cannot be read (killed mid-save, disk full) is ignored, not fatal;
    `weights_only` means a checkpoint file can never run code."""
    if not path.exists():
        return 0, []
    try:
        state = torch.load(path, map_location=model.device, weights_only=True)
        step, history = int(state["step"]), list(state["history"])
    except Exception as err:  # truncated zip, bad pickle, missing key: all mean "unusable"
        print(f"{path}: unusable checkpoint ({first_line(err)}); ignored, training from step 0", file=sys.stderr)
        return 0, []
    if state.get("fingerprint") != fingerprint:
        print(f"{path}: checkpoint is from other inputs or params; starting from step 0")
        return 0, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return step, history


def check_finite(loss: float, step: int, config: TrainConfig) -> None:
    """Stop at the first non-finite loss: a diverged run must not write a NaN model."""
    if not math.isfinite(loss):
        raise PipelineError(
            f"train: loss is {loss} at step {step}: training diverged (train.lr {config.lr:g}, "
            f"train.temperature {config.temperature:g}); no model was written"
        )


def train(model, batch_queries: list[list[str]], batch_passages: list[list[str]], config: TrainConfig, run: TrainRun | None = None) -> dict:
    """Fine-tune `model` in place on the planned batches; returns the run's summary figures.

    Only rank 0 logs and writes checkpoints; every rank resumes from them. On resume the
    curves logged before the checkpoint are passed to `run.log` again, so a log opened
    fresh holds the whole run, with no step twice.
    """
    run = run or TrainRun()
    world = run.world
    torch.manual_seed(config.seed)
    steps = len(batch_queries)
    if config.freeze_embeddings:
        freeze_token_embeddings(model)
    optimizer, scheduler = make_optimizer(model, config, steps)
    start, history = (0, [])
    if run.checkpoint and run.resume:
        start, history = load_checkpoint(run.checkpoint, model, optimizer, scheduler, run.fingerprint)
    bf16 = use_bf16(config.precision, model.device.type)
    log = run.log if world.lead else None
    for row in history if log else []:
        log(row["step"], {k: v for k, v in row.items() if k != "step"})
    model.train()
    loss_value, pairs_done, seconds = float("nan"), 0, 0.0
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step", disable=not world.lead or None)
    for step in progress:
        began = time.perf_counter()
        loss = contrastive_step(
            model, world.share(batch_queries[step]), world.share(batch_passages[step]),
            config.temperature, world, config.chunk_size, bf16,
        )  # fmt: skip
        loss_value = world.mean_(loss).item()
        check_finite(loss_value, step + 1, config)
        world.average_gradients(model)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - began
        seconds += elapsed
        pairs_done += len(batch_queries[step])
        metrics = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "pairs_per_s": len(batch_queries[step]) / elapsed}
        history.append({"step": step + 1, **metrics})
        progress.set_postfix(loss=f"{loss_value:.3f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
        if log is not None:
            log(step + 1, metrics)
        if run.checkpoint and world.lead and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(run.checkpoint, step + 1, model, optimizer, scheduler, run.fingerprint, history)
        if run.stop_after is not None and step + 1 - start >= run.stop_after:
            break
    model.eval()
    return {
        "steps": steps,
        "resumed_from_step": start,
        "final_loss": round(loss_value, 6),
        "pairs_per_s": round(pairs_done / seconds, 3) if seconds else None,
        "device": str(model.device),
        "precision": "bf16" if bf16 else "fp32",
        "processes": world.size,
    }


def train_config(params: dict) -> TrainConfig:
    return TrainConfig(
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
        precision=param(params, "train.precision"),
    )


def main() -> None:
    parser = stage_parser(
        __doc__, base=str(BASE_MODEL_DIR), out="models/retriever", metrics="metrics/train.json", live="metrics/train_live"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this run")
    args = parser.parse_args()
    params = load_params(args.params)
    config = train_config(params)
    processes = param(params, "train.processes")
    sampler = {key: param(params, f"sampler.{key}") for key in SAMPLER_PARAMS}
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else processes
    check_scale_out(world_size, sampler["batch_size"], config.chunk_size)
    plan = read_parquet(PLAN_PATH, PLAN_SCHEMA, made_by=plan_stamp(config.seed, sampler))
    pairs = read_parquet(PAIRS_PATH, PAIRS_SCHEMA, made_by=pairs_stamp(param(params, "data.train")))
    batch_queries, batch_passages = plan_texts(plan, pairs, config.query_prefix, config.passage_prefix)
    check_model_dir(args.base, "run `dvc repro base_model`")
    if not launched_by_torchrun() and processes > 1:  # one process per rank, on this machine
        sys.exit(relaunch_under_torchrun(processes, "pipeline.train", sys.argv[1:]))
    world = init_world(param(params, "train.rendezvous_timeout_s"))
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    fingerprint = run_fingerprint(
        PLAN_PATH.read_bytes(),
        PAIRS_PATH.read_bytes(),
        json.dumps(asdict(config), sort_keys=True).encode(),
        Path(args.base, "model.safetensors").read_bytes() if Path(args.base, "model.safetensors").exists() else b"",
    )
    run = TrainRun(checkpoint=CHECKPOINT_PATH, resume=args.resume, fingerprint=fingerprint, world=world)
    if not world.lead:
        train(load_model(args.base, config.max_length, device), batch_queries, batch_passages, config, run)
        world.close()
        return
    from dvclive import Live

    with atomic_outputs(args.out, args.metrics) as (model_out, metrics_out):
        model = load_model(args.base, config.max_length, device)
        # A fresh log, refilled from the checkpoint's history: never trust what a kill left of it.
        with Live(dir=args.live, save_dvc_exp=False, dvcyaml=False, resume=False) as live:

            def log(step: int, metrics: dict) -> None:
                live.step = step
                for name, value in metrics.items():
                    live.log_metric(f"train/{name}", value, plot=True)
                live.next_step()

            run.log = log
            summary = train(model, batch_queries, batch_passages, config, run)
        model.save(str(model_out))
        write_json(summary, metrics_out)
    CHECKPOINT_PATH.unlink(missing_ok=True)
    world.close()
    print(
        f"wrote {args.out}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['pairs_per_s']} pairs/s on {summary['processes']} x {summary['device']} ({summary['precision']})"
    )


if __name__ == "__main__":
    run_stage(main)
