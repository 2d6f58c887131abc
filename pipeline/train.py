"""The `train` stage: contrastive fine-tuning of the shared encoder on the batch plan.

InfoNCE with in-batch negatives: each query is scored against every passage of its
planned batch (L2-normalized embeddings, temperature `train.temperature`), so what a
batch holds (monolingual or cross-lingual pairs) is exactly what the model learns to
separate. AdamW, linear warm-up then linear decay. Batches follow the plan in order;
checkpoints (model, optimizer, scheduler, RNG, plan position) are written atomically
every `train.checkpoint_every` steps, and `--resume` continues a killed run from the
last one, ending in the same state as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.batches import PLAN_PATH, PLAN_SCHEMA
from pipeline.common import PipelineError, atomic_path, load_params, param, read_parquet, run_stage, stage_parser, write_json
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
    if not isinstance(config.freeze_embeddings, bool):
        raise PipelineError(f"params.yaml: train.freeze_embeddings: {config.freeze_embeddings!r} is not true/false")
    for name, value, ok, why in rules:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
            raise PipelineError(f"params.yaml: {name}: {value!r} {why if isinstance(value, (int, float)) else 'is not a number'}")


def info_nce_loss(queries: torch.Tensor, passages: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each query over all passages of the batch; its own passage is the target."""
    queries = F.normalize(queries, dim=-1)
    passages = F.normalize(passages, dim=-1)
    logits = queries @ passages.T / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))


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
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
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
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
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
) -> dict:
    """Fine-tune `model` in place on the planned batches; returns the run's summary figures.

    `log(step, metrics)` receives loss, learning rate and throughput after each step;
    `stop_after` ends the run early (after that many steps), as a crash would.
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
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step")
    for step in progress:
        began = time.perf_counter()
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            queries = embed(model, batch_queries[step])
            passages = embed(model, batch_passages[step])
        loss = info_nce_loss(queries.float(), passages.float(), config.temperature)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        elapsed = time.perf_counter() - began
        seconds += elapsed
        pairs_done += len(batch_queries[step])
        metrics = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "pairs_per_s": len(batch_queries[step]) / elapsed}
        progress.set_postfix(loss=f"{loss_value:.3f}", pairs_s=f"{metrics['pairs_per_s']:.1f}")
        if log is not None:
            log(step + 1, metrics)
        if checkpoint and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
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
    }


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
    )
    check_config(config)
    plan = read_parquet(PLAN_PATH, PLAN_SCHEMA)
    pairs = read_parquet(PAIRS_PATH, PAIRS_SCHEMA)
    batch_queries, batch_passages = plan_texts(plan, pairs, config.query_prefix, config.passage_prefix)
    if not Path(args.base, "modules.json").exists():
        raise PipelineError(f"{args.base}: not a sentence-transformers model (run `dvc repro base_model`)")

    from dvclive import Live
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.base, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = config.max_length
    fingerprint = run_fingerprint(
        PLAN_PATH.read_bytes(), PAIRS_PATH.read_bytes(), json.dumps(config.__dict__, sort_keys=True).encode(),
        Path(args.base, "model.safetensors").read_bytes() if Path(args.base, "model.safetensors").exists() else b"",
    )
    with Live(dir=args.live, save_dvc_exp=False, dvcyaml=False, resume=args.resume) as live:
        def log(step: int, metrics: dict) -> None:
            live.step = step
            for name, value in metrics.items():
                live.log_metric(f"train/{name}", value, plot=True)
            live.next_step()

        summary = train(model, batch_queries, batch_passages, config, CHECKPOINT_PATH, args.resume, fingerprint, log)
    with atomic_path(args.out, is_dir=True) as tmp:
        model.save(str(tmp))
    write_json(summary, args.metrics)
    CHECKPOINT_PATH.unlink(missing_ok=True)
    print(
        f"wrote {args.out}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['pairs_per_s']} pairs/s on {summary['device']}"
    )


if __name__ == "__main__":
    run_stage(main)
