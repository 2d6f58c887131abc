"""Stages killed with SIGKILL mid-write or mid-run, resumption, and run-to-run determinism."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline import train
from pipeline.common import write_parquet
from tests.helpers import CONFIG, load, make_pairs, make_plan, stage_dir

# Runs a stage with one library call replaced by "write part of the output, then die".
DIE_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow.parquet
    from sentence_transformers import SentenceTransformer

    def die(where):
        with open(where, "wb") as f:
            f.write(b"PAR1 half an output")
        os.kill(os.getpid(), signal.SIGKILL)

    pyarrow.parquet.write_table = lambda table, where, **kw: die(where)
    SentenceTransformer.save = lambda self, path, *a, **kw: die(os.path.join(path, "model.safetensors"))
    sys.argv = [sys.argv[1]]
    from pipeline.common import run_stage
    import importlib
    run_stage(importlib.import_module("pipeline." + sys.argv[0]).main)
    """
)


def _outputs(root: Path, relative: list[str]) -> dict[str, bytes]:
    files = {}
    for rel in relative:
        path = root / rel
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                files[str(f.relative_to(root))] = f.read_bytes()
    return files


@pytest.mark.parametrize(
    ("stage", "outputs"),
    [("batches", ["data/batches/plan.parquet"]), ("train", ["models/retriever"])],
)
def test_a_stage_killed_mid_write_leaves_the_previous_output_whole(tmp_path, tiny_model_dir, stage, outputs):
    cwd = stage_dir(tmp_path, tiny_model_dir)
    first = subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = _outputs(cwd, outputs)
    assert before
    killed = subprocess.run([sys.executable, "-c", DIE_MID_WRITE, stage], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _outputs(cwd, outputs) == before
    if stage == "batches":
        assert pq.read_table(cwd / outputs[0]).num_rows == 12
    else:
        assert load(cwd / outputs[0]).encode(["query: still loads"]).shape == (1, 32)


def test_train_killed_by_sigkill_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    """A real kill: SIGKILL as soon as the first checkpoint exists, then `--resume` (what dvc repro runs)."""
    runs = {}
    for name in ("uninterrupted", "killed"):
        (tmp_path / name).mkdir()
        cwd = stage_dir(tmp_path / name, tiny_model_dir)
        pairs = make_pairs()
        params = yaml.safe_load((cwd / "params.yaml").read_text())
        params["sampler"].update(steps=40)
        (cwd / "params.yaml").write_text(yaml.safe_dump(params))
        write_parquet(make_plan(pairs, steps=40), cwd / "data/batches/plan.parquet", made_by={"seed": params["seed"], "sampler": params["sampler"]})
        command = [sys.executable, "-m", "pipeline.train", "--resume"]
        if name == "killed":
            proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            checkpoint = cwd / train.CHECKPOINT_PATH
            deadline = time.monotonic() + 240
            while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
            assert not (cwd / "models/retriever").exists()
            step = torch.load(checkpoint, weights_only=False)["step"]
            assert 2 <= step < 40
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        runs[name] = cwd
    summary = json.loads((runs["killed"] / "metrics/train.json").read_text())
    assert summary["resumed_from_step"] >= 2 and summary["steps"] == 40
    a, b = (load(runs[n] / "models/retriever").state_dict() for n in ("uninterrupted", "killed"))
    for name, weight in a.items():
        assert torch.allclose(weight, b[name], atol=1e-6), name


def test_training_twice_with_one_seed_gives_the_same_weights_on_cpu(tiny_model_dir):
    pairs = make_pairs()
    queries, passages = train.plan_texts(make_plan(pairs, steps=4), pairs, "query: ", "passage: ")
    runs = []
    for _ in range(2):
        model = load(tiny_model_dir)
        summary = train.train(model, queries, passages, CONFIG)
        runs.append((summary["final_loss"], model.state_dict()))
    (loss_a, a), (loss_b, b) = runs
    assert abs(loss_a - loss_b) < 1e-6
    for name, weight in a.items():
        assert torch.allclose(weight, b[name], atol=1e-6), name
