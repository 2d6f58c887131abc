"""dvc.yaml's plots render: the custom vega templates under .dvc/plots are filled by `dvc plots show` from the
CSVs the evaluation writes (pipeline/scoring/report.py), for the fine-tuned model and its zero-shot base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.scoring.lareqa import RetrievalTask, score_task
from pipeline.scoring.report import write_plots
from tests.helpers import REPO, dvc

LANGS = ("de", "en", "es")
QUESTIONS = 12  # per language, each answered in every language
TEMPLATES = REPO / ".dvc" / "plots"
HEATMAP = "X→Y mAP, query language × passage language (colours fitted to the figures)"
DIFFERENCE = "X→Y mAP gained by fine-tuning (fine-tuned − zero-shot base)"
PREFERENCE = "Own language ranked first, per query language (language preference; chance is 1 / languages)"


def parallel_task() -> RetrievalTask:
    """Every question in every language, its answer the sentence of the same index in each language's pool."""
    n, langs = QUESTIONS, len(LANGS)
    return RetrievalTask(
        langs=list(LANGS),
        query_lang=np.repeat(np.arange(langs), n),
        query_id=np.tile([f"g{i}" for i in range(n)], langs),
        query_paragraph=np.tile([f"p{i // 2}" for i in range(n)], langs),
        query_text=[f"q{k}" for k in range(langs * n)],
        candidate_text=[f"c{k}" for k in range(langs * n)],
        pool_offsets=np.arange(langs + 1) * n,
        answers=np.tile([[lang * n + i for lang in range(langs)] for i in range(n)], (langs, 1)),
        candidate_paragraph=np.tile(np.arange(n) // 2, langs),
    )


def noisy_embeddings(rng, meaning: np.ndarray, noise: float) -> np.ndarray:
    """Each language's texts: the shared meaning, a language offset and noise, normalized."""
    rows = np.concatenate([meaning + noise * (rng.normal(size=meaning.shape[1]) + rng.normal(size=meaning.shape)) for _ in LANGS])
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def templates_in(dvc_yaml: dict) -> set[str]:
    return {plot["template"] for entry in dvc_yaml["plots"] if isinstance(entry, dict) for plot in entry.values() if "template" in plot}


def test_every_custom_template_dvc_yaml_names_is_a_vega_lite_spec_with_dvcs_data_anchor():
    custom = {path.stem for path in TEMPLATES.glob("*.json")}
    named = templates_in(yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8")))
    assert {"map_heatmap", "map_difference"} <= named and named - custom <= {"bar_horizontal"}  # DVC's own
    for name in named & custom:
        spec = json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8"))
        assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/") and spec["data"] == {"values": "<DVC_METRIC_DATA>"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A DVC project with the repository's dvc.yaml and templates, and both evaluations' plot CSVs."""
    root = tmp_path_factory.mktemp("plots")
    rng = np.random.default_rng(0)
    meaning = rng.normal(size=(QUESTIONS, 8))
    for name, noise in (("eval_base", 1.5), ("eval", 0.8)):
        queries, pool = noisy_embeddings(rng, meaning, noise), noisy_embeddings(rng, meaning, noise)
        write_plots({"xquad_r": score_task(parallel_task(), queries, pool)}, {}, root / "metrics" / f"{name}_plots")
    assert dvc(root, "init", "-q", "--no-scm").returncode == 0
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(TEMPLATES, root / ".dvc" / "plots", dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def shown(project) -> dict:
    result = dvc(project, "plots", "show", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["data"]


def spec_of(shown: dict, title: str) -> dict:
    (plot,) = shown[title]
    assert plot["type"] == "vega" and "<DVC_" not in json.dumps(plot["content"])  # every anchor filled
    return plot["content"]


@pytest.mark.slow
def test_the_heatmap_shows_both_models_with_a_colour_scale_fitted_to_the_figures(project, shown):
    spec = spec_of(shown, HEATMAP)
    values = spec["data"]["values"]
    assert {row["filename"] for row in values} == {"eval_plots/pairs.csv", "eval_base_plots/pairs.csv"}
    assert len(values) == 2 * len(LANGS) ** 2
    assert spec["spec"]["encoding"]["x"]["field"] == "passage_lang" and spec["spec"]["encoding"]["y"]["field"] == "query_lang"
    colour = spec["spec"]["layer"][0]["encoding"]["color"]
    assert colour["field"] == "map" and "domain" not in colour["scale"] and colour["scale"]["zero"] is False  # the data's extent


@pytest.mark.slow
def test_the_difference_heatmap_pairs_each_cell_of_the_fine_tuned_model_with_the_bases(project, shown):
    spec = spec_of(shown, DIFFERENCE)
    pivot = next(step for step in spec["transform"] if "pivot" in step)
    assert pivot["groupby"] == ["rev", "dataset", "passage_lang", "query_lang"]  # one cell per pair, both models' mAP in it
    cells = {}
    for row in spec["data"]["values"]:
        model = "base" if "eval_base" in row["filename"] else "tuned"
        cells.setdefault((row["query_lang"], row["passage_lang"]), {})[model] = float(row["map"])
    assert len(cells) == len(LANGS) ** 2 and all(set(cell) == {"base", "tuned"} for cell in cells.values())
    assert np.mean([cell["tuned"] - cell["base"] for cell in cells.values()]) > 0  # the less noisy "fine-tuned" embeddings gain


@pytest.mark.slow
def test_language_preference_is_a_bar_per_query_language_for_each_model(project, shown):
    values = spec_of(shown, PREFERENCE)["data"]["values"]
    assert sorted((row["filename"], row["lang"]) for row in values) == sorted(
        (f"{name}_plots/languages.csv", lang) for name in ("eval", "eval_base") for lang in LANGS
    )
    assert all(0 <= float(row["language_preference"]) <= 1 for row in values)


@pytest.mark.slow
def test_dvc_plots_show_writes_the_page_with_the_new_plots(project):
    result = dvc(project, "plots", "show", "-o", "page")
    assert result.returncode == 0, result.stderr
    page = (project / "page" / "index.html").read_text(encoding="utf-8")
    assert all(json.dumps(title)[1:-1] in page or title in page for title in (HEATMAP, DIFFERENCE, PREFERENCE))
