"""Training throughput: this project's trainer in fp32 and bf16, and against sentence-transformers' own trainer.

Every runner trains the same model on the same (query, passage) pairs — the first batches of
the batch plan — with the same batch size, max length, learning rate and InfoNCE
temperature (MultipleNegativesRankingLoss with scale = 1 / temperature), for the same
number of steps, each in its own subprocess so that peak memory is measured apart.
The runners are interleaved: round 1 runs each of --runners in turn, every later round
the same again (ours, ours-bf16, ours, ours-bf16 by default), so that a busy, shared CPU
slows each alike; the best round of each runner is kept. Prints pairs/s, peak memory and
the ratios to `ours` (fp32; bf16 target >= 1.5x) and to `st`, side by side from one run:

    python benchmarks/train_speed.py [--steps 20] [--batch-size 16] [--rounds 2] [--runners ours,ours-bf16] [--model models/base]

Needs `models/base`, `data/parallel/pairs.parquet` and `data/batches/plan.parquet` (`dvc repro batches`).
Runners: `ours` (token embeddings frozen, fp32: train.precision fp32), `ours-bf16` (the
same under bf16 autocast: train.precision bf16; needs native bf16 units, AVX-512 BF16 or
AMX on CPU, or CUDA), `ours-unfrozen` (every weight trained, fp32, as the
sentence-transformers trainer does), `st` (SentenceTransformerTrainer; bf16 on CUDA).
pairs/s is steps x batch size over the wall time of the training call (first step
included); `step pairs/s` is the trainer's own figure (its summary's pairs_per_s: the
steps' time only), for `ours*` runners.
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

RUNNERS = ("ours", "ours-bf16", "ours-unfrozen", "st")
BF16_TARGET = 1.5  # ours-bf16 / ours pairs/s


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
            freeze_embeddings=runner != "ours-unfrozen",
            precision="bf16" if runner == "ours-bf16" else "fp32",
        )
        started = time.perf_counter()
        summary = train(model, [PlannedBatch(q, p) for q, p in zip(queries, passages)], config)
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
        summary = {"precision": "bf16" if training_args.bf16 else "fp32"}
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
        "precision": summary["precision"],
        "step_pairs_per_s": summary.get("pairs_per_s"),
    }


def runner_list(text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    for r in chosen:
        if r not in RUNNERS:
            raise argparse.ArgumentTypeError(f"{r!r} is not one of {', '.join(RUNNERS)}")
    return list(dict.fromkeys(chosen))


def run_subprocess(runner: str, argv: list[str]) -> dict:
    """One runner in its own process; its JSON result, or exit with the last line of its error."""
    cmd = [sys.executable, __file__, "--runner", runner, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        raise SystemExit(f"train_speed: runner {runner} failed (exit {done.returncode}): {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument(
        "--runners",
        type=runner_list,
        default=["ours", "ours-bf16"],
        help=f"comma-separated, of {', '.join(RUNNERS)} (default: ours,ours-bf16)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="times every runner runs, interleaved; the best round of each is kept")
    parser.add_argument("--runner", choices=RUNNERS, help="run one runner and print its JSON (used internally)")
    args = parser.parse_args()
    if args.runner:
        print(json.dumps(run_one(args.runner, args)))
        return
    if not args.runners or args.rounds < 1:
        parser.error("--runners must not be empty and --rounds must be at least 1")
    forwarded = [
        *("--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size)),
        *("--max-length", str(args.max_length), "--lr", str(args.lr), "--temperature", str(args.temperature)),
    ]
    runs: dict[str, list[dict]] = {runner: [] for runner in args.runners}
    for r in range(args.rounds):
        for runner in args.runners:
            result = run_subprocess(runner, forwarded)
            runs[runner].append(result)
            print(f"  round {r + 1}: {runner:<14}{result['seconds']:>7.1f} s{result['pairs_per_s']:>8.2f} pairs/s", flush=True)
    results = {runner: max(rs, key=lambda x: x["pairs_per_s"]) for runner, rs in runs.items()}
    device = next(iter(results.values()))["device"]
    bases = [b for b in ("ours", "st") if b in results]
    print(
        f"training throughput, {args.steps} steps x {args.batch_size} pairs, max length {args.max_length}, {device}, "
        f"best of {args.rounds} round(s)"
    )
    print(
        f"  {'runner':<15}{'precision':>10}{'seconds':>9}{'pairs/s':>10}{'step pairs/s':>14}{'peak MiB':>10}"
        + "".join(f"{'vs ' + b:>9}" for b in bases)
    )
    for runner, r in results.items():
        step = f"{r['step_pairs_per_s']:>14.2f}" if r["step_pairs_per_s"] else f"{'-':>14}"
        ratios = "".join(f"{r['pairs_per_s'] / results[b]['pairs_per_s']:>8.2f}x" for b in bases)
        print(f"  {runner:<15}{r['precision']:>10}{r['seconds']:>9.1f}{r['pairs_per_s']:>10.2f}{step}{r['peak_mib']:>10.0f}{ratios}")
    print("  runs (pairs/s): " + "; ".join(f"{runner} " + ", ".join(f"{x['pairs_per_s']:.2f}" for x in rs) for runner, rs in runs.items()))
    if "ours" in results and "ours-bf16" in results:
        ratio = results["ours-bf16"]["pairs_per_s"] / results["ours"]["pairs_per_s"]
        verdict = "PASS" if ratio >= BF16_TARGET else "FAIL"
        print(f"  ours-bf16 / ours (fp32): {ratio:.2f}x pairs/s   target >= {BF16_TARGET}x  {verdict}")
    print("  peak: max RSS of the process on CPU, torch.cuda.max_memory_allocated on GPU")


if __name__ == "__main__":
    main()
