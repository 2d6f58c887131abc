"""The `train` stage: contrastive fine-tuning of the shared encoder on the batch plan.

InfoNCE with in-batch negatives (pipeline/training/loss.py): each query is scored against
every passage of its planned batch, so what a batch holds (monolingual or cross-lingual
pairs) is exactly what the model learns to separate. AdamW, linear warm-up then linear
decay. Batches follow the plan in order (pipeline/training/planned.py); checkpoints are
written atomically every HYBRIDIR_CHECKPOINT_EVERY steps (pipeline/training/checkpoint.py),
and `--resume` continues a killed run from the last one, ending in the same state as an
uninterrupted run. The checkpoint is the source of truth for where a run is: it carries the
logged curves too, and the dvclive log is rebuilt from it on resume. The log is an output
like the model: written aside and moved into place with it, so an interrupted run leaves
every output of the stage as it was. Forward passes run under bf16 autocast where
`train.precision` resolves to it (pipeline/machine.py); the loss and softmax stay fp32.

The plan may add to a batch (docs/strategies.md): a hard negative per pair; under
`sampler.schedule: multitask`, two tasks, each with its own InfoNCE over its own rows.
`train.adversarial_weight` adds the language adversary (pipeline/training/adversary.py);
`train.query_noise` perturbs a seeded share of the queries. N processes on
torch.distributed (HYBRIDIR_PROCESSES, pipeline/training/distributed.py) train on exactly
the plan's batches.

`train.eval_every` scores the dev split (`data/dev`, as `evaluate --dataset dev` does, with
pipeline/scoring/tasks.py) every so many steps and after the last, logged as `dev/mono_map`,
`dev/cross_map` and `dev/multi_map` beside the loss; rank 0 scores while the other ranks wait.
`train.keep_best` then keeps the weights of the dev step best by that figure.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.common import PipelineError, atomic_outputs, progress, read_parquet, run_stage, stage_parser, write_json
from pipeline.contracts import (
    BASE_MODEL_DIR,
    CANDIDATES_SCHEMA,
    HEADLINE_FIGURES,
    PAIRS_PATH,
    PAIRS_SCHEMA,
    PARALLEL_CANDIDATES_PATH,
    PLAN_PATH,
    PLAN_SCHEMA,
    Noise,
    pairs_stamp,
)
from pipeline.machine import describe, machine_record, resolve_precision
from pipeline.params import Params, TrainParams, as_dict, execution, load_params, plan_made_by
from pipeline.scoring.encoding import check_model_dir, load_model
from pipeline.scoring.tasks import DEV_DATASET, evaluate_task, prepare_task, read_source_tables
from pipeline.training.adversary import make_adversary
from pipeline.training.checkpoint import check_ranks_agree, load_checkpoint, run_fingerprint, save_checkpoint
from pipeline.training.distributed import World, check_scale_out, init_world, launched_by_torchrun, relaunch_under_torchrun
from pipeline.training.loss import contrastive_step
from pipeline.training.planned import PlannedBatch, has_negatives, plan_texts, query_noise_draws

log = logging.getLogger(__name__)

CHECKPOINT_PATH = Path("models/checkpoints/train.pt")
DEV_PREFIX = "dev/"  # the dev figures' names in the history and the live log (the rest are logged as train/<name>)


@dataclass
class TrainRun:
    """How one call of `train` runs: checkpointing, resumption, logging and the process group."""

    checkpoint: Path | None = None
    resume: bool = False
    fingerprint: str = ""  # what the checkpoint must have been made from to be resumed
    log: Callable[[int, dict], None] | None = None  # (step, metrics) after each step, rank 0 only
    stop_after: int | None = None  # end after this many steps, as a crash would (tests)
    world: World = field(default_factory=World)
    checkpoint_every: int = 50  # steps between checkpoints (HYBRIDIR_CHECKPOINT_EVERY)
    dev: Callable[[torch.nn.Module, bool], dict[str, float]] | None = None  # (model, bf16) -> dev figures (train.eval_every)


def freeze_token_embeddings(model: torch.nn.Module) -> int:
    """Freeze the token embedding table; returns how many weights that takes out of training.

    XLM-R's table (250k x 384, 80% of e5-small) would otherwise get a dense gradient and
    AdamW state every step, and weight decay would drift the rows of every token never seen
    in training, such as the languages the retriever is only evaluated on.
    """
    embeddings = model[0].auto_model.get_input_embeddings()
    embeddings.weight.requires_grad_(False)
    return embeddings.weight.numel()


def make_optimizer(model: torch.nn.Module, config: TrainParams, steps: int, adversary: torch.nn.Module | None = None):
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


def check_finite(loss: float, step: int, config: TrainParams) -> None:
    """Stop at the first non-finite loss: a diverged run must not write a NaN model."""
    if not math.isfinite(loss):
        raise PipelineError(
            f"train: loss is {loss} at step {step}: training diverged (train.lr {config.lr:g}, "
            f"train.temperature {config.temperature:g}); no model was written"
        )


def dev_due(step: int, steps: int, every: int) -> bool:
    """Whether the dev split is scored after `step` (counted from 1): every `every` steps, and after the last."""
    return every > 0 and (step % every == 0 or step == steps)


def dev_figures(model, run: TrainRun, bf16: bool) -> dict[str, float]:
    """The dev figures of the model as it is now, named dev/<figure>: rank 0 scores, the others wait
    for it (and get {}), so the ranks' collectives stay paired."""
    figures = {}
    if run.world.lead:
        figures = {DEV_PREFIX + name: value for name, value in run.dev(model, bf16).items()}
        model.train()  # encoding leaves the model in eval mode
    run.world.barrier()
    return figures


def kept_best(best: dict | None, step: int, value: float, model) -> dict | None:
    """The best dev step so far by `train.keep_best`'s figure ({step, value, weights}; the first of equals
    stays), its weights copied to the CPU so that keeping them costs no accelerator memory."""
    if best is not None and not value > best["value"]:
        return best
    return {"step": step, "value": value, "weights": {name: w.detach().to("cpu", copy=True) for name, w in model.state_dict().items()}}


def train(model, batches: list[PlannedBatch], config: TrainParams, seed: int, run: TrainRun | None = None) -> dict:
    """Fine-tune `model` in place on the planned batches with the recipe `config`; returns the run's summary figures.

    Only rank 0 logs and writes checkpoints; every rank resumes from them, and all ranks must
    start from the same step of the same inputs (`check_ranks_agree`). On resume the
    curves logged before the checkpoint, dev figures included, are passed to `run.log`
    again, so a log opened fresh holds the whole run, with no step twice.
    """
    run = run or TrainRun()
    if config.eval_every and run.dev is None:
        raise ValueError("train.eval_every > 0 needs TrainRun.dev, which scores the dev split")
    world = run.world
    torch.manual_seed(seed)
    steps = len(batches)
    if config.freeze_embeddings:
        freeze_token_embeddings(model)
    adversary = make_adversary(model, batches, config)
    optimizer, scheduler = make_optimizer(model, config, steps, adversary)
    start, history, best = (0, [], None)
    if run.checkpoint:
        if run.resume:
            start, history, best = load_checkpoint(run.checkpoint, model, optimizer, scheduler, run.fingerprint, adversary)
        check_ranks_agree(world, run.checkpoint, start, run.fingerprint)
    precision = resolve_precision(config.precision, model.device.type, "train.precision")
    bf16 = precision == "bf16"
    log_step = run.log if world.lead else None
    for row in history if log_step else []:
        log_step(row["step"], {k: v for k, v in row.items() if k != "step"})
    model.train()
    loss_value, pairs_done, seconds, figures = float("nan"), 0, 0.0, {}
    bar = progress(range(start, steps), total=steps, desc="train", unit="step", initial=start, disable=not world.lead)
    for step in bar:
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
        if dev_due(step + 1, steps, config.eval_every):
            metrics |= dev_figures(model, run, bf16)
            if config.keep_best and world.lead:
                best = kept_best(best, step + 1, metrics[DEV_PREFIX + config.keep_best], model)
        history.append({"step": step + 1, **metrics})
        bar.set_postfix(loss=f"{loss_value:.3f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
        if log_step is not None:
            log_step(step + 1, metrics)
        if run.checkpoint and world.lead and ((step + 1) % run.checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(run.checkpoint, step + 1, model, optimizer, scheduler, run.fingerprint, history, adversary, best)
        if run.stop_after is not None and step + 1 - start >= run.stop_after:
            break
    model.eval()
    summary = {
        "steps": steps,
        "resumed_from_step": start,
        "final_loss": round(loss_value, 6),
        "pairs_per_s": round(pairs_done / seconds, 3) if seconds else None,
        "train_seconds": round(seconds, 1),  # of the steps this run took (from resumed_from_step on)
        "processes": world.size,
        "machine": machine_record(str(model.device), precision),
    }
    if adversary is not None and history:
        summary["final_adversary_accuracy"] = round(history[-1]["adversary_accuracy"], 6)
    if best is not None:
        model.load_state_dict(best["weights"])
        summary |= {"kept_step": best["step"], f"kept_dev_{config.keep_best}": round(best["value"], 6)}
    return summary


def batches_from_plan(plan: pa.Table, params: Params) -> tuple[list[PlannedBatch], list]:
    """The plan's batches as texts, read from the parallel data on disk, and each row's query noise.
    Shared by the stage and benchmarks/in_process_grid.py."""
    made_by = pairs_stamp(params.data.train, params.data.dev_share)
    pairs = read_parquet(PAIRS_PATH, PAIRS_SCHEMA, made_by=made_by)
    candidates = read_parquet(PARALLEL_CANDIDATES_PATH, CANDIDATES_SCHEMA, made_by=made_by) if has_negatives(plan) else None
    recipe = params.train
    noise = query_noise_draws(plan.num_rows, [Noise.parse(name) for name in recipe.query_noise], recipe.query_noise_rate, params.seed)
    multitask = params.sampler.schedule == "multitask"
    prefixes = (params.model.query_prefix, params.model.passage_prefix)
    return plan_texts(plan, pairs, *prefixes, candidates, multitask, noise), noise


def dev_scorer(params: Params, batch_size: int) -> Callable[[torch.nn.Module, bool], dict[str, float]] | None:
    """What scores the dev split during training, its tables read and checked now, before any model loads;
    None when train.eval_every is 0. The figures are those `evaluate --dataset dev` reports."""
    if not params.train.eval_every:
        return None
    questions, candidates, folder = read_source_tables(DEV_DATASET, params.data)
    task = prepare_task(questions, candidates, None, DEV_DATASET, str(folder))
    prefixes = (params.model.query_prefix, params.model.passage_prefix)

    def score(model, bf16: bool) -> dict[str, float]:
        summary = evaluate_task(model, task, prefixes, batch_size, bf16).summary
        return {name: summary[name] for name in HEADLINE_FIGURES}

    return score


def run_fingerprint_of(plan: pa.Table, params: Params, base: str) -> str:
    """What a checkpoint must have been made from to be resumed: the plan, the data, the recipe and the base weights."""
    weights = Path(base, "model.safetensors")
    recipe = {"train": as_dict(params.train), "model": as_dict(params.model), "seed": params.seed}
    return run_fingerprint(
        PLAN_PATH.read_bytes(),
        PAIRS_PATH.read_bytes(),
        PARALLEL_CANDIDATES_PATH.read_bytes() if has_negatives(plan) else b"",
        json.dumps(recipe, sort_keys=True).encode(),
        weights.read_bytes() if weights.exists() else b"",
    )


def main() -> None:
    parser = stage_parser(
        __doc__, base=str(BASE_MODEL_DIR), out="models/retriever", metrics="metrics/train.json", live="metrics/train_live"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this run")
    args = parser.parse_args()
    params = load_params(args.params)
    settings = execution()
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else settings.processes
    check_scale_out(world_size, params.sampler.batch_size, params.train.chunk_size)
    plan = read_parquet(PLAN_PATH, PLAN_SCHEMA, made_by=plan_made_by(params))
    batches, noise = batches_from_plan(plan, params)
    dev = dev_scorer(params, settings.eval_batch_size)
    check_model_dir(args.base, "run `dvc repro base_model`")
    if not launched_by_torchrun() and settings.processes > 1:  # one process per rank, on this machine
        sys.exit(relaunch_under_torchrun(settings.processes, "pipeline.train", sys.argv[1:]))
    world = init_world(settings.rendezvous_timeout_s)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    fingerprint = run_fingerprint_of(plan, params, args.base)
    run = TrainRun(CHECKPOINT_PATH, args.resume, fingerprint, world=world, checkpoint_every=settings.checkpoint_every, dev=dev)
    max_length = params.model.max_length
    if not world.lead:
        train(load_model(args.base, max_length, device), batches, params.train, params.seed, run)
        world.close()
        return
    from dvclive import Live

    with atomic_outputs(args.out, args.metrics, args.live) as (model_out, metrics_out, live_out):
        model = load_model(args.base, max_length, device)
        # A fresh log beside the old one, refilled from the checkpoint's history on resume, and
        # moved into place with the model: an interrupted run leaves the previous curves as they were.
        with Live(dir=str(live_out), save_dvc_exp=False, dvcyaml=False, resume=False) as live:

            def log_step(step: int, metrics: dict) -> None:
                live.step = step
                for name, value in metrics.items():
                    live.log_metric(name if name.startswith(DEV_PREFIX) else f"train/{name}", value, plot=True)
                live.next_step()

            run.log = log_step
            summary = train(model, batches, params.train, params.seed, run)
        summary["noisy_queries"] = sum(draw is not None for draw in noise)
        model.save(str(model_out))
        write_json(summary, metrics_out)
    CHECKPOINT_PATH.unlink(missing_ok=True)
    world.close()
    kept = params.train.keep_best
    log.info(
        f"wrote {args.out}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['pairs_per_s']} pairs/s in {summary['processes']} process(es) on {describe(summary['machine'])}"
        + (f"; the weights of step {summary['kept_step']}, best by dev {kept} ({summary[f'kept_dev_{kept}']:.4f})" if kept else "")
    )


if __name__ == "__main__":
    run_stage(main)
