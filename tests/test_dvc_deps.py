"""dvc.yaml lists exactly the code each stage runs: every project module its command imports
(transitively, within pipeline/ and its subpackages) is a dependency, and every listed module is imported.

An edit to a module a stage imports must rerun the stage; an edit to one it does not must not.
The `params` stage's output is a dependency of every other stage, so params.yaml is checked whole
before DVC removes any stage's outputs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.contracts import PARAMS_CHECKED_PATH
from pipeline.params import EXECUTION, GROUPS, SCHEMA
from tests.helpers import REPO

PACKAGE = REPO / "pipeline"


def module_file(dotted: str, package: Path = PACKAGE) -> Path | None:
    """pipeline/a/b.py for `pipeline.a.b` (a package's __init__.py holds only its docstring, tests/test_layers.py)."""
    path = package.joinpath(*dotted.split(".")[1:]).with_suffix(".py")
    return path if path.is_file() else None


def imported_modules(module: str, package: Path = PACKAGE, seen: set[str] | None = None) -> set[str]:
    """`module` (dotted, `pipeline.x.y`) and every pipeline module it imports, at any depth, at module or function level."""
    seen = set() if seen is None else seen
    path = module_file(module, package)
    if module in seen or path is None:
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "pipeline" or node.module.startswith("pipeline.")):
            # `from pipeline.scoring import lareqa` imports a module; `from pipeline.scoring.lareqa import x` a name from one
            names = [f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}", package) else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("pipeline.")]
        for name in names:
            imported_modules(name, package, seen)
    return seen


def as_path(module: str) -> str:
    return "pipeline/" + "/".join(module.split(".")[1:]) + ".py"


def stages_of(dvc_yaml: dict) -> dict[str, dict]:
    """Every stage, a `foreach` stage's body once under its group name (its items share the command's module)."""
    return {name: stage.get("do", stage) for name, stage in dvc_yaml["stages"].items()}


def stage_modules(dvc_yaml: dict) -> dict[str, tuple[str, set[str]]]:
    """stage -> (the module its command runs, the pipeline module files it lists as deps)."""
    stages = {}
    for name, stage in stages_of(dvc_yaml).items():
        command = re.search(r"python -m (pipeline\.[\w.]+)", stage["cmd"])
        assert command, f"stage {name}: its command is not `python -m pipeline.<module>`"
        listed = {dep for dep in stage.get("deps", []) if dep.startswith("pipeline/") and dep.endswith(".py")}
        stages[name] = (command.group(1), listed)
    return stages


def dependency_errors(dvc_yaml: dict, package: Path = PACKAGE) -> list[str]:
    errors = []
    for name, (module, listed) in stage_modules(dvc_yaml).items():
        imported = {as_path(m) for m in imported_modules(module, package)}
        errors += [f"{name}: imports {m} but does not list it" for m in sorted(imported - listed)]
        errors += [f"{name}: lists {m} but does not import it" for m in sorted(listed - imported)]
    return errors


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


def test_every_stage_lists_exactly_the_modules_it_imports(dvc_yaml):
    assert dependency_errors(dvc_yaml) == []


def test_a_removed_or_stale_dependency_is_found(dvc_yaml):
    stage = dvc_yaml["stages"]["train"]
    removed = [dep for dep in stage["deps"] if dep != "pipeline/training/loss.py"]
    assert dependency_errors({"stages": {"train": {**stage, "deps": removed}}}) == [
        "train: imports pipeline/training/loss.py but does not list it"
    ]
    stale = [*stage["deps"], "pipeline/scoring/report.py"]
    assert dependency_errors({"stages": {"train": {**stage, "deps": stale}}}) == [
        "train: lists pipeline/scoring/report.py but does not import it"
    ]


def test_imports_are_followed_through_subpackages_modules_and_functions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("from pipeline import b\nfrom pipeline.sub import e\n")
    (tmp_path / "b.py").write_text("def f():\n    from pipeline.c import x\n")
    (tmp_path / "c.py").write_text("import os\nimport pipeline.d\n")
    (tmp_path / "d.py").write_text("")
    (tmp_path / "sub" / "e.py").write_text("from pipeline.sub.f import y\n")
    (tmp_path / "sub" / "f.py").write_text("")
    (tmp_path / "g.py").write_text("")
    assert imported_modules("pipeline.a", tmp_path) == {f"pipeline.{m}" for m in ("a", "b", "c", "d", "sub.e", "sub.f")}


def test_every_stage_waits_for_the_params_check(dvc_yaml):
    """DVC removes a stage's outputs before running it: the params stage runs first, so a bad params.yaml
    stops `dvc repro` before anything is removed (issue #27)."""
    stages = stages_of(dvc_yaml)
    assert stages["params"]["outs"] == [str(PARAMS_CHECKED_PATH)]
    for name, stage in stages.items():
        if name != "params":
            assert str(PARAMS_CHECKED_PATH) in stage["deps"], name


def test_evaluations_depend_on_the_data_they_evaluate_only(dvc_yaml):
    """Changing data.train must not rerun the zero-shot evaluation: it reads data/raw/xquad_r alone."""
    stage = dvc_yaml["stages"]["evaluate"]
    assert set(stage["foreach"]) == {"base", "retriever"}
    data = [dep for dep in stage["do"]["deps"] if dep.startswith("data/raw")]
    assert data == ["data/raw/xquad_r"]


def test_stages_list_only_recipe_parameters(dvc_yaml):
    """Every param a stage lists is in the schema (a recipe parameter or a group of them); execution settings
    (HYBRIDIR_* variables, pipeline/params.py's EXECUTION) are not in params.yaml, so DVC never reruns a stage for them."""
    known = set(SCHEMA) | set(GROUPS)
    for name, stage in stages_of(dvc_yaml).items():
        for entry in stage.get("params", []):
            listed = entry if isinstance(entry, str) else next(iter(entry))
            assert listed in known or listed == "params.yaml", (name, listed)
    assert not {field for field, _ in EXECUTION.values()} & {
        key.split(".")[-1] for key in SCHEMA if key.startswith(("train.", "evaluate."))
    }
