"""Training throughput: this project's trainer against sentence-transformers' own trainer.

Both train the same model on the same (query, passage) pairs — the first batches of
the batch plan — with the same batch size, max length, learning rate and InfoNCE
temperature (MultipleNegativesRankingLoss with scale = 1 / temperature), for the same
number of steps, each in its own subprocess so that peak memory is measured apart.
Prints pairs/s, peak memory and the ratios, side by side from one run:

    python benchmarks/train_speed.py [--steps 20] [--batch-size 16] [--model models/base]

Needs `data/parallel/pairs.parquet` and `data/batches/plan.parquet` (`dvc repro batches`).
Runners: `ours` (default: token embeddings frozen), `ours-unfrozen` (every weight trained,
as the sentence-transformers trainer does), `st` (SentenceTransformerTrainer).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import pyarrow.parquet as pq
import torch

RUNNERS = ("ours", "ours-unfrozen", "st")


def batches_of_plan(batch_size: int, steps: int, max_length: int):
    """The plan's first `steps` batches, re-cut to `batch_size` pairs, as (queries, passages) lists."""
    from pipeline.train import plan_texts

    plan = pq.read_table("data/batches/plan.parquet")
    pairs = pq.read_table("data/parallel/pairs.parquet")
    batches = plan_texts(plan, pairs, "query: ", "passage: ")
    flat_q = [t for batch in batches for t in batch.queries]
    flat_p = [t for batch in batches for t in batch.passages]
    need = batch_size * steps
    if len(flat_q) < need:
        raise SystemExit(f"the plan has {len(flat_q)} pairs, fewer than {need}; lower --steps or --batch-size")
    return (
        [flat_q[i : i + batch_size] for i in range(0, need, batch_size)],
        [flat_p[i : i + batch_size] for i in range(0, need, batch_size)],
    )


def run_one(runner: str, args) -> dict:
    from sentence_transformers import SentenceTransformer

    from pipeline.train import PlannedBatch, TrainConfig, train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(args.model, device=device)
    model.max_seq_length = args.max_length
    queries, passages = batches_of_plan(args.batch_size, args.steps, args.max_length)
    if runner.startswith("ours"):
        config = TrainConfig(
            lr=args.lr,
            temperature=args.temperature,
            warmup_ratio=0.1,
            weight_decay=0.01,
            max_length=args.max_length,
            query_prefix="",
            passage_prefix="",
            checkpoint_every=10**9,
            seed=0,
            freeze_embeddings=runner == "ours",
        )
        started = time.perf_counter()
        train(model, [PlannedBatch(q, p) for q, p in zip(queries, passages)], config)
    else:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        data = Dataset.from_dict({"anchor": sum(queries, []), "positive": sum(passages, [])})
        training_args = SentenceTransformerTrainingArguments(
            output_dir="/tmp/hybridir-st-bench",
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.lr,
            warmup_ratio=0.1,
            weight_decay=0.01,
            bf16=device == "cuda",
            save_strategy="no",
            report_to="none",
            logging_steps=10**9,
            dataloader_drop_last=True,
            seed=0,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=training_args,
            train_dataset=data,
            loss=MultipleNegativesRankingLoss(model, scale=1 / args.temperature),
        )
        started = time.perf_counter()
        trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "runner": runner,
        "device": device,
        "seconds": seconds,
        "pairs_per_s": args.steps * args.batch_size / seconds,
        "peak_mib": peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--runner", choices=RUNNERS, help="run one runner and print its JSON (used internally)")
    args = parser.parse_args()
    if args.runner:
        print(json.dumps(run_one(args.runner, args)))
        return
    results = {}
    for runner in RUNNERS:
        cmd = [sys.executable, __file__, "--runner", runner] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[runner] = json.loads(out.strip().splitlines()[-1])
    device = results["st"]["device"]
    print(f"training throughput, {args.steps} steps x {args.batch_size} pairs, max length {args.max_length}, {device}")
    print(f"  {'runner':<15}{'seconds':>9}{'pairs/s':>10}{'peak MiB':>10}{'vs st':>8}")
    for runner, r in results.items():
        ratio = r["pairs_per_s"] / results["st"]["pairs_per_s"]
        print(f"  {runner:<15}{r['seconds']:>9.1f}{r['pairs_per_s']:>10.1f}{r['peak_mib']:>10.0f}{ratio:>7.2f}x")
    print("  peak: max RSS of the process on CPU, torch.cuda.max_memory_allocated on GPU")


if __name__ == "__main__":
    main()
