"""Stages killed with SIGKILL mid-write or mid-run, resumption, and run-to-run determinism."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline import train
from pipeline.common import write_parquet
from pipeline.contracts import PLAN_PATH, pairs_stamp
from pipeline.training.planned import plan_texts
from tests.helpers import (
    CONFIG,
    SEED,
    dvc,
    files_under,
    git,
    init_dvc_project,
    load,
    make_pairs,
    make_plan,
    repo_stages,
    stage_dir,
    stage_env,
    stage_outputs,
    write_params,
)

pytestmark = pytest.mark.slow  # subprocesses, torchrun, dvc or a grid: `pytest -m 'not slow'` skips it

# Runs a stage with one library call replaced by "write part of the output, then die".
DIE_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow.parquet
    from sentence_transformers import SentenceTransformer

    def die(where):
        os.makedirs(os.path.dirname(where) or ".", exist_ok=True)
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


@pytest.mark.parametrize(
    ("stage", "outputs"),
    [("batches", ["data/batches/plan.parquet"]), ("train", ["models/retriever"])],
)
def test_a_stage_killed_mid_write_leaves_the_previous_output_whole(tmp_path, tiny_model_dir, stage, outputs):
    cwd = stage_dir(tmp_path, tiny_model_dir)
    first = subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = files_under(cwd, *outputs)
    assert before
    killed = subprocess.run([sys.executable, "-c", DIE_MID_WRITE, stage], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert files_under(cwd, *outputs) == before
    if stage == "batches":
        assert pq.read_table(cwd / outputs[0]).num_rows == 12
    else:
        assert load(cwd / outputs[0]).encode(["query: still loads"]).shape == (1, 32)


# Runs `train --resume` with a kill planted right after the checkpoint of step KILL_AFTER is saved:
# deterministic, whatever the machine's speed (a timed kill is not).
KILLED_AFTER_CHECKPOINT = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline import train
    from pipeline.common import run_stage

    save, kill_after, signal_to_send = train.save_checkpoint, int(sys.argv[1]), sys.argv[2]

    def save_then_die(path, step, *args, **kwargs):
        save(path, step, *args, **kwargs)
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL if signal_to_send == "kill" else signal.SIGINT)

    train.save_checkpoint = save_then_die  # the name train's loop calls
    sys.argv = ["train", "--resume"]
    run_stage(train.main)
    """
)
TRAIN = [sys.executable, "-m", "pipeline.train", "--resume"]


def _loss_steps(cwd: Path) -> list[int]:
    rows = (cwd / "metrics/train_live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    return [int(row.split("\t")[0]) for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Path:
    cwd = stage_dir(tmp_path_factory.mktemp("uninterrupted"), tiny_model_dir, steps=12)
    result = subprocess.run(TRAIN, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return cwd


def _same_weights(a: Path, b: Path) -> None:
    first, second = (load(d / "models/retriever").state_dict() for d in (a, b))
    for name, weight in first.items():
        assert torch.allclose(weight, second[name], atol=1e-6), name


TRAIN_OUTPUTS = [*stage_outputs("train"), "metrics/train_live"]  # and the rest of the live log


def _previous_outputs(cwd: Path, uninterrupted: Path) -> dict[str, bytes]:
    """A finished run's outputs put in `cwd`, as a rerun finds them; returns them."""
    shutil.copytree(uninterrupted / "models/retriever", cwd / "models/retriever")
    shutil.copytree(uninterrupted / "metrics", cwd / "metrics")
    return files_under(cwd, *TRAIN_OUTPUTS)


@pytest.mark.parametrize("previous", ["kept", "removed by dvc"])
def test_train_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model_dir, uninterrupted, previous):
    """SIGKILL right after step 4's checkpoint, then `--resume` (what `dvc repro` runs): the outputs the
    kill found are as they were (the live log too), and the rerun gives the same weights as a run never
    killed, with whole curves and no step twice."""
    cwd = stage_dir(tmp_path, tiny_model_dir, steps=12)
    before = _previous_outputs(cwd, uninterrupted) if previous == "kept" else {}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_CHECKPOINT, "4", "kill"], cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert files_under(cwd, *TRAIN_OUTPUTS) == before
    result = subprocess.run(TRAIN, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((cwd / "metrics/train.json").read_text())["resumed_from_step"] == 4
    _same_weights(uninterrupted, cwd)
    assert _loss_steps(cwd) == list(range(1, 13))
    assert (cwd / "metrics/train_live/plots/metrics/train/loss.tsv").read_text() == (
        uninterrupted / "metrics/train_live/plots/metrics/train/loss.tsv"
    ).read_text()
    assert not [path.name for path in (cwd / "metrics").iterdir() if path.name.endswith(".tmp")]  # what the kill left is gone


def test_a_corrupt_checkpoint_is_ignored_with_one_line(tmp_path, tiny_model_dir, uninterrupted):
    cwd = stage_dir(tmp_path, tiny_model_dir, steps=12)
    checkpoint = cwd / train.CHECKPOINT_PATH
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"PK\x03\x04 half a zip archive")  # killed mid-save where rename is not atomic
    result = subprocess.run(TRAIN, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "checkpoint" in line]
    assert line.startswith(f"warning: {train.CHECKPOINT_PATH}: unusable checkpoint (PytorchStreamReader failed reading zip archive")
    assert line.endswith("); ignored, training from step 0")
    assert json.loads((cwd / "metrics/train.json").read_text())["resumed_from_step"] == 0
    _same_weights(uninterrupted, cwd)


def test_ctrl_c_during_train_is_one_line_and_exit_130_and_replaces_no_output(tmp_path, tiny_model_dir, uninterrupted):
    """ "no output of this stage was replaced" holds for every output dvc.yaml declares, the live log too (issue 27)."""
    cwd = stage_dir(tmp_path, tiny_model_dir, steps=12)
    before = _previous_outputs(cwd, uninterrupted)
    result = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_CHECKPOINT, "2", "interrupt"],
        cwd=cwd,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 130
    assert result.stderr.strip().splitlines()[-1] == "interrupted: no output of this stage was replaced"
    assert "Traceback" not in result.stderr
    assert files_under(cwd, *TRAIN_OUTPUTS) == before
    assert torch.load(cwd / train.CHECKPOINT_PATH, weights_only=True)["step"] == 2  # rerun resumes from it


def test_training_twice_with_one_seed_gives_the_same_weights_on_cpu(tiny_model_dir):
    pairs = make_pairs()
    batches = plan_texts(make_plan(pairs, steps=4), pairs, "query: ", "passage: ")
    runs = []
    for _ in range(2):
        model = load(tiny_model_dir)
        summary = train.train(model, batches, CONFIG, SEED)
        runs.append((summary["final_loss"], model.state_dict()))
    (loss_a, a), (loss_b, b) = runs
    assert abs(loss_a - loss_b) < 1e-6
    for name, weight in a.items():
        assert torch.allclose(weight, b[name], atol=1e-6), name


def test_under_dvc_repro_a_failing_stage_says_how_to_get_its_outputs_back(tmp_path):
    """DVC deletes a stage's outputs before running it: the error line names `dvc checkout`, which restores them."""
    cwd = tmp_path
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=cwd, check=True)
    small = {"sampler.batch_size": 4, "sampler.steps": 3, "sampler.negatives": "none"}  # no candidates table here
    params = write_params(cwd, **small)
    pairs = make_pairs()
    write_parquet(pairs, cwd / "data/parallel/pairs.parquet", made_by=pairs_stamp(params["data"]["train"], params["data"]["dev_share"]))
    (cwd / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"batches": {
        "cmd": f"{sys.executable} -m pipeline.batches", "deps": ["data/parallel/pairs.parquet"],
        "params": ["seed", "sampler"], "outs": ["data/batches/plan.parquet"],
        "metrics": [{"metrics/batches.json": {"cache": False}}],
    }}}))  # fmt: skip
    repro = [sys.executable, "-m", "dvc", "repro", "-q"]
    assert subprocess.run(repro, cwd=cwd, capture_output=True, text=True).returncode == 0
    plan = (cwd / "data/batches/plan.parquet").read_bytes()
    write_params(cwd, **small, **{"sampler.ratio": "0.5"})
    failed = subprocess.run(repro, cwd=cwd, capture_output=True, text=True)
    assert failed.returncode != 0
    ours = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [
        "error: params.yaml: sampler.ratio: expected a number, got the string '0.5' (dvc removed this stage's outputs before "
        "running it: `dvc checkout batches` restores data/batches/plan.parquet; `git checkout -- metrics/batches.json` restores "
        "the rest as last committed)"
    ]
    assert not (cwd / "data/batches/plan.parquet").exists()  # what the line warns of
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "-q", "batches"], cwd=cwd, check=True)
    assert (cwd / "data/batches/plan.parquet").read_bytes() == plan


# base_model's stand-in: the tiny model as models/base (the stage's outputs, deps and params are its own)
BASE_MODEL_STAND_IN = "mkdir -p models metrics && cp -r tiny_model models/base && echo '{}' > metrics/base_model.json"


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_model_dir) -> Path:
    """A git + DVC project of the repository's params, base_model, mine, batches and train stages, reproduced and committed."""
    root = stage_dir(tmp_path_factory.mktemp("reproduced"), tiny_model_dir, steps=3)
    shutil.move(root / "models/base", root / "tiny_model")
    (root / PLAN_PATH).unlink()  # the batches stage makes it
    init_dvc_project(root, repo_stages("params", "base_model", "mine", "batches", "train", commands={"base_model": BASE_MODEL_STAND_IN}))
    result = dvc(root, "repro")
    assert result.returncode == 0, result.stderr
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "reproduced")
    return root


@pytest.fixture
def project(reproduced, tmp_path) -> Path:
    shutil.copytree(reproduced, tmp_path / "project", symlinks=True)
    return tmp_path / "project"


def _set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    *groups, name = dotted.split(".")
    node = params
    for group in groups:
        node = node[group]
    node[name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def _our_errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_a_param_with_no_effect_is_reported_and_reruns_nothing_after_the_plan(project):
    """sampler.order under the hybrid schedule (issue 27): said so, the plan comes out byte-identical, so DVC skips train."""
    before = files_under(project, PLAN_PATH, "metrics", "models/retriever")
    _set_param(project, "sampler.order", "cross_first")
    result = dvc(project, "repro")
    assert result.returncode == 0, result.stderr
    assert "batches: no effect on the plan, left out of its stamp: sampler.order (sampler.schedule is hybrid)" in result.stdout
    assert "Running stage 'batches'" in result.stdout and "Running stage 'train'" not in result.stdout
    assert files_under(project, PLAN_PATH, "metrics", "models/retriever") == before
    assert dvc(project, "status", "-q").returncode == 0  # everything up to date


def test_a_bad_param_stops_dvc_repro_before_any_output_is_removed(project):
    """model.query_prefix: null, then `dvc repro train` (issue 27): the params stage, upstream of every stage,
    refuses it before DVC removes base_model's outputs (models/base, metrics/base_model.json) or train's."""
    kept = ["models/base", "metrics/base_model.json", *stage_outputs("train"), *stage_outputs("batches")]
    before = files_under(project, *kept)
    _set_param(project, "model.query_prefix", None)
    result = dvc(project, "repro", "train")
    assert result.returncode != 0
    assert _our_errors(result) == [
        "error: params.yaml: model.query_prefix: expected a string, got null (dvc removed this stage's outputs before running "
        "it: `dvc checkout params` restores data/checked/params.ok)"
    ]
    assert files_under(project, *kept) == before


def test_a_stage_failing_under_dvc_repro_says_exactly_how_to_restore_each_output(project):
    """A data error in train under `dvc repro`: DVC has removed train's outputs; the line's two commands bring every one back."""
    outputs = stage_outputs("train")
    before = files_under(project, *outputs)
    weights = project / "models/base/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = dvc(project, "repro", "--single-item", "--force", "train")
    assert result.returncode != 0
    assert _our_errors(result) == [
        "error: models/base/model.safetensors: truncated or corrupt (fewer bytes than its header lists) (run `dvc repro "
        "base_model`) (dvc removed this stage's outputs before running it: `dvc checkout train` restores models/retriever; "
        "`git checkout -- metrics/train.json metrics/train_live/plots/metrics` restores the rest as last committed)"
    ]
    assert files_under(project, *outputs) == {}  # what the line warns of
    assert dvc(project, "checkout", "train").returncode == 0
    git(project, "checkout", "--", "metrics/train.json", "metrics/train_live/plots/metrics")
    assert files_under(project, *outputs) == before
