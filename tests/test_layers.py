"""pipeline/ is layered (docs/design.md, "Where things are"): each module imports only from lower layers
or from its own subpackage, so there is no import cycle, and the stages stand at the top where a
newcomer finds them by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "pipeline"
STAGES = ("fetch", "base_model", "translate", "mine", "batches", "train", "evaluate", "card")

# Lowest first. A module's layer is its own entry, else its subpackage's.
LAYERS = [
    ("pipeline.common", "pipeline.machine", "pipeline.contracts"),  # what every stage needs, importing nothing of the project
    ("pipeline.sources",),  # what the pipeline reads from outside
    ("pipeline.params",),  # params.yaml, checked and typed
    ("pipeline.scoring",),  # encoding and metrics
    ("pipeline.training",),  # the parts of a training step
    ("pipeline.analysis",),  # tools over finished runs
    tuple(f"pipeline.{stage}" for stage in STAGES),  # the stages
]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> int:
    for number, members in enumerate(LAYERS):
        if any(module == member or module.startswith(member + ".") for member in members):
            return number
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/design.md")


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def project_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a file imports (a name imported from a package counts as its module where it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: project_imports(path, known) for module, path in known.items() if module != "pipeline"}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of another subpackage of the same layer (layer 0's modules are not a subpackage)."""
    return [
        f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})"
        for module, imports in sorted(graph.items())
        for imported in sorted(imports)
        if layer_of(imported) > layer_of(module)
        or (layer_of(imported) == layer_of(module) != 0 and subpackage(imported) != subpackage(module))
    ]


def cyclic_modules(graph: dict[str, set[str]]) -> list[str]:
    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and not seen.add(nxt) and reaches(nxt, target, seen)):
                return True
        return False

    return [module for module in sorted(graph) if reaches(module, module, set())]


def test_every_module_imports_only_downward_or_within_its_subpackage(graph):
    assert upward_imports(graph) == []


def test_no_import_cycle(graph):
    assert cyclic_modules(graph) == []


def test_the_checks_find_an_upward_import_and_a_cycle(graph):
    upward = {**graph, "pipeline.scoring.metrics": {"pipeline.train"}, "pipeline.training.loss": {"pipeline.analysis.runs"}}
    assert upward_imports(upward) == [
        "pipeline.scoring.metrics (layer 3) imports pipeline.train (layer 6)",
        "pipeline.training.loss (layer 4) imports pipeline.analysis.runs (layer 5)",
    ]
    assert cyclic_modules({**graph, "pipeline.common": {"pipeline.params"}}) == ["pipeline.common", "pipeline.params"]


def test_the_stages_stand_at_the_top_of_the_package():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert set(STAGES) <= top
    assert top - set(STAGES) == {"common", "contracts", "machine", "params"}  # and the few modules every stage needs


def test_subpackage_inits_hold_only_a_docstring():
    """Importing pipeline.x.y runs pipeline/x/__init__.py, which no stage lists as a dependency: it must hold no code."""
    for init in PACKAGE.rglob("__init__.py"):
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body), init
