"""dvc.yaml lists exactly the code each stage runs: every project module its command imports
(transitively, within pipeline/) is a dependency, and every listed module is imported.

An edit to a module a stage imports must rerun the stage; an edit to one it does not must not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

PACKAGE = REPO / "pipeline"


def imported_modules(module: str, package: Path = PACKAGE, seen: set[str] | None = None) -> set[str]:
    """`module` and every pipeline module it imports, at any depth, at module or function level."""
    seen = set() if seen is None else seen
    if module in seen or not (package / f"{module}.py").exists():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse((package / f"{module}.py").read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
            names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("pipeline.")]
        for name in names:
            imported_modules(name, package, seen)
    return seen


def stage_modules(dvc_yaml: dict) -> dict[str, tuple[str, set[str]]]:
    """stage -> (the module its command runs, the pipeline modules it lists as deps)."""
    stages = {}
    for name, stage in dvc_yaml["stages"].items():
        command = re.search(r"python -m pipeline\.(\w+)", stage["cmd"])
        assert command, f"stage {name}: its command is not `python -m pipeline.<module>`"
        listed = {Path(dep).stem for dep in stage.get("deps", []) if dep.startswith("pipeline/")}
        stages[name] = (command.group(1), listed)
    return stages


def dependency_errors(dvc_yaml: dict, package: Path = PACKAGE) -> list[str]:
    errors = []
    for name, (module, listed) in stage_modules(dvc_yaml).items():
        imported = imported_modules(module, package)
        errors += [f"{name}: imports pipeline/{m}.py but does not list it" for m in sorted(imported - listed)]
        errors += [f"{name}: lists pipeline/{m}.py but does not import it" for m in sorted(listed - imported)]
    return errors


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


def test_every_stage_lists_exactly_the_modules_it_imports(dvc_yaml):
    assert dependency_errors(dvc_yaml) == []


def test_a_removed_or_stale_dependency_is_found(dvc_yaml):
    stage = dvc_yaml["stages"]["train"]
    removed = [dep for dep in stage["deps"] if dep != "pipeline/contracts.py"]
    assert dependency_errors({"stages": {"train": {**stage, "deps": removed}}}) == [
        "train: imports pipeline/contracts.py but does not list it"
    ]
    stale = [*stage["deps"], "pipeline/batches.py"]
    assert dependency_errors({"stages": {"train": {**stage, "deps": stale}}}) == ["train: lists pipeline/batches.py but does not import it"]


def test_imports_are_followed_through_modules_and_functions(tmp_path):
    (tmp_path / "a.py").write_text("from pipeline import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pipeline.c import x\n")
    (tmp_path / "c.py").write_text("import os\nimport pipeline.d\n")
    (tmp_path / "d.py").write_text("")
    (tmp_path / "e.py").write_text("")
    assert imported_modules("a", tmp_path) == {"a", "b", "c", "d"}


def test_evaluations_depend_on_the_data_they_evaluate_only(dvc_yaml):
    """Changing data.train must not rerun the zero-shot evaluation: it reads data/raw/xquad_r alone."""
    for name in ("evaluate", "evaluate_base"):
        data = [dep for dep in dvc_yaml["stages"][name]["deps"] if dep.startswith("data/")]
        assert data == ["data/raw/xquad_r"], name
