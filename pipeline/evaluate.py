"""The `evaluate` stage: LAReQA retrieval of a model in monolingual, cross-lingual and multilingual settings.

Reads each dataset's fetched tables, checks every param and input before the model
loads, encodes every distinct text once (pipeline/scoring/encoding.py), scores all settings
(pipeline/scoring/lareqa.py), adds the noisy-query report (pipeline/scoring/robustness.py) and MTEB
tasks (pipeline/scoring/mteb_tasks.py), and writes the metrics JSON, the per-query results
(one Parquet file per dataset, for pipeline/analysis/compare.py) and the plots together.

dvc.yaml's commands name every output path, and `--prefixes params`: the pipeline's own
evaluations prefix queries and passages as params.yaml says (the prefixes are part of the
recipe). Run by hand, a model is scored with the prompts it was saved with
(`--query-prefix`/`--passage-prefix` override them), results go to
`results/<model folder name>/` (git-ignored) unless `--out`/`--mteb-results` say otherwise,
and a path that dvc.yaml declares as a stage's output is refused: scoring another model
must not replace the tracked metrics of the pipeline's own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from pipeline.common import (
    PipelineError,
    atomic_outputs,
    refuse_declared_outputs,
    run_stage,
    stage_parser,
    write_json,
    write_parquet,
)
from pipeline.contracts import QUERIES_SCHEMA, RESULTS_DIR, Noise, queries_dir
from pipeline.machine import describe, machine_record, resolve_precision
from pipeline.params import execution, load_params
from pipeline.scoring.encoding import load_model, saved_prefixes
from pipeline.scoring.lareqa import TaskScores
from pipeline.scoring.mteb_tasks import leave_note, plan_mteb, run_mteb
from pipeline.scoring.report import format_noise, format_summary, write_plots
from pipeline.scoring.robustness import noise_robustness
from pipeline.scoring.tasks import DEV_DATASET, evaluate_task, prepare_task, read_source_tables

log = logging.getLogger(__name__)


def queries_table(scores: TaskScores) -> pa.Table:
    return pa.Table.from_pandas(scores.queries, QUERIES_SCHEMA, preserve_index=False).replace_schema_metadata(None)


def choose_prefixes(
    source: str, params_prefixes: tuple[str, str], saved: dict[str, tuple[str, str]], query: str | None, passage: str | None
) -> dict[str, tuple[str, str]]:
    """The query and passage prefixes, each with where it came from: --query-prefix/--passage-prefix, else
    params.yaml's (`--prefixes params`), else the prompts the model was saved with (`saved_prefixes`)."""
    chosen = {}
    for kind, flag, from_params in zip(("query", "passage"), (query, passage), params_prefixes):
        if flag is not None:
            chosen[kind] = (flag, f"--{kind}-prefix")
        elif source == "params":
            chosen[kind] = (from_params, f"params.yaml model.{kind}_prefix")
        else:
            prompt, name = saved[kind]
            chosen[kind] = (prompt, f"the model's saved prompt '{name}'" if prompt else "the model was saved with none")
    return chosen


def results_dir(model: str) -> Path:
    """Where a model scored by hand has its results by default: results/<the model folder's name>."""
    return RESULTS_DIR / Path(model).resolve().name


def main() -> None:
    parser = stage_parser(__doc__, model="models/retriever", out=None, plots=None, mteb_results=None)
    parser.add_argument("--dataset", help="comma-separated datasets (default: evaluate.datasets)")
    parser.add_argument("--langs", help="comma-separated language codes (default: evaluate.langs or all)")
    parser.add_argument("--batch-size", type=int, help="texts per encoding batch (default: HYBRIDIR_EVAL_BATCH_SIZE, else 16)")
    parser.add_argument(
        "--prefixes",
        choices=("model", "params"),
        default="model",
        help="model: the prompts the model was saved with (default); params: params.yaml's model.*_prefix (the pipeline's stages)",
    )
    parser.add_argument("--query-prefix", help="prefix every query with this instead")
    parser.add_argument("--passage-prefix", help="prefix every passage with this instead")
    args = parser.parse_args()
    args.out = args.out or str(results_dir(args.model) / "eval.json")
    args.mteb_results = args.mteb_results or str(results_dir(args.model) / "mteb")
    params = load_params(args.params)
    evaluate = params.evaluate
    datasets = args.dataset.split(",") if args.dataset else list(evaluate.datasets)
    langs = args.langs.split(",") if args.langs else evaluate.langs
    batch_size = args.batch_size or execution().eval_batch_size
    dev_only = datasets == [DEV_DATASET]
    if DEV_DATASET in datasets and not dev_only:
        raise PipelineError(f"--dataset: evaluate the dev split alone (--dataset {DEV_DATASET}): it is for choices, not a reported result")
    noises = [] if dev_only else [Noise.parse(name) for name in evaluate.noise or []]
    if dev_only and not args.langs:
        langs = None  # evaluate.langs names test-set languages; the dev split is scored in every language it has
    outputs = [args.out, queries_dir(args.out)] + ([args.plots] if args.plots else [])
    refuse_declared_outputs([*outputs, args.mteb_results])
    with atomic_outputs(*outputs) as (out_tmp, queries_tmp, *plots_tmp):
        # every input is checked before the model loads
        tasks = {}
        for name in datasets:
            questions, candidates, folder = read_source_tables(name, params.data)
            tasks[name] = prepare_task(questions, candidates, langs, name, str(folder))
        wanted_prompts = args.prefixes == "model" and None in (args.query_prefix, args.passage_prefix)
        saved = saved_prefixes(args.model) if wanted_prompts else {}
        params_prefixes = (params.model.query_prefix, params.model.passage_prefix)
        chosen = choose_prefixes(args.prefixes, params_prefixes, saved, args.query_prefix, args.passage_prefix)
        prefixes = (chosen["query"][0], chosen["passage"][0])
        max_length = params.model.max_length
        mteb_plan = None if dev_only else plan_mteb(evaluate, prefixes, max_length, args.model, args.mteb_results, batch_size)
        model = load_model(args.model, max_length)
        precision = resolve_precision(evaluate.precision, model.device.type, "evaluate.precision")
        bf16 = precision == "bf16"
        machine = machine_record(str(model.device), precision)
        report, results, noise_reports = {"machine": machine, "prefixes": dict(zip(chosen, prefixes)), "timing": {}}, {}, {}
        log.info(f"encoding on {describe(machine)}")
        log.info("prefixes: " + ", ".join(f"{kind} {text!r} ({where})" for kind, (text, where) in chosen.items()))
        queries_tmp.mkdir()
        for name, task in tasks.items():
            result = evaluate_task(model, task, prefixes, batch_size, bf16)
            report[name], results[name] = result.summary, result.scores
            report["timing"][name] = {
                "encode_seconds": round(result.timing["encode_seconds"], 1),
                "texts_per_s": round(result.timing["unique_texts"] / result.timing["encode_seconds"], 1),
            }
            write_parquet(queries_table(result.scores), queries_tmp / f"{name}.parquet", made_by={"dataset": name})
            log.info(format_summary(name, result.summary))
            log.info(
                f"  {result.timing['unique_texts']} unique of {result.timing['texts']} texts encoded in "
                f"{result.timing['encode_seconds']:.1f} s, scored in {result.timing['score_seconds']:.1f} s"
            )
            if noises:
                noise_reports[name] = noise_robustness(
                    model,
                    task,
                    result.queries,
                    result.pool,
                    noises,
                    prefixes[0],
                    batch_size,
                    evaluate.noise_queries,
                    evaluate.noise_seed,
                    bf16,
                )
                report[name]["noise"] = noise_reports[name]
                log.info(format_noise(name, noise_reports[name], evaluate.noise_queries))
        if mteb_plan:
            report.update(run_mteb(model, mteb_plan))
        if plots_tmp:
            write_plots(results, noise_reports, plots_tmp[0])
        write_json(report, out_tmp)
    if not dev_only:
        leave_note(args.mteb_results)


if __name__ == "__main__":
    run_stage(main)
