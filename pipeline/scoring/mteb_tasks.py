"""MTEB tasks and benchmarks (retrieval, classification, STS, bitext mining...) for the `evaluate` stage, through `mteb`.

Names and languages are resolved, and the data of the first task still to run loaded, before
any model is: a misspelt name, an unknown language or an offline machine fails in seconds,
not after the LAReQA evaluation. Every other task's data is loaded when its turn comes and
dropped after it (a whole benchmark's would not fit in memory).

A benchmark runs for hours: each finished task's result is saved at once, under the stage's
own folder (a DVC out kept between runs), keyed by a hash of the model's files and of how texts
are encoded; a killed run resumes after the last task saved, and another model's results are
never reused. mteb's own result cache (~/.cache/mteb) is not used: it is keyed by the model's
name, so an older checkpoint under the same path would be read back as this one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipeline.common import PipelineError, atomic_path, first_line
from pipeline.params import EvaluateParams
from pipeline.sources.resource_classes import has_class, mean_by_class

log = logging.getLogger(__name__)

RETRIEVAL_TYPES = ("Retrieval", "Reranking")
RETRIEVAL_SCORES = ("ndcg_at_10", "recall_at_100")  # the main score of MTEB retrieval, and how much a reranker could recover


RESULTS_NOTE = (
    "Finished MTEB tasks' results, one folder per model and encoding (a hash of the model's files,\n"
    "prefixes and max_length), one JSON file per task. DVC keeps this folder between runs\n"
    "(persist: true), so a killed evaluation resumes after the last finished task.\n"
)


@dataclass
class MtebPlan:
    """What the stage will run, settled before the model loads."""

    tasks: list  # each task once, over every subset and split that any request of it needs
    benchmarks: list  # mteb.Benchmark objects, restricted to evaluate.mteb_langs
    results_dir: Path  # finished tasks' results of this model and encoding: <task>.json
    finished: dict  # task name -> its saved TaskResult
    prefixes: tuple[str, str]
    batch_size: int


def plan_mteb(
    evaluate: EvaluateParams, prefixes: tuple[str, str], max_length: int, model_dir: str, results_root: str, batch_size: int
) -> MtebPlan | None:
    """The MTEB tasks and benchmarks params.yaml asks for (None if none), checked before any model is loaded;
    `prefixes` are the (query, passage) prefixes the evaluation encodes with."""
    try:  # a DVC out: there after every run, MTEB or not
        Path(results_root).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"{results_root}: cannot write there ({err.strerror or first_line(err)})") from None
    task_names = list(evaluate.mteb_tasks or [])
    benchmark_names = list(evaluate.mteb_benchmarks or [])
    if not task_names and not benchmark_names:
        return None
    langs = list(evaluate.mteb_langs) if evaluate.mteb_langs else None
    check_langs(langs)
    benchmarks = resolve_benchmarks(benchmark_names, langs)
    tasks = merge_tasks(resolve_tasks(task_names, langs) + [task for benchmark in benchmarks for task in benchmark.tasks])
    results_dir = Path(results_root) / encoding_key(model_dir, prefixes, max_length)
    finished = {task.metadata.name: result for task in tasks if (result := load_result(results_dir, task))}
    waiting = [task for task in tasks if task.metadata.name not in finished and not task.is_aggregate]
    if waiting:  # the hub is reachable (or the data cached) before hours of work
        load_task_data(waiting[0])
    return MtebPlan(tasks, benchmarks, results_dir, finished, prefixes, batch_size)


def leave_note(results_root: str) -> None:
    """Say what the folder holds, once the stage has succeeded (a failed one touches nothing):
    DVC warns of an empty out."""
    note = Path(results_root) / "README.txt"
    if not note.exists():
        with atomic_path(note) as tmp:
            tmp.write_text(RESULTS_NOTE, encoding="utf-8")


def check_langs(langs: list[str] | None) -> None:
    from mteb.languages import LanguageScripts

    try:
        LanguageScripts.from_languages_and_scripts(langs)
    except ValueError as err:
        raise PipelineError(f"params.yaml: evaluate.mteb_langs: {first_line(err)}") from None


def did_you_mean(err: KeyError) -> str:
    """mteb's suggestion for a misspelt name, as ' (did you mean X?)'."""
    close = re.search(r"Did you mean: '?(.+?)'?\?$", str(err.args[0]) if err.args else "")
    return f" (did you mean {close.group(1)}?)" if close else ""


def resolve_tasks(names: list[str], langs: list[str] | None) -> list:
    """The MTEB tasks named in evaluate.mteb_tasks, restricted to `langs` (ISO 639-3), data not loaded yet."""
    import mteb

    tasks = []
    for name in names:
        try:
            tasks.append(mteb.get_task(name, languages=langs or None))
        except KeyError as err:
            raise PipelineError(f"params.yaml: evaluate.mteb_tasks: unknown MTEB task '{name}'{did_you_mean(err)}") from None
        except ValueError as err:  # no subset in these languages
            raise PipelineError(f"params.yaml: evaluate.mteb_langs: {name}: {first_line(err)}") from None
    return tasks


def resolve_benchmarks(names: list[str], langs: list[str] | None) -> list:
    """The MTEB benchmarks named in evaluate.mteb_benchmarks, restricted to `langs`."""
    import mteb

    benchmarks = []
    for name in names:
        try:
            benchmark = mteb.get_benchmark(name)
        except KeyError as err:
            raise PipelineError(f"params.yaml: evaluate.mteb_benchmarks: unknown MTEB benchmark '{name}'{did_you_mean(err)}") from None
        benchmarks.append(restrict(benchmark, langs) if langs else benchmark)
    return benchmarks


def restrict(benchmark, langs: list[str]):
    """A copy of the benchmark with each task kept to its subsets in `langs`; a task with none of them is left out."""
    tasks = []
    for task in benchmark.tasks:
        try:  # within the benchmark's own subsets: MTEB(eng, v2) takes STS17's en-en only
            tasks.append(copy.copy(task).filter_languages(langs, hf_subsets=task.hf_subsets))
        except ValueError:
            continue
    if not tasks:
        raise PipelineError(f"params.yaml: evaluate.mteb_langs: no task of {benchmark.name} is in {', '.join(langs)}")
    restricted = copy.copy(benchmark)
    restricted.tasks = tasks
    return restricted


def merge_tasks(tasks: list) -> list:
    """Each task once, over the union of the subsets and splits asked for (a task named in
    evaluate.mteb_tasks whole may be in a benchmark in part). Copies: mteb's are shared."""
    merged: dict = {}
    for task in tasks:
        name = task.metadata.name
        if name not in merged:
            merged[name] = copy.copy(task)
            continue
        kept = merged[name]
        subsets, splits = {*kept.hf_subsets, *task.hf_subsets}, {*kept.eval_splits, *task.eval_splits}
        kept.hf_subsets = [subset for subset in task.metadata.hf_subsets if subset in subsets]
        kept.filter_eval_splits([split for split in task.metadata.eval_splits if split in splits])
    return list(merged.values())


def load_task_data(task) -> None:
    try:
        task.load_data()
    except Exception as err:  # the hub, the datasets library and the network fail in many ways
        raise PipelineError(f"MTEB task {task.metadata.name}: cannot load its data ({first_line(err)})") from None


def encoding_key(model_dir: str, prefixes: tuple[str, str], max_length: int) -> str:
    """A hash of what the scores depend on: every file of the model folder (weights, config,
    tokenizer), the prefixes and the length texts are cut at. A hub id stands for its files."""
    digest = hashlib.sha256(json.dumps([*prefixes, max_length]).encode())
    folder = Path(model_dir)
    if not folder.is_dir():
        digest.update(model_dir.encode())
    for path in sorted(path for path in folder.rglob("*") if path.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def load_result(results_dir: Path, task):
    """The saved result of `task`, kept to its subsets and splits, if there is one covering them on
    the same dataset revision; an unreadable one is reported and evaluated again."""
    from mteb.results import TaskResult

    path = results_dir / f"{task.metadata.name}.json"
    if not path.exists():
        return None
    try:
        result = TaskResult.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        log.warning(f"{path}: unreadable ({first_line(err)}); evaluating {task.metadata.name} again")
        return None
    done = {(split, scores["hf_subset"]) for split, entries in result.scores.items() for scores in entries}
    wanted = {(split, subset) for split in task.eval_splits for subset in task.hf_subsets}
    if result.dataset_revision != task.metadata.revision or not wanted <= done:
        return None
    return result.validate_and_filter_scores(task)  # it may cover more subsets than asked for now


def save_result(results_dir: Path, result) -> None:
    with atomic_path(results_dir / f"{result.task_name}.json") as tmp:
        tmp.write_text(result.model_dump_json(indent=1), encoding="utf-8")


def run_mteb(model, plan: MtebPlan) -> dict:
    """Evaluate a sentence-transformers model with the project's query/passage prefixes.

    Returns {"mteb": {task: ...}, "mteb_benchmarks": {benchmark: ...}} (see task_report and
    benchmark_report), which DVC shows as e.g. `mteb.<task>.<subset>.<split>.main_score`.
    """
    results = evaluate_tasks(model, plan)
    report: dict = {"mteb": {task.metadata.name: task_report(task, results[task.metadata.name]) for task in plan.tasks}}
    if plan.benchmarks:
        report["mteb_benchmarks"] = {benchmark.name: benchmark_report(benchmark, results) for benchmark in plan.benchmarks}
    return report


def evaluate_tasks(model, plan: MtebPlan) -> dict:
    """Every task's TaskResult: the saved ones, and the others evaluated one at a time and saved as
    each is done; a line per task says how far the run is."""
    from mteb.models import SentenceTransformerEncoderWrapper

    query_prefix, passage_prefix = plan.prefixes
    encoder = SentenceTransformerEncoderWrapper(model, model_prompts={"query": query_prefix, "document": passage_prefix})
    results = dict(plan.finished)
    started = time.perf_counter()
    for done, task in enumerate(plan.tasks, 1):
        name = task.metadata.name
        if name not in results:
            results[name] = evaluate_task(encoder, task, plan.batch_size)
            save_result(plan.results_dir, results[name])
        how = "saved before" if name in plan.finished else "evaluated"
        minutes = (time.perf_counter() - started) / 60
        log.info(f"MTEB {done}/{len(plan.tasks)} {name}: main score {results[name].get_score():.4f} ({how}); {minutes:.1f} min so far")
    return results


def evaluate_task(encoder, task, batch_size: int):
    """One task's TaskResult, its data in memory only meanwhile (a benchmark's would not fit at once)."""
    import mteb

    if not task.is_aggregate:  # an aggregate task's parts are loaded and dropped by mteb itself
        load_task_data(task)
    try:
        result = mteb.evaluate(
            encoder, task, cache=None, co2_tracker=False, show_progress_bar=False, encode_kwargs={"batch_size": batch_size}
        )
    finally:
        if task.data_loaded:
            task.unload_data()
    return result.task_results[0]


def task_report(task, result) -> dict:
    """One task: its main score per subset and split (with nDCG@10 and Recall@100 for retrieval),
    `main_score` = the mean over them (mteb's TaskResult.get_score), and `by_class` = the mean
    main score of its languages in each Joshi et al. class (see subset_language)."""
    keys = ("main_score", *(RETRIEVAL_SCORES if task.metadata.type in RETRIEVAL_TYPES else ()))
    report: dict = {"main_score": round(float(result.get_score()), 6)}
    for split, entries in result.scores.items():
        for scores in entries:
            report.setdefault(scores["hf_subset"], {})[split] = {key: round(float(scores[key]), 6) for key in keys}
    by_class = mean_by_class(language_scores(result))
    if by_class:
        report["by_class"] = {str(joshi): round(score, 6) for joshi, score in by_class.items()}
    return report


def subset_language(langscripts: list[str]) -> str | None:
    """The language a subset's score counts for, by resource class: its one language; for a
    cross-lingual pair, the one that is not English (the side whose resources vary: mteb does not
    say which side holds the queries, and Belebele lists the passages' language first), or the
    first listed if neither is; none for a subset of three or more languages."""
    langs = list(dict.fromkeys(code.split("-")[0] for code in langscripts))
    if not 1 <= len(langs) <= 2:
        return None
    return ([lang for lang in langs if lang != "eng"] or langs)[0]


def language_scores(result) -> dict[str, float]:
    """Each classified language's mean main score over its subsets and splits; languages with no
    class (programming languages, those missing from resource_classes.csv) are left out."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for entries in result.scores.values():
        for scores in entries:
            lang = subset_language(scores["languages"])
            if lang and has_class(lang):
                grouped[lang].append(float(scores["main_score"]))
    return {lang: sum(values) / len(values) for lang, values in grouped.items()}


def benchmark_report(benchmark, results: dict) -> dict:
    """A benchmark's mean main score over its tasks (`mean`), per task type (`mean_by_type`) and over
    those types (`mean_over_types`), by mteb's own leaderboard aggregation (BenchmarkAggregation's
    MEAN_TASK, TASK_TYPES and MEAN_TASK_TYPE) of each task's TaskResult after
    `validate_and_filter_scores` keeps the benchmark's own subsets and splits."""
    from mteb.benchmarks.benchmark import BenchmarkAggregation

    selected = [results[task.metadata.name].validate_and_filter_scores(task) for task in benchmark.tasks]
    by_type = BenchmarkAggregation.TASK_TYPES.aggregate(selected)
    return {
        "mean": round(float(BenchmarkAggregation.MEAN_TASK.aggregate(selected)["Mean(Task)"]), 6),
        "mean_by_type": {kind: round(float(score), 6) for kind, score in sorted(by_type.items())},
        "mean_over_types": round(float(BenchmarkAggregation.MEAN_TASK_TYPE.aggregate(selected)["Mean(TaskType)"]), 6),
    }
