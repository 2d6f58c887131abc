"""Training throughput: this project's trainer in fp32 and bf16, what `precision: auto` picks, and sentence-transformers' trainer.

Every runner trains the same model on the same planned batches — the first --steps batches
of data/batches/plan.parquet, as the `train` stage reads them (`train.batches_from_plan`:
hard negatives included where the plan has them) — with params.yaml's learning rate,
temperature and max length, each in its own subprocess so that peak memory is measured
apart. The runners are interleaved: round 1 runs each of --runners in turn, every later
round the same again, so that a busy, shared CPU slows each alike; the best round of each
runner is kept. Prints the machine (CPU model, cores, AVX-512 BF16 / AMX units), pairs/s,
peak memory, the ratios to `ours` (fp32; bf16 target >= 1.5x where bf16 is native) and to
`st`, and which precision `auto` resolves to here and whether that is the faster of the two
measured (within 5%), side by side from one run:

    python benchmarks/train_speed.py [--steps 20] [--rounds 2] [--runners ours,ours-bf16] [--model models/base]

Needs `models/base` and the files of `dvc repro batches` (data/parallel/, data/batches/plan.parquet).
Runners: `ours` (token embeddings frozen, fp32), `ours-bf16` (the same under bf16 autocast;
emulated, with a warning, where the CPU has no AVX-512 BF16 or AMX units), `ours-unfrozen`
(every weight trained, fp32, as the sentence-transformers trainer does), `st`
(SentenceTransformerTrainer with MultipleNegativesRankingLoss; bf16 on CUDA). With `st`
among the runners, every runner trains without the hard negatives, so all see the same pairs.
pairs/s is steps x pairs per batch over the wall time of the training call (first step
included); `step pairs/s` is the trainer's own figure (its summary's pairs_per_s: the
steps' time only), for `ours*` runners.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import train  # noqa: E402
from pipeline.common import read_parquet  # noqa: E402
from pipeline.contracts import PLAN_PATH, PLAN_SCHEMA  # noqa: E402
from pipeline.machine import describe, machine_record, resolve_precision  # noqa: E402
from pipeline.params import Params, load_params  # noqa: E402
from pipeline.training.planned import PlannedBatch  # noqa: E402

RUNNERS = ("ours", "ours-bf16", "ours-unfrozen", "st")
BF16_TARGET = 1.5  # ours-bf16 / ours pairs/s, where bf16 is native
AUTO_TOLERANCE = 0.05  # auto may be at most 5% slower than the faster of fp32 and bf16


def plan_as_trained(params_path: str) -> tuple[list[PlannedBatch], Params]:
    """Every batch of the plan as the train stage reads it, and the params."""
    params = load_params(params_path)
    batches, _ = train.batches_from_plan(read_parquet(PLAN_PATH, PLAN_SCHEMA), params)
    return batches, params


def planned_batches(params_path: str, steps: int) -> tuple[list[PlannedBatch], Params]:
    """The plan's first `steps` batches."""
    batches, params = plan_as_trained(params_path)
    if len(batches) < steps:
        raise SystemExit(f"the plan has {len(batches)} batches, fewer than --steps {steps}")
    return batches[:steps], params


def plan_pairs(params_path: str, pairs: int) -> tuple[list[str], list[str], Params]:
    """The first `pairs` (query, passage) pairs of the plan, in plan order, to cut batches of any size from."""
    batches, params = plan_as_trained(params_path)
    queries = [q for batch in batches for q in batch.queries]
    if len(queries) < pairs:
        raise SystemExit(f"the plan has {len(queries)} pairs, fewer than {pairs}")
    return queries[:pairs], [p for batch in batches for p in batch.passages][:pairs], params


def run_one(runner: str, args) -> dict:
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches, params = planned_batches(args.params, args.steps)
    config = params.train
    if args.no_negatives:
        batches = [PlannedBatch(b.queries, b.passages, query_langs=b.query_langs, passage_langs=b.passage_langs) for b in batches]
    model = SentenceTransformer(args.model, device=device)
    model.max_seq_length = params.model.max_length
    pairs = sum(len(b.queries) for b in batches)
    if runner.startswith("ours"):
        config = dataclasses.replace(
            config, freeze_embeddings=runner != "ours-unfrozen", precision="bf16" if runner == "ours-bf16" else "fp32"
        )
        started = time.perf_counter()
        summary = train.train(model, batches, config, params.seed)
        precision = summary["machine"]["precision"]
    else:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        data = Dataset.from_dict({"anchor": [q for b in batches for q in b.queries], "positive": [p for b in batches for p in b.passages]})
        training_args = SentenceTransformerTrainingArguments(
            output_dir="/tmp/hybridir-st-bench",
            per_device_train_batch_size=len(batches[0].queries),
            max_steps=args.steps,
            learning_rate=config.lr,
            warmup_ratio=config.warmup_ratio,
            weight_decay=config.weight_decay,
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
            loss=MultipleNegativesRankingLoss(model, scale=1 / config.temperature),
        )
        started = time.perf_counter()
        trainer.train()
        summary, precision = {}, "bf16" if training_args.bf16 else "fp32"
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "runner": runner,
        "device": device,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "peak_mib": peak / 2**20,
        "precision": precision,
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
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--runners",
        type=runner_list,
        default=["ours", "ours-bf16"],
        help=f"comma-separated, of {', '.join(RUNNERS)} (default: ours,ours-bf16)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="times every runner runs, interleaved; the best round of each is kept")
    parser.add_argument("--runner", choices=RUNNERS, help="run one runner and print its JSON (used internally)")
    parser.add_argument("--no-negatives", action="store_true", help="train without the plan's hard negatives (implied by `st`)")
    args = parser.parse_args()
    if args.runner:
        print(json.dumps(run_one(args.runner, args)))
        return
    if not args.runners or args.rounds < 1 or args.steps < 1:
        parser.error("--runners must not be empty and --rounds and --steps must be at least 1")
    forwarded = ["--model", args.model, "--params", args.params, "--steps", str(args.steps)]
    if args.no_negatives or "st" in args.runners:
        forwarded.append("--no-negatives")
    runs: dict[str, list[dict]] = {runner: [] for runner in args.runners}
    for r in range(args.rounds):
        for runner in args.runners:
            result = run_subprocess(runner, forwarded)
            runs[runner].append(result)
            print(f"  round {r + 1}: {runner:<14}{result['seconds']:>7.1f} s{result['pairs_per_s']:>8.2f} pairs/s", flush=True)
    results = {runner: max(rs, key=lambda x: x["pairs_per_s"]) for runner, rs in runs.items()}
    device = next(iter(results.values()))["device"]
    auto = resolve_precision("auto", device, "auto")
    bases = [b for b in ("ours", "st") if b in results]
    print(f"machine: {describe(machine_record(device, f'auto = {auto}'))}")
    negatives = "without hard negatives" if "--no-negatives" in forwarded else "with the plan's hard negatives"
    print(f"training throughput, the plan's first {args.steps} batches {negatives}, best of {args.rounds} round(s)")
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
        speed = {"fp32": results["ours"]["pairs_per_s"], "bf16": results["ours-bf16"]["pairs_per_s"]}
        ratio = speed["bf16"] / speed["fp32"]
        target = f"target >= {BF16_TARGET}x  {'PASS' if ratio >= BF16_TARGET else 'FAIL'}" if auto == "bf16" else "(bf16 emulated here)"
        print(f"  ours-bf16 / ours (fp32): {ratio:.2f}x pairs/s   {target}")
        fastest = max(speed, key=speed.get)
        ok = speed[auto] >= (1 - AUTO_TOLERANCE) * speed[fastest]
        print(
            f"  auto -> {auto}: {speed[auto]:.2f} pairs/s, the faster is {fastest} ({speed[fastest]:.2f}); "
            f"auto within {AUTO_TOLERANCE:.0%} of it: {'PASS' if ok else 'FAIL'}"
        )
    print("  peak: max RSS of the process on CPU, torch.cuda.max_memory_allocated on GPU")


if __name__ == "__main__":
    main()
