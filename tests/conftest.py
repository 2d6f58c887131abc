"""Fixtures shared by every test module; the builders themselves are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from pipeline.common import setup_logging
from tests.helpers import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight sentence-transformers model directory (32-dim, normalized), built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def stage_command_line(monkeypatch):
    """A stage's `main()` called in-process parses sys.argv: give it the bare command, not pytest's."""
    monkeypatch.setattr("sys.argv", ["stage"])


@pytest.fixture(autouse=True, scope="session")
def stage_console():
    """The console a stage sets up (info lines to stdout, warnings to stderr), for library code a test calls
    directly, module fixtures included (tests/test_console.py sets it up again after changing it)."""
    setup_logging(0)


# Property tests draw the same examples on every run, so CI cannot fail one run in twenty;
# `HYPOTHESIS_PROFILE=explore pytest` searches new examples.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
