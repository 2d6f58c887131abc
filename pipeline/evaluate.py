"""The `evaluate` stage: LAReQA retrieval of a model in monolingual, cross-lingual and multilingual settings.

Reads each dataset's fetched tables, checks every param and input before the model
loads, encodes every distinct text once (pipeline/scoring/encoding.py), scores all settings
(pipeline/scoring/lareqa.py), adds the noisy-query report (pipeline/scoring/robustness.py) and MTEB
tasks (pipeline/scoring/mteb_tasks.py), and writes the metrics JSON, the per-query results
(one Parquet file per dataset, for pipeline/analysis/compare.py) and the plots together.

dvc.yaml's commands name every output path. Run by hand, results go to
`results/<model folder name>/` (git-ignored) unless `--out`/`--mteb-results` say otherwise,
and a path that dvc.yaml declares as a stage's output is refused: scoring another model
must not replace the tracked metrics of the pipeline's own.
"""

from __future__ import annotations

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
from pipeline.scoring.encoding import load_model
from pipeline.scoring.lareqa import TaskScores
from pipeline.scoring.mteb_tasks import leave_note, plan_mteb, run_mteb
from pipeline.scoring.report import format_noise, format_summary, write_plots
from pipeline.scoring.robustness import noise_robustness
from pipeline.scoring.tasks import DEV_DATASET, evaluate_task, prepare_task, read_source_tables


def queries_table(scores: TaskScores) -> pa.Table:
    return pa.Table.from_pandas(scores.queries, QUERIES_SCHEMA, preserve_index=False).replace_schema_metadata(None)


def results_dir(model: str) -> Path:
    """Where a model scored by hand has its results by default: results/<the model folder's name>."""
    return RESULTS_DIR / Path(model).resolve().name


def main() -> None:
    parser = stage_parser(__doc__, model="models/retriever", out=None, plots=None, mteb_results=None)
    parser.add_argument("--dataset", help="comma-separated datasets (default: evaluate.datasets)")
    parser.add_argument("--langs", help="comma-separated language codes (default: evaluate.langs or all)")
    parser.add_argument("--batch-size", type=int, help="texts per encoding batch (default: HYBRIDIR_EVAL_BATCH_SIZE, else 16)")
    args = parser.parse_args()
    args.out = args.out or str(results_dir(args.model) / "eval.json")
    args.mteb_results = args.mteb_results or str(results_dir(args.model) / "mteb")
    params = load_params(args.params)
    evaluate = params.evaluate
    datasets = args.dataset.split(",") if args.dataset else list(evaluate.datasets)
    langs = args.langs.split(",") if args.langs else evaluate.langs
    prefixes = (params.model.query_prefix, params.model.passage_prefix)
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
        mteb_plan = None if dev_only else plan_mteb(evaluate, params.model, args.model, args.mteb_results, batch_size)
        model = load_model(args.model, params.model.max_length)
        precision = resolve_precision(evaluate.precision, model.device.type, "evaluate.precision")
        bf16 = precision == "bf16"
        machine = machine_record(str(model.device), precision)
        report, results, noise_reports = {"machine": machine, "timing": {}}, {}, {}
        print(f"encoding on {describe(machine)}")
        queries_tmp.mkdir()
        for name, task in tasks.items():
            result = evaluate_task(model, task, prefixes, batch_size, bf16)
            report[name], results[name] = result.summary, result.scores
            report["timing"][name] = {
                "encode_seconds": round(result.timing["encode_seconds"], 1),
                "texts_per_s": round(result.timing["unique_texts"] / result.timing["encode_seconds"], 1),
            }
            write_parquet(queries_table(result.scores), queries_tmp / f"{name}.parquet", made_by={"dataset": name})
            print(format_summary(name, result.summary))
            print(
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
                print(format_noise(name, noise_reports[name], evaluate.noise_queries))
        if mteb_plan:
            report.update(run_mteb(model, mteb_plan))
        if plots_tmp:
            write_plots(results, noise_reports, plots_tmp[0])
        write_json(report, out_tmp)
    if not dev_only:
        leave_note(args.mteb_results)


if __name__ == "__main__":
    run_stage(main)
