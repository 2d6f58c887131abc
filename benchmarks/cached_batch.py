"""Cached-gradient batches (`train.chunk_size`): peak memory and pairs/s against plain batches.

One optimizer step of this project's trainer, each configuration in its own process
(after a warm-up step of a few pairs), on the batch plan's pairs:

  plain-B     a plain batch of --batch-size pairs (default 1024)
  cached-B/C  the same batch with cached gradients, --chunk-size pairs per pass (64)
  plain-C     a plain batch of --chunk-size pairs: the chunk of the big batch whose
              passages are longest, the one that sets the cached run's peak

Targets (issue #6): cached-B/C peaks within 1.3x of plain-C, and its pairs/s is at most
35% below plain-B. Peak memory is max RSS on CPU (also shown above the RSS after
loading the model, i.e. what training adds), torch.cuda.max_memory_allocated on GPU.

    python benchmarks/cached_batch.py [--batch-size 1024] [--chunk-size 64] [--model models/base]

Needs `models/base` and the files of `dvc repro batches`; the pairs are the plan's first
--batch-size pairs, as the train stage reads them (params.yaml's max length and prefixes).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import describe, machine_record, plan_pairs  # noqa: E402  (the same pairs as the throughput benchmark)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worst_chunk(queries: list[str], passages: list[str], chunk_size: int, tokenizer) -> tuple[list[str], list[str]]:
    """The chunk_size pairs of the batch, in chunk order, whose longest passage is longest."""
    lengths = [len(ids) for ids in tokenizer(passages)["input_ids"]]
    starts = range(0, len(passages), chunk_size)
    start = max(starts, key=lambda i: max(lengths[i : i + chunk_size]))
    return queries[start : start + chunk_size], passages[start : start + chunk_size]


def run_one(batch_size: int, chunk_size: int | None, args, chunk_of: int | None = None) -> dict:
    from sentence_transformers import SentenceTransformer

    from pipeline.train import train
    from pipeline.training.planned import PlannedBatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    queries, passages, params = plan_pairs(args.params, chunk_of or batch_size)
    config = replace(params.train, chunk_size=chunk_size, precision="fp32", warmup_ratio=0.0, adversarial_weight=0.0)
    model = SentenceTransformer(args.model, device=device)
    model.max_seq_length = params.model.max_length
    if chunk_of:  # a plain batch of `batch_size` pairs cut from the big batch
        queries, passages = worst_chunk(queries, passages, batch_size, model.tokenizer)
    warm = min(8, chunk_size or batch_size)
    train(model, [PlannedBatch(queries[:warm], passages[:warm])], replace(config, chunk_size=None), params.seed)
    loaded = peak_bytes(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    started = time.perf_counter()
    train(model, [PlannedBatch(queries, passages)], config, params.seed)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = peak_bytes(device)
    return {"device": device, "seconds": seconds, "pairs_per_s": batch_size / seconds,
            "peak_mib": peak / 2**20, "added_mib": (peak - loaded) / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--one", help="run one configuration, 'BATCH', 'BATCH/CHUNK' or 'CHUNK@BATCH', and print its JSON (internal)")
    args = parser.parse_args()
    if args.one:
        if "@" in args.one:
            chunk, _, of = args.one.partition("@")
            print(json.dumps(run_one(int(chunk), None, args, chunk_of=int(of))))
        else:
            batch, _, chunk = args.one.partition("/")
            print(json.dumps(run_one(int(batch), int(chunk) if chunk else None, args)))
        return
    b, c = args.batch_size, args.chunk_size
    configs = {f"plain-{b}": f"{b}", f"cached-{b}/{c}": f"{b}/{c}", f"plain-{c}": f"{c}@{b}"}
    results = {}
    for name, spec in configs.items():
        cmd = [sys.executable, __file__, "--one", spec, "--model", args.model, "--params", args.params]
        results[name] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    plain_b, cached, plain_c = results.values()
    print(f"machine: {describe(machine_record(cached['device'], 'fp32'))}")
    print("one optimizer step of the plan's first pairs, fp32")
    print(f"  {'config':<18}{'seconds':>9}{'pairs/s':>10}{'peak MiB':>10}{'added MiB':>11}")
    for name, r in results.items():
        print(f"  {name:<18}{r['seconds']:>9.1f}{r['pairs_per_s']:>10.1f}{r['peak_mib']:>10.0f}{r['added_mib']:>11.0f}")
    print(
        f"  cached-{b}/{c} peak / plain-{c} peak: {cached['peak_mib'] / plain_c['peak_mib']:.2f}x (target <= 1.3x); "
        f"added by training: {cached['added_mib'] / max(plain_c['added_mib'], 1):.2f}x"
    )
    print(f"  cached-{b}/{c} peak / plain-{b} peak: {cached['peak_mib'] / plain_b['peak_mib']:.2f}x")
    print(f"  throughput cost of caching: {1 - cached['pairs_per_s'] / plain_b['pairs_per_s']:.1%} (target <= 35%)")


if __name__ == "__main__":
    main()
