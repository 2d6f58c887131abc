"""Fixtures shared by every test module; the builders themselves are in tests/helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight sentence-transformers model directory (32-dim, normalized), built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
