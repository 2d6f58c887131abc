"""MTEB through the `evaluate` stage, offline: a slice of XQuAD-R from the mirror wrapped as an
MTEB retrieval task defined here (no hub), scored by `mteb` and by the project's own code."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline import evaluate, fetch
from pipeline.common import PipelineError
from pipeline.encoding import load_model
from pipeline.lareqa import RetrievalTask, build_task
from pipeline.metrics import ndcg_at_k, ranks_of
from pipeline.mteb_tasks import resolve_tasks, run_tasks
from tests.helpers import REPO, mirror_file, write_raw

mteb = pytest.importorskip("mteb")
from datasets import Dataset  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

LANGS = {"en": "eng-Latn", "de": "deu-Latn", "es": "spa-Latn"}
PREFIXES = ("query: ", "passage: ")


@pytest.fixture(scope="module")
def lareqa_tables() -> tuple[pa.Table, pa.Table]:
    """One XQuAD-R article in en, de, es: ~220 questions, a multilingual pool of 64 sentences."""
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


class LocalXQuADRMultilingual(AbsTaskRetrieval):
    """XQuAD-R's multilingual setting as an MTEB task: a subset per query language, all of them
    searching one pool of every language, each answer sentence in any language relevant."""

    metadata = TaskMetadata(
        name="LocalXQuADRMultilingual",
        description="A slice of XQuAD-R (LAReQA) from the local mirror.",
        reference="https://github.com/google-research-datasets/lareqa",
        dataset={"path": "local/xquad-r", "revision": "mirror"},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs={lang: [code] for lang, code in LANGS.items()},
        main_score="ndcg_at_10",
        date=None,
        domains=None,
        task_subtypes=None,
        license="cc-by-sa-4.0",
        annotations_creators="human-annotated",
        dialect=None,
        sample_creation="human-translated",
        bibtex_citation="",
    )

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


def own_ndcg_at_10(model, task: RetrievalTask, prefixes: tuple[str, str]) -> dict[str, float]:
    """The project's computation: encode once, score every query against the pool, nDCG@10 from ranks."""
    result = evaluate.evaluate_task(model, task, prefixes, batch_size=16)
    per_query = ndcg_at_k(ranks_of(result.queries @ result.pool.T, task.answers), 10)
    return {lang: float(per_query[task.query_lang == x].mean()) for x, lang in enumerate(task.langs)}


def test_mteb_ndcg_matches_the_projects_own_within_1e4(lareqa_task, tiny_model_dir):
    model = load_model(str(tiny_model_dir), 128)
    report = run_tasks(model, [LocalXQuADRMultilingual(lareqa_task)], PREFIXES, batch_size=16)

    assert set(report) == {"LocalXQuADRMultilingual"}
    subsets = report["LocalXQuADRMultilingual"]
    assert set(subsets) == set(LANGS)
    own = own_ndcg_at_10(model, lareqa_task, PREFIXES)
    for lang in LANGS:
        scores = subsets[lang]["test"]
        assert set(scores) == {"ndcg_at_10", "recall_at_100"}
        assert scores["ndcg_at_10"] == pytest.approx(own[lang], abs=1e-4), lang
        assert scores["recall_at_100"] == 1.0  # 64 candidates: every answer is in the top 100
    # the prefixes reach mteb's encoder: without them our own figure moves away
    unprefixed = own_ndcg_at_10(model, lareqa_task, ("", ""))
    assert max(abs(unprefixed[lang] - own[lang]) for lang in LANGS) > 1e-3
    assert report == json.loads(json.dumps(report))  # plain JSON for the metrics file


def test_the_stage_writes_mteb_scores_into_its_metrics_file(lareqa_tables, lareqa_task, tiny_model_dir, tmp_path, monkeypatch):
    write_raw(tmp_path, *lareqa_tables)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["evaluate"].update(mteb_tasks=["LocalXQuADRMultilingual"], mteb_langs=["deu"], noise=[])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    asked = []

    def resolve_locally(names, langs):  # what mteb.get_task would return for a task on the hub
        asked.append((names, langs))
        return [LocalXQuADRMultilingual(lareqa_task)]

    monkeypatch.setattr(evaluate, "resolve_tasks", resolve_locally)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["evaluate", "--model", str(tiny_model_dir), "--out", "m.json"])
    evaluate.main()
    assert asked == [(["LocalXQuADRMultilingual"], ["deu"])]
    report = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert set(report) == {"precision", "xquad_r", "mteb"} and "noise" not in report["xquad_r"]
    own = own_ndcg_at_10(load_model(str(tiny_model_dir), 128), lareqa_task, PREFIXES)
    scores = report["mteb"]["LocalXQuADRMultilingual"]  # dvc: mteb.LocalXQuADRMultilingual.de.test.ndcg_at_10
    assert {lang: scores[lang]["test"]["ndcg_at_10"] for lang in LANGS} == pytest.approx(own, abs=1e-4)


@pytest.mark.parametrize(
    ("names", "langs", "match"),
    [
        (["NoSuchRetrieval"], None, "params.yaml: evaluate.mteb_tasks: unknown MTEB task 'NoSuchRetrieval'"),
        (["XQuADRetrieval"], ["xxx"], "params.yaml: evaluate.mteb_langs: XQuADRetrieval: Invalid language code: xxx"),
        (["XQuADRetrieval"], ["fra"], "params.yaml: evaluate.mteb_langs: XQuADRetrieval: No subsets were found"),
        (["STS22"], None, "params.yaml: evaluate.mteb_tasks: STS22 is a STS task; only retrieval tasks"),
    ],
)
def test_bad_mteb_params_fail_with_one_line(names, langs, match):
    with pytest.raises(PipelineError, match=re.escape(match)) as err:
        resolve_tasks(names, langs)
    assert "\n" not in str(err.value)


def test_an_mteb_task_whose_data_cannot_be_had_fails_before_any_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match=r"^MTEB task XQuADRetrieval: cannot load its data \(") as err:
        resolve_tasks(["XQuADRetrieval"], ["deu"])
    assert "\n" not in str(err.value)
