"""The console of a stage off a terminal (DVC's log, a pipe): progress as a line per tenth, never a
carriage-return frame, info lines that -q silences, and warnings on stderr."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pipeline import machine, params
from pipeline.common import progress, run_stage, setup_logging
from tests.helpers import REPO, stage_dir, stage_env


@pytest.fixture(autouse=True)
def default_console():
    """Each test here may change the console: the next test gets the default one back."""
    yield
    setup_logging(0)


def shown(capsys) -> tuple[list[str], str]:
    """What the console showed: stdout's lines without their timing part, and stderr."""
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    return [line.split(" [")[0] for line in out.splitlines()], err


def test_off_a_terminal_progress_is_a_line_per_tenth(capsys):
    for _ in progress(range(50), desc="loop", unit="step"):
        pass
    lines, err = shown(capsys)
    assert lines == [f"loop: {p:3d}% {p // 2}/50" for p in range(10, 101, 10)] and err == ""


def test_progress_resumed_part_way_counts_from_there_and_shows_its_postfix(capsys):
    with progress(total=10, desc="train", unit="step", initial=4) as bar:
        for _ in range(6):
            bar.set_postfix(loss="0.250")
            bar.update()
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" [")[0] for line in out] == [f"train: {p:3d}% {p // 10}/10" for p in range(50, 101, 10)]
    assert out[-1].endswith(", loss=0.250]")


def test_progress_of_unknown_total_says_once_what_was_done(capsys):
    with progress(desc="x.json", unit="B", unit_scale=True) as bar:
        bar.update(2_000_000)
        bar.update(1_500_000)
    assert shown(capsys)[0] == ["x.json: 3.50M"]


def test_a_disabled_progress_says_nothing(capsys):
    for _ in progress(range(5), desc="rank 1", disable=True):
        pass
    assert capsys.readouterr() == ("", "")


def test_warnings_go_to_stderr_even_when_quiet(monkeypatch, capsys):
    setup_logging(-1)
    monkeypatch.setattr(machine, "native_bf16", lambda device_type: False)
    machine.resolve_precision("bf16", "cpu", "train.precision")
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("warning: train.precision: bf16 on this cpu is emulated")


@pytest.mark.parametrize(("flags", "printed"), [([], ["params.yaml: "]), (["-q"], []), (["-v"], ["params.yaml: "])])
def test_q_silences_a_stages_info_lines(tmp_path, monkeypatch, capsys, flags, printed):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["params", *flags])
    run_stage(params.main)
    lines = capsys.readouterr().out.splitlines()
    assert [line[: len("params.yaml: ")] for line in lines[:1]] == printed
    assert logging.getLogger("pipeline").isEnabledFor(logging.DEBUG) is (flags == ["-v"])


@pytest.mark.slow
def test_a_stage_in_a_log_has_progress_lines_and_no_frames(tmp_path, tiny_model_dir):
    """`train` with stdout and stderr captured (not a terminal, as under `dvc repro`): ten progress lines on
    stdout, no carriage return anywhere; with -q, nothing at all."""
    cwd = stage_dir(tmp_path, tiny_model_dir, steps=10)
    command = [sys.executable, "-m", "pipeline.train"]
    run = subprocess.run(command, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stdout + run.stderr
    bars = [line.split(" [")[0] for line in run.stdout.splitlines() if line.startswith("train: ")]
    assert bars == [f"train: {p:3d}% {p // 10}/10" for p in range(10, 101, 10)]
    assert "wrote models/retriever: 10 steps" in run.stdout
    quiet = subprocess.run([*command, "-q"], cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stderr
