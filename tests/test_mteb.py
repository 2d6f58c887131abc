"""MTEB through the `evaluate` stage, offline: slices of XQuAD-R from the mirror wrapped as MTEB
tasks of three types defined here (retrieval, pair classification, bitext mining; no hub), scored
by the stage's code, by `mteb` itself and by the project's own retrieval code."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from pipeline import evaluate, fetch
from pipeline.common import PipelineError
from pipeline.params import build
from pipeline.scoring import mteb_tasks
from pipeline.scoring.encoding import load_model
from pipeline.scoring.lareqa import RetrievalTask, build_task
from pipeline.scoring.metrics import ndcg_at_k, ranks_of
from pipeline.scoring.mteb_tasks import encoding_key, plan_mteb, run_mteb
from pipeline.sources.resource_classes import mean_by_class
from tests.helpers import REPO, mirror_file, write_raw

mteb = pytest.importorskip("mteb")
from datasets import Dataset  # noqa: E402
from mteb.abstasks import AbsTaskBitextMining, AbsTaskPairClassification  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.benchmarks.benchmark import BenchmarkAggregation  # noqa: E402
from mteb.models import SentenceTransformerEncoderWrapper  # noqa: E402
from mteb.results.task_result import TaskResult  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, torchrun, dvc or a grid: `pytest -m 'not slow'` skips it

LANGS = {"en": "eng-Latn", "de": "deu-Latn", "es": "spa-Latn", "el": "ell-Grek"}  # Joshi classes 5, 5, 5, 3
PREFIXES = ("query: ", "passage: ")


@pytest.fixture(scope="module")
def lareqa_tables() -> tuple[pa.Table, pa.Table]:
    """One XQuAD-R article in en, de, es, el: ~290 questions, a multilingual pool of 85 sentences."""
    parsed = []
    for lang in LANGS:
        doc = json.loads(mirror_file(f"lareqa/xquad-r/{lang}.json").read_text(encoding="utf-8"))
        parsed.append(fetch.parse_lareqa({"data": doc["data"][:1]}, lang, lang))
    return pa.concat_tables([q for q, _ in parsed]), pa.concat_tables([c for _, c in parsed])


@pytest.fixture(scope="module")
def lareqa_task(lareqa_tables) -> RetrievalTask:
    questions, candidates = (table.to_pandas() for table in lareqa_tables)
    task = build_task(questions, candidates, list(LANGS), "slice")
    assert len(set(task.candidate_text)) == len(task.candidate_text)  # no tied twins in the pool
    return task


@pytest.fixture(scope="module")
def translations(lareqa_tables) -> pd.DataFrame:
    """40 of the slice's questions, one row per question id, one column per language."""
    return lareqa_tables[0].to_pandas().pivot(index="group_id", columns="lang", values="question").dropna().head(40)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), 128)


def local_metadata(name: str, kind: str, eval_langs: dict[str, list[str]], main_score: str) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description="A slice of XQuAD-R (LAReQA) from the local mirror.",
        reference="https://github.com/google-research-datasets/lareqa",
        dataset={"path": "local/xquad-r", "revision": "mirror"},
        type=kind,
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=eval_langs,
        main_score=main_score,
        date=None,
        domains=None,
        task_subtypes=None,
        license="cc-by-sa-4.0",
        annotations_creators="human-annotated",
        dialect=None,
        sample_creation="human-translated",
        bibtex_citation="",
    )


class LocalXQuADRMultilingual(AbsTaskRetrieval):
    """XQuAD-R's multilingual setting as an MTEB task: a subset per query language, all of them
    searching one pool of every language, each answer sentence in any language relevant."""

    metadata = local_metadata("LocalXQuADRMultilingual", "Retrieval", {lang: [code] for lang, code in LANGS.items()}, "ndcg_at_10")

    def __init__(self, task: RetrievalTask):
        super().__init__()
        self.lareqa = task

    def load_data(self, **kwargs) -> None:
        task = self.lareqa
        ids = [f"d{c}" for c in range(len(task.candidate_text))]
        corpus = Dataset.from_dict({"id": ids, "text": task.candidate_text, "title": [""] * len(ids)})
        self.dataset = {}
        for x, lang in enumerate(task.langs):
            rows = np.flatnonzero(task.query_lang == x)
            queries = Dataset.from_dict({"id": [f"q{r}" for r in rows], "text": [task.query_text[r] for r in rows]})
            relevant = {f"q{r}": {f"d{a}": 1 for a in task.answers[r] if a >= 0} for r in rows}
            split = RetrievalSplitData(queries=queries, corpus=corpus, relevant_docs=relevant, top_ranked=None)
            self.dataset[lang] = {"test": split}
        self.data_loaded = True


class LocalXQuADRPairs(AbsTaskPairClassification):
    """XNLI-like pairs (English question, translated question): the same question id is a positive,
    the next id's question a negative; a subset per translated language."""

    metadata = local_metadata(
        "LocalXQuADRPairs", "PairClassification", {lang: [LANGS["en"], LANGS[lang]] for lang in ("de", "es", "el")}, "max_ap"
    )

    def __init__(self, questions: pd.DataFrame):
        super().__init__()
        self.questions = questions

    def load_data(self, **kwargs) -> None:
        english = self.questions["en"].tolist()
        self.dataset = {}
        for lang in self.metadata.eval_langs:
            translated = self.questions[lang].tolist()
            negatives = translated[1:] + translated[:1]
            pairs = {"sentence1": english + english, "sentence2": translated + negatives, "labels": [1] * len(english) + [0] * len(english)}
            self.dataset[lang] = {"test": Dataset.from_dict(pairs)}
        self.data_loaded = True


class LocalXQuADRBitext(AbsTaskBitextMining):
    """Each translated question's English original mined among all English questions; a subset per language pair."""

    metadata = local_metadata(
        "LocalXQuADRBitext", "BitextMining", {f"{lang}-en": [LANGS[lang], LANGS["en"]] for lang in ("de", "es", "el")}, "f1"
    )

    def __init__(self, questions: pd.DataFrame):
        super().__init__()
        self.questions = questions

    def load_data(self, **kwargs) -> None:
        english = self.questions["en"].tolist()
        self.dataset = {
            subset: {"test": Dataset.from_dict({"sentence1": self.questions[subset[:2]].tolist(), "sentence2": english})}
            for subset in self.metadata.eval_langs
        }
        self.data_loaded = True


def local_tasks(lareqa_task, translations) -> list:
    """Fresh instances of the three local tasks (a task object holds its data while it runs)."""
    return [LocalXQuADRMultilingual(lareqa_task), LocalXQuADRPairs(translations), LocalXQuADRBitext(translations)]


def params_with(**evaluate_params) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["evaluate"].update(evaluate_params)
    return params


def plan_of(params: dict, model_dir: str, results_root: str):
    """plan_mteb as the evaluate stage calls it, from a params mapping."""
    checked = build(params)
    prefixes = (checked.model.query_prefix, checked.model.passage_prefix)
    return plan_mteb(checked.evaluate, prefixes, checked.model.max_length, model_dir, results_root, batch_size=16)


def plan_locally(monkeypatch, model_dir, results_root, tasks=(), benchmarks=()):
    """plan_mteb for tasks and benchmarks defined here, standing in for what mteb would resolve from the hub."""
    monkeypatch.setattr(mteb_tasks, "resolve_tasks", lambda names, langs: list(tasks))
    monkeypatch.setattr(mteb_tasks, "resolve_benchmarks", lambda names, langs: list(benchmarks))
    params = params_with(mteb_tasks=[t.metadata.name for t in tasks], mteb_benchmarks=[b.name for b in benchmarks])
    return plan_of(params, str(model_dir), str(results_root))


@dataclass
class Run:
    report: dict  # what run_mteb returned
    printed: list[str]
    results_root: Path  # what it saved: <results_root>/<encoding key>/<task>.json


@pytest.fixture(scope="module")
def first_run(lareqa_task, translations, model, tiny_model_dir, tmp_path_factory) -> Run:
    """The stage's code on the three local tasks, from scratch (the later runs start from copies of what it saved)."""
    results_root = tmp_path_factory.mktemp("mteb")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(printed):
        report = run_mteb(model, plan_locally(monkeypatch, tiny_model_dir, results_root, tasks=local_tasks(lareqa_task, translations)))
    return Run(report, printed.getvalue().splitlines(), results_root)


@pytest.fixture
def saved(first_run, tmp_path) -> Path:
    """A copy of the first run's results folder, for a run that resumes from it."""
    return shutil.copytree(first_run.results_root, tmp_path / "results")


def counting_evaluations(monkeypatch) -> list[str]:
    """The names of the tasks mteb.evaluate is called on from now on."""
    evaluated, real = [], mteb.evaluate

    def counted(model, task, **kwargs):
        evaluated.append(task.metadata.name)
        return real(model, task, **kwargs)

    monkeypatch.setattr(mteb, "evaluate", counted)
    return evaluated


def mtebs_own(model, tasks: list) -> dict:
    """mteb.evaluate on the tasks, with the prefixes the stage uses: {task name: TaskResult}."""
    encoder = SentenceTransformerEncoderWrapper(model, model_prompts={"query": PREFIXES[0], "document": PREFIXES[1]})
    results = mteb.evaluate(encoder, tasks, cache=None, co2_tracker=False, show_progress_bar=False, encode_kwargs={"batch_size": 16})
    return {result.task_name: result for result in results.task_results}


def own_ndcg_at_10(model, task: RetrievalTask, prefixes: tuple[str, str]) -> dict[str, float]:
    """The project's computation: encode once, score every query against the pool, nDCG@10 from ranks."""
    result = evaluate.evaluate_task(model, task, prefixes, batch_size=16)
    per_query = ndcg_at_k(ranks_of(result.queries @ result.pool.T, task.answers), 10)
    return {lang: float(per_query[task.query_lang == x].mean()) for x, lang in enumerate(task.langs)}


def test_mteb_ndcg_matches_the_projects_own_within_1e4(first_run, lareqa_task, model):
    subsets = first_run.report["mteb"]["LocalXQuADRMultilingual"]
    assert set(subsets) == {*LANGS, "main_score", "by_class"}
    own = own_ndcg_at_10(model, lareqa_task, PREFIXES)
    for lang in LANGS:
        scores = subsets[lang]["test"]
        assert set(scores) == {"main_score", "ndcg_at_10", "recall_at_100"}
        assert scores["ndcg_at_10"] == scores["main_score"] == pytest.approx(own[lang], abs=1e-4), lang
        assert scores["recall_at_100"] == 1.0  # fewer than 100 candidates: every answer is in the top 100
    # the prefixes reach mteb's encoder: without them our own figure moves away
    unprefixed = own_ndcg_at_10(model, lareqa_task, ("", ""))
    assert max(abs(unprefixed[lang] - own[lang]) for lang in LANGS) > 1e-3
    assert first_run.report == json.loads(json.dumps(first_run.report))  # plain JSON for the metrics file


def test_each_task_type_reports_mtebs_own_main_score(first_run, lareqa_task, translations, model):
    report = first_run.report["mteb"]
    direct = mtebs_own(model, local_tasks(lareqa_task, translations))
    assert {task.metadata.type for task in local_tasks(lareqa_task, translations)} == {"Retrieval", "PairClassification", "BitextMining"}
    assert set(report) == set(direct) and "mteb_benchmarks" not in first_run.report
    for name, result in direct.items():
        task = report[name]
        assert task["main_score"] == pytest.approx(result.get_score(), abs=1e-6), name
        per_language = {}
        for entry in result.scores["test"]:
            scores = task[entry["hf_subset"]]["test"]
            assert scores["main_score"] == pytest.approx(entry["main_score"], abs=1e-6), (name, entry["hf_subset"])
            assert ("ndcg_at_10" in scores) == (name == "LocalXQuADRMultilingual")
            per_language[entry["hf_subset"][:2]] = entry["main_score"]  # en, de, es, el: the non-English side
        by_class = {str(joshi): pytest.approx(score, abs=1e-6) for joshi, score in mean_by_class(per_language).items()}
        assert task["by_class"] == by_class and set(by_class) == {"3", "5"}, name  # el is class 3, en de es are 5
    assert 0 < report["LocalXQuADRPairs"]["main_score"] < 1 and 0 < report["LocalXQuADRBitext"]["main_score"] < 1


def test_a_long_run_says_how_far_it_is(first_run):
    assert [line.split(":")[0] for line in first_run.printed] == [
        "MTEB 1/3 LocalXQuADRMultilingual",
        "MTEB 2/3 LocalXQuADRPairs",
        "MTEB 3/3 LocalXQuADRBitext",
    ]
    assert all(re.search(r": main score 0\.\d{4} \(evaluated\); \d+\.\d min so far$", line) for line in first_run.printed)


def test_a_benchmark_reports_the_mean_of_its_tasks_main_scores(lareqa_task, translations, model, tiny_model_dir, saved, monkeypatch):
    retrieval, pairs, bitext = local_tasks(lareqa_task, translations)
    german_bitext = copy.copy(bitext).filter_languages(["deu"])  # the benchmark takes one pair, evaluate.mteb_tasks all three
    benchmark = mteb.Benchmark(name="Local(test, v1)", tasks=[retrieval, pairs, german_bitext])
    # mteb's aggregation finds a result's task in its registry by name; these tasks are defined here
    local = {task.metadata.name: task for task in (retrieval, pairs, bitext)}
    monkeypatch.setattr(TaskResult, "task", property(lambda result: local[result.task_name]))
    plan = plan_locally(monkeypatch, tiny_model_dir, saved, tasks=[bitext], benchmarks=[benchmark])
    assert [task.metadata.name for task in plan.tasks] == ["LocalXQuADRBitext", "LocalXQuADRMultilingual", "LocalXQuADRPairs"]
    assert plan.tasks[0].hf_subsets == ["de-en", "es-en", "el-en"] and german_bitext.hf_subsets == ["de-en"]
    evaluated = counting_evaluations(monkeypatch)
    report = run_mteb(model, plan)
    assert evaluated == []  # all three were saved by the first run

    tasks = report["mteb"]
    task_scores = {name: tasks[name]["main_score"] for name in ("LocalXQuADRMultilingual", "LocalXQuADRPairs")}
    task_scores["LocalXQuADRBitext"] = tasks["LocalXQuADRBitext"]["de-en"]["test"]["main_score"]  # the benchmark's part only
    means = report["mteb_benchmarks"]["Local(test, v1)"]  # dvc: mteb_benchmarks.Local(test, v1).mean
    assert means["mean"] == pytest.approx(np.mean(list(task_scores.values())), abs=1e-6)
    assert means["mean_by_type"] == {
        "BitextMining": pytest.approx(task_scores["LocalXQuADRBitext"], abs=1e-6),
        "PairClassification": pytest.approx(task_scores["LocalXQuADRPairs"], abs=1e-6),
        "Retrieval": pytest.approx(task_scores["LocalXQuADRMultilingual"], abs=1e-6),
    }
    assert means["mean_over_types"] == pytest.approx(means["mean"], abs=1e-6)  # one task per type
    # mteb's own leaderboard aggregation of the saved results says the same
    results = {task.metadata.name: mteb_tasks.load_result(plan.results_dir, task) for task in benchmark.tasks}
    selected = [results[task.metadata.name].validate_and_filter_scores(task) for task in benchmark.tasks]
    assert means["mean"] == pytest.approx(BenchmarkAggregation.MEAN_TASK.aggregate(selected)["Mean(Task)"], abs=1e-6)


def test_a_rerun_resumes_after_the_finished_tasks(first_run, lareqa_task, translations, model, tiny_model_dir, saved, monkeypatch, capsys):
    (folder,) = (path for path in saved.iterdir() if path.is_dir())  # <results>/<hash of the model and its encoding>/<task>.json
    assert folder.name == encoding_key(str(tiny_model_dir), PREFIXES, 128)
    assert sorted(path.name for path in folder.iterdir()) == [
        "LocalXQuADRBitext.json",
        "LocalXQuADRMultilingual.json",
        "LocalXQuADRPairs.json",
    ]
    (folder / "LocalXQuADRPairs.json").unlink()  # as if the run had been killed during the pairs
    evaluated = counting_evaluations(monkeypatch)
    report = run_mteb(model, plan_locally(monkeypatch, tiny_model_dir, saved, tasks=local_tasks(lareqa_task, translations)))
    assert evaluated == ["LocalXQuADRPairs"] and report == first_run.report
    assert re.findall(r"\((saved before|evaluated)\);", capsys.readouterr().out) == ["saved before", "evaluated", "saved before"]


def test_a_corrupt_saved_result_is_evaluated_again(first_run, lareqa_task, translations, model, tiny_model_dir, saved, monkeypatch, capsys):
    (cut,) = saved.glob("*/LocalXQuADRBitext.json")
    cut.write_text(cut.read_text(encoding="utf-8")[:100], encoding="utf-8")  # as a disk-full write would leave it
    evaluated = counting_evaluations(monkeypatch)
    report = run_mteb(model, plan_locally(monkeypatch, tiny_model_dir, saved, tasks=local_tasks(lareqa_task, translations)))
    assert evaluated == ["LocalXQuADRBitext"] and report == first_run.report
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith(f"warning: {cut}: unreadable (") and line.endswith("); evaluating LocalXQuADRBitext again")
    assert json.loads(cut.read_text(encoding="utf-8"))["task_name"] == "LocalXQuADRBitext"  # whole again


def test_results_of_another_model_or_encoding_are_not_reused(lareqa_task, translations, tiny_model_dir, saved, tmp_path, monkeypatch):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    key = encoding_key(str(tiny_model_dir), PREFIXES, 128)
    assert encoding_key(str(other), PREFIXES, 128) == key  # the files count, not where they are
    (other / "config.json").write_text((other / "config.json").read_text(encoding="utf-8") + "\n", encoding="utf-8")
    keys = {
        key,
        encoding_key(str(other), PREFIXES, 128),  # one file changed
        encoding_key(str(tiny_model_dir), ("", ""), 128),
        encoding_key(str(tiny_model_dir), PREFIXES, 64),
    }
    assert len(keys) == 4
    assert plan_locally(monkeypatch, other, saved, tasks=local_tasks(lareqa_task, translations)).finished == {}


def test_the_stage_writes_mteb_scores_into_its_metrics_file(
    lareqa_tables, lareqa_task, model, tiny_model_dir, saved, tmp_path, monkeypatch
):
    write_raw(tmp_path, *lareqa_tables)
    params = params_with(mteb_tasks=["LocalXQuADRMultilingual"], mteb_langs=["deu"], noise=[])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    asked = []

    def resolve_locally(names, langs):  # what mteb.get_task would return for a task on the hub
        asked.append((names, langs))
        return [LocalXQuADRMultilingual(lareqa_task)]

    monkeypatch.setattr(mteb_tasks, "resolve_tasks", resolve_locally)
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "--model", str(tiny_model_dir), "--prefixes", "params", "--out", "m.json", "--mteb-results", str(saved)]
    monkeypatch.setattr("sys.argv", argv)  # as dvc.yaml's stage runs it
    evaluate.main()
    assert asked == [(["LocalXQuADRMultilingual"], ["deu"])]
    report = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert set(report) == {"machine", "prefixes", "timing", "xquad_r", "mteb"} and "noise" not in report["xquad_r"]
    assert report["prefixes"] == dict(zip(("query", "passage"), PREFIXES))
    own = own_ndcg_at_10(model, lareqa_task, PREFIXES)
    scores = report["mteb"]["LocalXQuADRMultilingual"]  # dvc: mteb.LocalXQuADRMultilingual.de.test.ndcg_at_10
    assert {lang: scores[lang]["test"]["ndcg_at_10"] for lang in LANGS} == pytest.approx(own, abs=1e-4)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"mteb_tasks": ["NoSuchRetrieval"]}, "params.yaml: evaluate.mteb_tasks: unknown MTEB task 'NoSuchRetrieval'"),
        (
            {"mteb_tasks": ["XQuADRetrievl"]},
            "params.yaml: evaluate.mteb_tasks: unknown MTEB task 'XQuADRetrievl' (did you mean XQuADRetrieval?)",
        ),
        (
            {"mteb_benchmarks": ["MTEB(Multilingual, v3)"]},
            "params.yaml: evaluate.mteb_benchmarks: unknown MTEB benchmark 'MTEB(Multilingual, v3)' (did you mean MTEB(Multilingual, v2)?)",
        ),
        ({"mteb_tasks": ["XQuADRetrieval"], "mteb_langs": ["xxx"]}, "params.yaml: evaluate.mteb_langs: Invalid language code: xxx"),
        ({"mteb_benchmarks": ["MTEB(eng, v2)"], "mteb_langs": ["qqq"]}, "params.yaml: evaluate.mteb_langs: Invalid language code: qqq"),
        (
            {"mteb_tasks": ["XQuADRetrieval"], "mteb_langs": ["fra"]},
            "params.yaml: evaluate.mteb_langs: XQuADRetrieval: No subsets were found",
        ),
        (
            {"mteb_benchmarks": ["MTEB(eng, v2)"], "mteb_langs": ["fra"]},
            "params.yaml: evaluate.mteb_langs: no task of MTEB(eng, v2) is in fra",
        ),
    ],
)
def test_bad_mteb_params_fail_with_one_line(edit, match, tmp_path):
    with pytest.raises(PipelineError, match=re.escape(match)) as err:
        plan_of(params_with(**edit), "no-model", str(tmp_path))
    assert "\n" not in str(err.value)


def test_a_benchmark_is_resolved_and_restricted_to_the_languages_asked_for():
    europe = mteb.get_benchmark("MTEB(Europe, v1)")
    subsets = {task.metadata.name: list(task.hf_subsets) for task in europe.tasks}
    (whole,) = mteb_tasks.resolve_benchmarks(["MTEB(eng, v2)"], None)
    (german,) = mteb_tasks.resolve_benchmarks(["MTEB(Europe, v1)"], ["deu"])
    assert whole.name == "MTEB(eng, v2)" and len(whole.tasks) == 41
    assert 0 < len(german.tasks) < len(europe.tasks)
    for task in german.tasks:
        assert set(task.hf_subsets) <= set(subsets[task.metadata.name])  # within the benchmark's own choice
        assert all("deu" in {code.split("-")[0] for code in task.metadata.hf_subsets_to_langscripts[subset]} for subset in task.hf_subsets)
    assert {task.metadata.name: list(task.hf_subsets) for task in europe.tasks} == subsets  # mteb's own objects untouched


def test_a_misspelt_benchmark_fails_before_the_model_loads(lareqa_tables, tmp_path, monkeypatch):
    write_raw(tmp_path, *lareqa_tables)
    params = params_with(mteb_benchmarks=["MTEB(Multilingual, v3)"], noise=[])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the MTEB params were checked")

    monkeypatch.setattr(evaluate, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["evaluate", "--model", "unused", "--out", "m.json"])
    with pytest.raises(PipelineError, match=re.escape("unknown MTEB benchmark 'MTEB(Multilingual, v3)'")):
        evaluate.main()
    assert not (tmp_path / "m.json").exists()


def test_an_mteb_task_whose_data_cannot_be_had_fails_before_any_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match=r"^MTEB task XQuADRetrieval: cannot load its data \(") as err:
        plan_of(params_with(mteb_tasks=["XQuADRetrieval"], mteb_langs=["deu"]), "no-model", str(tmp_path))
    assert "\n" not in str(err.value)
