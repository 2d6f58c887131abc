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

The plan may add to a batch (docs/strategies.md): a hard negative per pair, which every
query of the batch is scored against besides the positives; under `sampler.schedule:
multitask`, two tasks (the plan's `kind`), each with its own InfoNCE over its own rows.
`train.adversarial_weight` trains a language classifier on the embeddings and sends its
gradient, reversed, into the encoder; `train.query_noise` perturbs a seeded share of the
queries with the robustness report's perturbations (pipeline/noise.py).

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.common import PipelineError, atomic_outputs, first_line, load_params, param, read_parquet, run_stage, stage_parser, write_json
from pipeline.contracts import (
    BASE_MODEL_DIR,
    CANDIDATES_SCHEMA,
    PAIRS_PATH,
    PAIRS_SCHEMA,
    PARALLEL_CANDIDATES_PATH,
    PLAN_PATH,
    PLAN_SCHEMA,
    SAMPLER_PARAMS,
    pairs_stamp,
    plan_stamp,
)
from pipeline.distributed import World, check_scale_out, init_world, launched_by_torchrun, relaunch_under_torchrun
from pipeline.encoding import autocast, check_model_dir, load_model
from pipeline.machine import describe, machine_record, resolve_precision
from pipeline.noise import Noise, perturb

CHECKPOINT_PATH = Path("models/checkpoints/train.pt")
QUERY_NOISE_STREAM = 2  # the noisy queries' own random stream from `seed` (batches uses 0 and 1)


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
    adversarial_weight: float = 0.0  # > 0: the language adversary, its gradient reversed into the encoder x this
    adversary_lr: float = 1e-3
    query_noise: tuple[str, ...] = ()  # applied by plan_texts; here so that a checkpoint's fingerprint covers them
    query_noise_rate: float = 0.5


@dataclass
class TrainRun:
    """How one call of `train` runs: checkpointing, resumption, logging and the process group."""

    checkpoint: Path | None = None
    resume: bool = False
    fingerprint: str = ""  # what the checkpoint must have been made from to be resumed
    log: Callable[[int, dict], None] | None = None  # (step, metrics) after each step, rank 0 only
    stop_after: int | None = None  # end after this many steps, as a crash would (tests)
    world: World = field(default_factory=World)


@dataclass(frozen=True)
class PlannedBatch:
    """One planned batch as training reads it: row i is query i and its positive passage i, and
    where the plan gives one, hard negative i. Every list has one entry per row."""

    queries: list[str]
    passages: list[str]
    negatives: list[str | None] | None = None  # None: the plan has no hard negatives
    tasks: list[str] | None = None  # multitask: each row's task (the plan's kind), scored apart; None: one task
    query_langs: list[str] | None = None  # the language adversary's labels
    passage_langs: list[str] | None = None
    negative_langs: list[str | None] | None = None

    def share(self, world: World) -> PlannedBatch:
        """This rank's rows."""
        return PlannedBatch(*(None if rows is None else world.share(rows) for rows in self._lists()))

    def negative_texts(self) -> list[str]:
        return [text for text in self.negatives or [] if text is not None]

    def negatives_per_rank(self, world: World) -> list[int]:
        """How many hard negatives each rank embeds (ranks' shares differ where rows have none)."""
        return [len(self.share(World(rank, world.size)).negative_texts()) for rank in range(world.size)]

    def column_tasks(self) -> list[str] | None:
        """The task of every passage a query is scored against: the positives, then the hard negatives, in row order."""
        if self.tasks is None:
            return None
        return self.tasks + [task for task, text in zip(self.tasks, self.negatives or []) if text is not None]

    def languages(self) -> list[str]:
        """The language of every text this batch embeds, in the order of queries, passages, negatives."""
        return [*self.query_langs, *self.passage_langs, *(lang for lang in self.negative_langs or [] if lang is not None)]

    def _lists(self) -> tuple:
        return (self.queries, self.passages, self.negatives, self.tasks, self.query_langs, self.passage_langs, self.negative_langs)


def info_nce_loss(
    queries: torch.Tensor, passages: torch.Tensor, temperature: float, offset: int = 0, same_task: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of each query over all passages of the batch; its own passage is the target.

    `queries` may be one rank's slice of the batch, starting at row `offset` of `passages`;
    rows of `passages` past the positives are hard negatives. With `same_task` (queries x
    passages), a query is scored against its own task's passages only, so the mean is the
    sum of each task's InfoNCE weighted by its share of the rows.
    """
    queries = F.normalize(queries, dim=-1)
    passages = F.normalize(passages, dim=-1)
    logits = queries @ passages.T / temperature
    if same_task is not None:
        logits = logits.masked_fill(~same_task, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device) + offset)


def same_task_mask(batch: PlannedBatch, world: World, device) -> torch.Tensor | None:
    """Which passages (all ranks' positives, then all hard negatives) each of this rank's queries is scored against."""
    columns = batch.column_tasks()
    if columns is None:
        return None
    code = {task: i for i, task in enumerate(sorted(set(columns)))}
    rows = torch.tensor([code[task] for task in world.share(batch.tasks)], device=device)
    return rows[:, None] == torch.tensor([code[task] for task in columns], device=device)[None, :]


def loss_and_embedding_grads(
    queries: torch.Tensor, passages: torch.Tensor, negatives: torch.Tensor, batch: PlannedBatch, temperature: float, world: World
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The planned batch's loss and its gradient w.r.t. this rank's query, passage and negative embeddings.

    Passages and hard negatives of all ranks are gathered; each rank's loss is its queries'
    mean over the gathered ones, and their gradients from all ranks' losses are summed,
    so after averaging weight gradients over ranks the step equals one process on the
    whole batch.
    """
    queries = queries.detach().requires_grad_()
    per_rank = batch.negatives_per_rank(world)
    gathered_negatives = world.gather(negatives, per_rank) if sum(per_rank) else negatives.detach()
    columns = torch.cat([world.gather(passages), gathered_negatives]).requires_grad_()
    offset = world.rank * len(queries)
    loss = info_nce_loss(queries, columns, temperature, offset, same_task_mask(batch, world, queries.device))
    loss.backward()
    grad = world.sum_(columns.grad)
    first_negative = len(batch.queries) + sum(per_rank[: world.rank])
    return loss.detach(), [
        queries.grad,
        grad[offset : offset + len(passages)],
        grad[first_negative : first_negative + len(negatives)],
    ]


class GradientReversal(torch.autograd.Function):
    """Identity on the way forward; on the way back the gradient is multiplied by -weight
    (Ganin & Lempitsky 2015): what helps the classifier, the encoder is pushed against."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


class LanguageAdversary(torch.nn.Module):
    """A linear classifier of an embedding's language behind a gradient-reversal layer: it learns
    to tell the languages apart while the encoder learns to make that hard."""

    def __init__(self, dim: int, langs: Sequence[str], weight: float):
        super().__init__()
        self.langs, self.weight = list(langs), weight
        self.classifier = torch.nn.Linear(dim, len(self.langs))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.classifier(GradientReversal.apply(embeddings, self.weight))


def adversary_grads(
    adversary: LanguageAdversary, embeddings: list[torch.Tensor], langs: list[str], texts_in_batch: int, world: World
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Accumulate the classifier's gradient; returns its loss and accuracy over the whole planned
    batch, and the reversed gradient w.r.t. each of this rank's embeddings.

    Each rank's cross-entropy sum is scaled by size / texts_in_batch, so that averaging
    gradients over ranks gives the mean over every text of the batch, as one process would.
    """
    leaves = [e.detach().requires_grad_() for e in embeddings]
    index = {lang: i for i, lang in enumerate(adversary.langs)}
    target = torch.tensor([index[lang] for lang in langs], device=leaves[0].device)
    logits = adversary(torch.cat(leaves))
    total = F.cross_entropy(logits, target, reduction="sum")
    (total * world.size / texts_in_batch).backward()
    sums = world.sum_(torch.stack([total.detach(), (logits.argmax(-1) == target).sum().float()]))
    figures = {"adversary_loss": sums[0] / texts_in_batch, "adversary_accuracy": sums[1] / texts_in_batch}
    return figures, [leaf.grad for leaf in leaves]


def contrastive_step(
    model,
    batch: PlannedBatch,
    temperature: float,
    world: World,
    chunk_size: int | None,
    bf16: bool,
    adversary: LanguageAdversary | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the gradient of one planned batch (this rank's share) into the model and the
    adversary; returns this rank's loss and the adversary's figures.

    With `chunk_size`, embeddings are first computed chunk by chunk without a graph and
    each chunk is then re-embedded, replaying its random state (dropout), with the
    gradient the whole-batch loss gives it.
    """
    dim = embedding_dim(model)

    def forward(texts: list[str]) -> torch.Tensor:
        if not texts:  # a rank whose rows have no hard negative
            return torch.zeros(0, dim, device=model.device)
        with autocast(model.device.type, bf16):
            return embed(model, texts).float()

    mine = batch.share(world)
    texts = [mine.queries, mine.passages, mine.negative_texts()]
    if chunk_size is None:
        outputs = [forward(part) for part in texts]
        embeddings = [output.detach() for output in outputs]
    else:
        chunks = [(i, part[j : j + chunk_size]) for i, part in enumerate(texts) for j in range(0, len(part), chunk_size)]
        rng_states, chunk_embeddings = [], []
        with torch.no_grad():
            for _, chunk in chunks:
                rng_states.append(rng_state())
                chunk_embeddings.append(forward(chunk))
        after = rng_state()
        embeddings = [
            torch.cat([e for (i, _), e in zip(chunks, chunk_embeddings) if i == part] or [forward([])]) for part in range(len(texts))
        ]
    loss, grads = loss_and_embedding_grads(*embeddings, batch, temperature, world)
    figures: dict[str, torch.Tensor] = {}
    if adversary is not None:
        texts_in_batch = 2 * len(batch.queries) + len(batch.negative_texts())
        figures, reversed_grads = adversary_grads(adversary, embeddings, mine.languages(), texts_in_batch, world)
        grads = [grad + extra for grad, extra in zip(grads, reversed_grads)]
    if chunk_size is None:
        used = [(output, grad) for output, grad in zip(outputs, grads) if output.requires_grad]
        torch.autograd.backward([output for output, _ in used], [grad for _, grad in used])
        return loss, figures
    chunk_grads = [chunk_grad for part, grad in enumerate(grads) if texts[part] for chunk_grad in grad.split(chunk_size)]
    for (_, chunk), state, grad in zip(chunks, rng_states, chunk_grads):
        set_rng_state(state)
        forward(chunk).backward(grad)
    set_rng_state(after)
    return loss, figures


def rng_state() -> list:
    """Torch's RNG states as tensors (None without CUDA), so a checkpoint loads with weights_only."""
    return [torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None]


def set_rng_state(state: list) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def query_noise_draws(rows: int, noises: Sequence[Noise], rate: float, seed: int) -> list[tuple[Noise, int] | None]:
    """Per plan row: the noise its query gets and the seed of its typos, or None (a share `rate`
    of rows, deterministic for `seed`). Each row has its own typo seed, so a question seen
    in several epochs is not misspelt the same way every time."""
    if not noises or rate == 0:
        return [None] * rows
    rng = np.random.default_rng([seed, QUERY_NOISE_STREAM])
    picked, which, typo_seeds = rng.random(rows) < rate, rng.integers(len(noises), size=rows), rng.integers(2**32, size=rows)
    return [(noises[w], int(s)) if p else None for p, w, s in zip(picked, which, typo_seeds)]


def has_negatives(plan: pa.Table) -> bool:
    """Whether the plan names a hard negative for any row (sampler.negatives was not none)."""
    return plan["negative_candidate"].null_count < plan.num_rows


def plan_texts(
    plan: pa.Table,
    pairs: pa.Table,
    query_prefix: str,
    passage_prefix: str,
    candidates: pa.Table | None = None,
    multitask: bool = False,
    noise: Sequence[tuple[Noise, int] | None] | None = None,
) -> list[PlannedBatch]:
    """Every planned batch's texts, in plan order, with the model's prefixes: queries (perturbed
    where `noise` says, before the prefix), passages, and hard negatives from `candidates`."""
    columns = (pairs[c].to_pylist() for c in ("group_id", "lang", "question", "passage"))
    texts = {(g, lang): (q, p) for g, lang, q, p in zip(*columns)}
    sentences = {}
    if candidates is not None:
        keys = zip(candidates["lang"].to_pylist(), candidates["candidate"].to_pylist())
        sentences = dict(zip(keys, candidates["sentence"].to_pylist()))
    names = ("batch", "group_id", "query_lang", "passage_lang", "kind", "negative_lang", "negative_candidate")
    batch, group, query_lang, passage_lang, kind, negative_lang, negative = (plan[name].to_pylist() for name in names)
    queries, passages, negatives = [], [], []
    for i, (g, ql, pl, nl, nc) in enumerate(zip(group, query_lang, passage_lang, negative_lang, negative)):
        for lang in (ql, pl):
            if (g, lang) not in texts:
                raise PipelineError(f"{PLAN_PATH}: group {g} has no pair in language '{lang}' in {PAIRS_PATH}")
        if nc is not None and (nl, nc) not in sentences:
            raise PipelineError(f"{PLAN_PATH}: hard negative {nc} of language '{nl}' is not in {PARALLEL_CANDIDATES_PATH}")
        question = texts[(g, ql)][0]
        if noise is not None and noise[i] is not None:
            question = perturb(question, *noise[i])
        queries.append(query_prefix + question)
        passages.append(passage_prefix + texts[(g, pl)][1])
        negatives.append(None if nc is None else passage_prefix + sentences[(nl, nc)])
    rows_of: dict[int, list[int]] = {}
    for i, b in enumerate(batch):
        rows_of.setdefault(b, []).append(i)
    keep_negatives = has_negatives(plan)

    def pick(values: list, rows: list[int], keep: bool = True) -> list | None:
        return [values[i] for i in rows] if keep else None

    return [
        PlannedBatch(
            queries=pick(queries, rows),
            passages=pick(passages, rows),
            negatives=pick(negatives, rows, keep_negatives),
            tasks=pick(kind, rows, multitask),
            query_langs=pick(query_lang, rows),
            passage_langs=pick(passage_lang, rows),
            negative_langs=pick(negative_lang, rows, keep_negatives),
        )
        for _, rows in sorted(rows_of.items())
    ]


def freeze_token_embeddings(model: torch.nn.Module) -> int:
    """Freeze the token embedding table; returns how many weights that takes out of training.

    XLM-R's table (250k x 384, 80% of e5-small) would otherwise get a dense gradient and
    AdamW state every step, and weight decay would drift the rows of every token never seen
    in training, such as the languages the retriever is only evaluated on.
    """
    embeddings = model[0].auto_model.get_input_embeddings()
    embeddings.weight.requires_grad_(False)
    return embeddings.weight.numel()


def make_optimizer(model: torch.nn.Module, config: TrainConfig, steps: int, adversary: torch.nn.Module | None = None):
    """AdamW (no decay on biases and LayerNorm, as usual for BERT) with linear warm-up and decay; the
    adversary, if any, at its own peak learning rate: a fresh layer at the encoder's would barely move."""
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for weight in model.parameters():
        if weight.requires_grad:
            (no_decay if weight.ndim < 2 else decay).append(weight)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if adversary is not None:
        groups.append({"params": list(adversary.parameters()), "weight_decay": 0.0, "lr": config.adversary_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    warmup = math.ceil(config.warmup_ratio * steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, steps)


def embedding_dim(model) -> int:
    """The sentence embedding's size (sentence-transformers 6 renamed the getter)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return getter()


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


def save_checkpoint(path: Path, step: int, model, optimizer, scheduler, fingerprint: str, history: list[dict], adversary=None) -> None:
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "adversary": adversary.state_dict() if adversary is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "history": history,  # the logged curves up to `step`, to rebuild the log on resume
    }
    with atomic_outputs(path) as (tmp,):
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: str, adversary=None) -> tuple[int, list[dict]]:
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
    if adversary is not None:
        adversary.load_state_dict(state["adversary"])
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


def make_adversary(model, batches: list[PlannedBatch], config: TrainConfig) -> LanguageAdversary | None:
    """The language adversary over every language the plan trains on, or None when it is off."""
    if config.adversarial_weight == 0:
        return None
    langs = sorted({lang for batch in batches for lang in batch.languages()})
    if len(langs) < 2:
        raise PipelineError(f"params.yaml: train.adversarial_weight: the plan has one language ({', '.join(langs)}): nothing to tell apart")
    return LanguageAdversary(embedding_dim(model), langs, config.adversarial_weight).to(model.device)


def train(model, batches: list[PlannedBatch], config: TrainConfig, run: TrainRun | None = None) -> dict:
    """Fine-tune `model` in place on the planned batches; returns the run's summary figures.

    Only rank 0 logs and writes checkpoints; every rank resumes from them. On resume the
    curves logged before the checkpoint are passed to `run.log` again, so a log opened
    fresh holds the whole run, with no step twice.
    """
    run = run or TrainRun()
    world = run.world
    torch.manual_seed(config.seed)
    steps = len(batches)
    if config.freeze_embeddings:
        freeze_token_embeddings(model)
    adversary = make_adversary(model, batches, config)
    optimizer, scheduler = make_optimizer(model, config, steps, adversary)
    start, history = (0, [])
    if run.checkpoint and run.resume:
        start, history = load_checkpoint(run.checkpoint, model, optimizer, scheduler, run.fingerprint, adversary)
    precision = resolve_precision(config.precision, model.device.type, "train.precision")
    bf16 = precision == "bf16"
    log = run.log if world.lead else None
    for row in history if log else []:
        log(row["step"], {k: v for k, v in row.items() if k != "step"})
    model.train()
    loss_value, pairs_done, seconds, figures = float("nan"), 0, 0.0, {}
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step", disable=not world.lead or None)
    for step in progress:
        began = time.perf_counter()
        batch = batches[step]
        loss, figures = contrastive_step(model, batch, config.temperature, world, config.chunk_size, bf16, adversary)
        loss_value = world.mean_(loss).item()
        check_finite(loss_value, step + 1, config)
        world.average_gradients(model)
        if adversary is not None:
            world.average_gradients(adversary)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - began
        seconds += elapsed
        pairs_done += len(batch.queries)
        metrics = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "pairs_per_s": len(batch.queries) / elapsed}
        metrics |= {name: value.item() for name, value in figures.items()}
        history.append({"step": step + 1, **metrics})
        progress.set_postfix(loss=f"{loss_value:.3f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
        if log is not None:
            log(step + 1, metrics)
        if run.checkpoint and world.lead and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(run.checkpoint, step + 1, model, optimizer, scheduler, run.fingerprint, history, adversary)
        if run.stop_after is not None and step + 1 - start >= run.stop_after:
            break
    model.eval()
    summary = {
        "steps": steps,
        "resumed_from_step": start,
        "final_loss": round(loss_value, 6),
        "pairs_per_s": round(pairs_done / seconds, 3) if seconds else None,
        "processes": world.size,
        "machine": machine_record(str(model.device), precision),
    }
    if adversary is not None and history:
        summary["final_adversary_accuracy"] = round(history[-1]["adversary_accuracy"], 6)
    return summary


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
        adversarial_weight=float(param(params, "train.adversarial_weight")),
        adversary_lr=float(param(params, "train.adversary_lr")),
        query_noise=tuple(param(params, "train.query_noise")),
        query_noise_rate=float(param(params, "train.query_noise_rate")),
    )


def batches_from_plan(plan: pa.Table, params: dict, config: TrainConfig) -> tuple[list[PlannedBatch], list]:
    """The plan's batches as texts, read from the parallel data on disk, and each row's query noise.
    Shared by the stage and benchmarks/in_process_grid.py."""
    made_by = pairs_stamp(param(params, "data.train"))
    pairs = read_parquet(PAIRS_PATH, PAIRS_SCHEMA, made_by=made_by)
    candidates = read_parquet(PARALLEL_CANDIDATES_PATH, CANDIDATES_SCHEMA, made_by=made_by) if has_negatives(plan) else None
    noise = query_noise_draws(plan.num_rows, [Noise.parse(name) for name in config.query_noise], config.query_noise_rate, config.seed)
    multitask = param(params, "sampler.schedule") == "multitask"
    return plan_texts(plan, pairs, config.query_prefix, config.passage_prefix, candidates, multitask, noise), noise


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
    batches, noise = batches_from_plan(plan, params, config)
    check_model_dir(args.base, "run `dvc repro base_model`")
    if not launched_by_torchrun() and processes > 1:  # one process per rank, on this machine
        sys.exit(relaunch_under_torchrun(processes, "pipeline.train", sys.argv[1:]))
    world = init_world(param(params, "train.rendezvous_timeout_s"))
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    fingerprint = run_fingerprint(
        PLAN_PATH.read_bytes(),
        PAIRS_PATH.read_bytes(),
        PARALLEL_CANDIDATES_PATH.read_bytes() if has_negatives(plan) else b"",
        json.dumps(asdict(config), sort_keys=True).encode(),
        Path(args.base, "model.safetensors").read_bytes() if Path(args.base, "model.safetensors").exists() else b"",
    )
    run = TrainRun(checkpoint=CHECKPOINT_PATH, resume=args.resume, fingerprint=fingerprint, world=world)
    if not world.lead:
        train(load_model(args.base, config.max_length, device), batches, config, run)
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
            summary = train(model, batches, config, run)
        summary["noisy_queries"] = sum(draw is not None for draw in noise)
        model.save(str(model_out))
        write_json(summary, metrics_out)
    CHECKPOINT_PATH.unlink(missing_ok=True)
    world.close()
    print(
        f"wrote {args.out}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['pairs_per_s']} pairs/s in {summary['processes']} process(es) on {describe(summary['machine'])}"
    )


if __name__ == "__main__":
    run_stage(main)
