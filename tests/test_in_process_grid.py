"""benchmarks/in_process_grid.py: a grid run in one process equals the stages' own figures, resumes, and refuses bad grids."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.common import write_parquet
from pipeline.contracts import DEV_DIR, PAIRS_PATH, PARALLEL_CANDIDATES_PATH, PARALLEL_QUESTIONS_PATH, pairs_stamp
from tests.helpers import REPO, corpus_of, make_pairs, write_params, write_raw

pytestmark = pytest.mark.slow  # subprocesses, torchrun, dvc or a grid: `pytest -m 'not slow'` skips it

SCRIPT = REPO / "benchmarks" / "in_process_grid.py"
TINY = {"sampler.batch_size": 4, "sampler.steps": 3, "train.precision": "fp32", "evaluate.precision": "fp32", "evaluate.noise": []}


def load_script():
    spec = importlib.util.spec_from_file_location("in_process_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Path:
    """A project folder with the parallel tables, the same corpus fetched as XQuAD-R, and the tiny base model."""
    pairs = make_pairs()
    questions, candidates = corpus_of(pairs)
    write_raw(tmp_path, questions, candidates)
    write_params(tmp_path, **TINY)
    made_by = pairs_stamp("mlqa_r", 0.1)
    for table, path in zip((pairs, questions, candidates), (PAIRS_PATH, PARALLEL_QUESTIONS_PATH, PARALLEL_CANDIDATES_PATH)):
        write_parquet(table, tmp_path / path, made_by=made_by)
    for table, name in ((questions, "questions"), (candidates, "candidates")):  # the same corpus as the dev split
        write_parquet(table, tmp_path / DEV_DIR / f"{name}.parquet", made_by=made_by)
    shutil.copytree(tiny_model_dir, tmp_path / "models/base")
    return tmp_path


def run_grid(cwd: Path, grid: list, out: str = "grid.csv") -> subprocess.CompletedProcess:
    (cwd / "grid.yaml").write_text(yaml.safe_dump(grid))
    return subprocess.run([sys.executable, str(SCRIPT), "grid.yaml", "--out", out], cwd=cwd, capture_output=True, text=True, timeout=600)


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_grid_rows_equal_what_the_stages_measure_and_a_rerun_skips_finished_configs(project):
    grid = [
        {"name": "default", "set": {}},
        {"name": "hot", "set": {"train.temperature": 0.5, "sampler.negatives": "none"}},
    ]
    first = run_grid(project, grid)
    assert first.returncode == 0, first.stderr
    table = rows(project / "grid.csv")
    assert [r["name"] for r in table] == ["default", "hot"]
    default_temperature = yaml.safe_load((project / "params.yaml").read_text())["train"]["temperature"]
    assert table[1]["train.temperature"] == "0.5" and float(table[0]["train.temperature"]) == default_temperature
    # The same config through the stages, as `dvc repro batches train evaluate@retriever` runs them.
    for stage, args in (("batches", []), ("train", []), ("evaluate", ["--out", "metrics/eval.json", "--prefixes", "params"])):
        done = subprocess.run([sys.executable, "-m", "pipeline." + stage, *args], cwd=project, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    stage = json.loads((project / "metrics/eval.json").read_text())["xquad_r"]
    for figure in ("mono_map", "cross_map", "multi_map", "rank_distance"):
        assert float(table[0][f"xquad_r.{figure}"]) == pytest.approx(stage[figure], abs=1e-6), figure
    dev = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", "--dataset", "dev", "--out", "metrics/dev.json", "--prefixes", "params"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert dev.returncode == 0, dev.stderr
    on_dev = json.loads((project / "metrics/dev.json").read_text())["dev"]
    assert float(table[0]["dev.multi_map"]) == pytest.approx(
        on_dev["multi_map"], abs=1e-6
    )  # the grid chooses on what evaluate_dev measures
    trained = json.loads((project / "metrics/train.json").read_text())
    assert float(table[0]["final_loss"]) == pytest.approx(trained["final_loss"], abs=1e-6)
    # The override was trained with: a tiny model's mAP may not move at six digits, its loss at temperature 0.5 does.
    assert abs(float(table[1]["final_loss"]) - float(table[0]["final_loss"])) > 0.1
    grid.append({"name": "more", "set": {"train.temperature": 0.2}})  # the same columns: appended
    again = run_grid(project, grid)
    assert again.returncode == 0, again.stderr
    assert "2 already in grid.csv" in again.stdout and "[1/1] more" in again.stdout
    assert [r["name"] for r in rows(project / "grid.csv")] == ["default", "hot", "more"]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([{"name": "a", "set": {"train.lrr": 1.0}}], "grid.yaml: a: 'train.lrr' is not a parameter"),
        ([{"name": "a", "set": {"sampler.ratio": 2.0}}], "sampler.ratio"),
        ([{"name": "a"}, {"name": "a"}], "entry 2: name 'a' used twice"),
        ([], "expected a non-empty list"),
        (
            [{"name": "a"}, {"name": "b", "set": {"evaluate.langs": ["en"]}}],
            "the same evaluate.datasets, evaluate.langs, data.train and data.dev_share",
        ),
    ],
)
def test_bad_grids_are_one_line_before_any_training(project, grid, message):
    done = run_grid(project, grid)
    assert done.returncode != 0
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (project / "grid.csv").exists()


def test_a_csv_of_another_grid_is_refused_not_mixed(tmp_path):
    out = tmp_path / "grid.csv"
    out.write_text("name,train.lr\nold,0.1\n")
    module = load_script()
    with pytest.raises(module.PipelineError, match="its columns are another grid's"):
        module.append_row(out, {"name": "new", "train.temperature": 0.01})
    assert out.read_text() == "name,train.lr\nold,0.1\n"
