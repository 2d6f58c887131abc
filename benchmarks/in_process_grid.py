"""A hyper-parameter grid in one process, without DVC: for a machine that has a GPU but no dvc
(the lent GPU machines have torch and sentence-transformers only, docs/results/grid.md).

Each config is params.yaml with some params set. For each, the stages' own functions plan the
batches (batches.plan_from_params), train a fresh copy of the base model (train.train) and
score the dev split of the training source (`dev.*` columns, where data.dev_share > 0: choose
on these) and the evaluation datasets (the test sets: report these) with evaluate.evaluate_task; one CSV row (the config's name and
params, the headline figures per dataset, seconds) is appended as soon as a config ends, so a
killed grid resumes where it stopped and a time-limited one keeps what it finished. Nothing is
written under data/, models/ or metrics/. Its figures are exploratory: finalists are rerun with
`dvc exp run` and compared over seeds with `python -m pipeline.analysis.compare`.

Run from the repository root, with data/parallel/, data/dev/ and data/raw/<dataset>/ made by `dvc repro batches`:
    python benchmarks/in_process_grid.py GRID.yaml --out grid.csv [--queries grid_queries] [--base models/base] [--eval-batch-size 256]

With --queries, each config's per-query results go to grid_queries/<name>/<dataset>.parquet, and
`python -m pipeline.analysis.compare LABEL=workspace:grid_queries/<name> ... --dataset dev` compares
configs with seed-aware intervals, runs of one label being its seeds.

GRID.yaml is a list of `{name: NAME, set: {dotted.param: value, ...}}`; every config is checked
against the params schema before the first one trains.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.analysis.runs import flatten  # noqa: E402
from pipeline.batches import plan_from_params  # noqa: E402
from pipeline.common import PipelineError, run_stage, write_parquet  # noqa: E402
from pipeline.evaluate import DEV_DATASET, evaluate_task, prepare_task, queries_table, read_source_tables  # noqa: E402
from pipeline.machine import describe, machine_record, resolve_precision  # noqa: E402
from pipeline.params import Params, build, execution, read_params  # noqa: E402
from pipeline.scoring.encoding import load_model  # noqa: E402
from pipeline.train import TrainRun, batches_from_plan, dev_scorer, train  # noqa: E402

FIGURES = ("mono_map", "cross_map", "multi_map", "rank_distance", "language_preference")
# Recorded on every row whether a config sets them or not, so CSVs of several grids line up
# (`python -m pipeline.analysis.grid --csv A.csv B.csv`); any other param a config sets is added.
SEARCHED = (
    "seed",
    "sampler.ratio",
    "sampler.schedule",
    "sampler.negatives",
    "sampler.steps",
    "sampler.batch_size",
    "train.lr",
    "train.temperature",
    "train.warmup_ratio",
    "train.freeze_embeddings",
)


def with_overrides(params: dict, overrides: dict, origin: str) -> tuple[dict, Params]:
    """A copy of the params file's mapping with each `dotted.name: value` of `overrides` set, and it checked."""
    result = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *groups, leaf = dotted.split(".")
        node = result
        for group in groups:
            if not isinstance(node.get(group), dict):
                raise PipelineError(f"{origin}: '{dotted}' is not a parameter")
            node = node[group]
        if leaf not in node:
            raise PipelineError(f"{origin}: '{dotted}' is not a parameter")
        node[leaf] = value
    return result, build(result, origin=origin)


def read_grid(path: Path, params: dict) -> list[tuple[str, dict, dict, Params]]:
    """(name, its overrides, every param by dotted name, its Params) per config, every one checked before any work."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        entries = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except (OSError, YAMLError) as err:
        raise PipelineError(f"{path}: cannot read the grid ({str(err).splitlines()[0]})") from None
    if not isinstance(entries, list) or not entries:
        raise PipelineError(f"{path}: expected a non-empty list of {{name, set}} entries")
    configs, names = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("set", {}), dict):
            raise PipelineError(f"{path}: entry {i + 1}: expected {{name: str, set: {{param: value}}}}")
        if entry["name"] in names:
            raise PipelineError(f"{path}: entry {i + 1}: name '{entry['name']}' used twice")
        names.add(entry["name"])
        overrides = entry.get("set", {})
        raw, checked = with_overrides(params, overrides, f"{path}: {entry['name']}")
        configs.append((entry["name"], overrides, flatten(raw), checked))
    return configs


def finished(out: Path) -> set[str]:
    if not out.exists():
        return set()
    with out.open(newline="", encoding="utf-8") as f:
        return {row["name"] for row in csv.DictReader(f)}


def append_row(out: Path, row: dict) -> None:
    """One config's row; a CSV begun by another grid (other columns) is refused, not mixed."""
    header = None
    if out.exists() and out.stat().st_size:
        with out.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header != list(row):
            raise PipelineError(f"{out}: its columns are another grid's; write to a new --out")
    with out.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if header is None:
            writer.writeheader()
        writer.writerow(row)


def run_config(params: Params, base: str, tasks: dict, eval_batch_size: int, device: str, queries: Path | None = None) -> dict:
    """Plan, train a fresh base model and score every task: the config's figures and seconds; with `queries`,
    each task's per-query results too (`<queries>/<dataset>.parquet`, as `evaluate` writes them)."""
    started = time.perf_counter()
    plan, plan_figures, _ = plan_from_params(params)
    batches, _ = batches_from_plan(plan, params)
    model = load_model(base, params.model.max_length, device)
    summary = train(model, batches, params.train, params.seed, TrainRun(dev=dev_scorer(params, eval_batch_size)))  # a config may keep_best
    trained = time.perf_counter()
    prefixes = (params.model.query_prefix, params.model.passage_prefix)
    bf16 = resolve_precision(params.evaluate.precision, model.device.type, "evaluate.precision") == "bf16"
    row = {"final_loss": summary["final_loss"], "negatives_planned": plan_figures.get("negatives.planned", 0)}
    for name, task in tasks.items():
        result = evaluate_task(model, task, prefixes, eval_batch_size, bf16)
        row |= {f"{name}.{figure}": result.summary[figure] for figure in FIGURES}
        if queries is not None:
            write_parquet(queries_table(result.scores), queries / f"{name}.parquet", made_by={"dataset": name})
    row |= {"train_s": round(trained - started, 1), "eval_s": round(time.perf_counter() - trained, 1)}
    row["machine"] = describe(summary["machine"])  # what train_s and eval_s were measured on
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="CSV, appended to one row per config")
    parser.add_argument(
        "--queries", type=Path, help="also write each config's per-query results to QUERIES/<name>/<dataset>.parquet (for compare)"
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--eval-batch-size", type=int, help="default: HYBRIDIR_EVAL_BATCH_SIZE, else 16")
    args = parser.parse_args()
    configs = read_grid(args.grid, read_params(args.params))
    done = finished(args.out)
    todo = [config for config in configs if config[0] not in done]
    evaluated = {(p.evaluate.datasets, p.evaluate.langs or (), p.data.train, p.data.dev_share) for *_, p in configs}
    if len(evaluated) != 1:
        raise PipelineError(f"{args.grid}: every config must set the same evaluate.datasets, evaluate.langs, data.train and data.dev_share")
    datasets, langs, _, dev_share = evaluated.pop()
    data = configs[0][3].data
    tasks = {}
    for name in ([DEV_DATASET] if dev_share else []) + list(datasets):  # the dev split to choose on, the test sets to report
        questions, candidates, folder = read_source_tables(name, data)
        tasks[name] = prepare_task(questions, candidates, None if name == DEV_DATASET else list(langs) or None, name, str(folder))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eval_batch_size = args.eval_batch_size or execution().eval_batch_size
    print(f"grid {args.grid}: {len(configs)} configs, {len(done & {c[0] for c in configs})} already in {args.out}", flush=True)
    print(f"machine: {describe(machine_record(device, 'as each config sets it'))}", flush=True)
    param_names = [*SEARCHED, *sorted({key for _, overrides, _, _ in configs for key in overrides} - set(SEARCHED))]
    for i, (name, _, flat, config_params) in enumerate(todo, 1):
        began = time.perf_counter()
        row = {"name": name} | {key: flat[key] for key in param_names}
        row |= run_config(config_params, args.base, tasks, eval_batch_size, device, args.queries / name if args.queries else None)
        append_row(args.out, row)
        shown = "  ".join(f"{k.split('.', 1)[1]} {v:.4f}" for k, v in row.items() if k.endswith(FIGURES[:3]))
        print(f"[{i}/{len(todo)}] {name}: {shown}  ({time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    run_stage(main)
