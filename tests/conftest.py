"""Shared test helpers: where the offline data mirror is."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mirror_root() -> Path:
    """The data mirror: $HYBRIDIR_MIRROR, else ../shared/mirror beside the checkout."""
    return Path(os.environ.get("HYBRIDIR_MIRROR", REPO.parent / "shared" / "mirror"))


def mirror_file(relative: str) -> Path:
    path = mirror_root() / relative
    if not path.exists():
        pytest.skip(f"data mirror not found ({path}); set HYBRIDIR_MIRROR")
    return path
