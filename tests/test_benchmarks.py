"""Every script in benchmarks/ runs, in a tiny mode, on the files the default pipeline writes.

A benchmark nobody runs rots (train_speed.py failed on the plan once hard negatives became the
default, issue #25): each one runs here as a user would, from the repository root of a tiny
project (the tiny model, a plan with the default sampler's hard negatives, an XQuAD-R slice),
and must end with the figures and the machine line it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import fetch
from pipeline.common import write_parquet
from pipeline.contracts import DEV_DIR, pairs_stamp
from pipeline.params import load_params
from tests.helpers import REPO, mirror_file, stage_dir, write_raw

pytestmark = pytest.mark.slow

LANGS = ("en", "de")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project root as `dvc repro batches` and `fetch` leave it: params, parallel tables, a plan of
    3 batches of 4 with the default negatives, models/base (the tiny model), data/raw/xquad_r (1 article)."""
    root = stage_dir(tmp_path_factory.mktemp("bench"), tiny_model_dir, steps=3)
    parsed = []
    for lang in LANGS:
        doc = json.loads(mirror_file(f"lareqa/xquad-r/{lang}.json").read_text(encoding="utf-8"))
        parsed.append(fetch.parse_lareqa({"data": doc["data"][:1]}, lang, lang))
    params = (root / "params.yaml").read_text(encoding="utf-8")
    questions, candidates = fetch.link_across_languages(pa.concat_tables([q for q, _ in parsed])), pa.concat_tables([c for _, c in parsed])
    write_raw(root, questions, candidates)
    (root / "params.yaml").write_text(params, encoding="utf-8")  # stage_dir's, not the repository's
    checked = load_params(root / "params.yaml")
    for table, name in ((questions, "questions"), (candidates, "candidates")):  # the article as a dev split too
        write_parquet(table, root / DEV_DIR / f"{name}.parquet", made_by=pairs_stamp(checked.data.train, checked.data.dev_share))
    return root


def run_benchmark(cwd: Path, script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "machine: " in done.stdout, f"{script} names no machine"
    return done.stdout


def test_train_speed_on_the_default_plan_with_hard_negatives(project):
    out = run_benchmark(project, "train_speed.py", "--steps", "2", "--rounds", "1")
    assert "with the plan's hard negatives" in out
    assert "ours-bf16 / ours (fp32):" in out
    assert "auto -> " in out and ("PASS" in out.split("auto -> ")[1] or "FAIL" in out.split("auto -> ")[1])


def test_train_speed_against_sentence_transformers_trainer(project):
    out = run_benchmark(project, "train_speed.py", "--steps", "1", "--rounds", "1", "--runners", "ours,st")
    assert "without hard negatives" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ours ") or line.startswith("  st ")] == ["ours", "st"]


def test_eval_speed(project):
    out = run_benchmark(
        project, "eval_speed.py", "--limit", "4", "--rounds", "1", "--batch-sizes", "4", "--factor", "2", "--langs", ",".join(LANGS)
    )
    assert "(c) evaluate_task" in out and "bf16 - fp32 Mo. mAP" in out
    assert "auto picks " in out


def test_cached_batch(project):
    out = run_benchmark(project, "cached_batch.py", "--batch-size", "8", "--chunk-size", "4")
    assert "cached-8/4" in out and "throughput cost of caching" in out


def test_in_process_grid(project):
    grid = project / "grid.yaml"
    grid.write_text(
        "- name: tiny\n  set: {sampler.steps: 2, evaluate.langs: [en, de], evaluate.noise: []}\n",
        encoding="utf-8",
    )
    out = run_benchmark(project, "in_process_grid.py", str(grid), "--out", "grid.csv", "--queries", "grid_queries")
    assert "[1/1] tiny:" in out
    header, row = (project / "grid.csv").read_text(encoding="utf-8").splitlines()
    assert {"dev.mono_map", "xquad_r.mono_map", "machine"} <= set(header.split(","))
    assert sorted(path.name for path in (project / "grid_queries" / "tiny").iterdir()) == ["dev.parquet", "xquad_r.parquet"]


def test_translate_speed_tiny(tmp_path):
    out = run_benchmark(
        tmp_path, "translate_speed.py", "--tiny", "--workdir", str(tmp_path / "nllb"), "--sentences", "4", "--new-tokens", "4"
    )
    assert "ctranslate2 int8" in out and "transformers fp32" in out and "x tokens/s" in out


def test_eval_backends_torch_paths(project):
    """OpenVINO, NNCF and ONNX Runtime are not dependencies (docs/benchmarks.md): here the script's torch
    backends and its accuracy check run; the other backends are measured where those are installed."""
    out = run_benchmark(
        project, "eval_backends.py", "--backends", "torch-fp32,torch-bf16", "--texts", "12", "--rounds", "1",
        "--more-batch-sizes", "8", "--langs", ",".join(LANGS), "--limit", "4", "--speed-gate", "0",
    )  # fmt: skip
    assert "(a, b) 12 distinct en texts" in out and "(c) LAReQA xquad_r" in out
    assert [
        line.split()[0] for line in out.splitlines() if line.startswith("    torch-") and "texts/s" not in line and "encoded" not in line
    ][:2] == [
        "torch-fp32",
        "torch-bf16",
    ]
    assert "openvino -" in out  # not installed here: said, not failed


def test_every_benchmark_script_is_run_here():
    tested = {name for name in Path(__file__).read_text(encoding="utf-8").split('"') if name.endswith(".py")}
    assert {path.name for path in (REPO / "benchmarks").glob("*.py")} <= tested
