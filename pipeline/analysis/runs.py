"""What every analysis tool shares: where runs are found and how their figures are named.

A run is a DVC experiment, a git revision or the workspace. Its headline figures are read
from `metrics/eval.json` (fine-tuned) and `metrics/eval_base.json` (zero-shot base) through
`dvc exp show` rows, its per-query results from `metrics/eval_queries/<dataset>.parquet`
through `dvc.api.open`, from the DVC cache: nothing is re-run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa

from pipeline.common import PipelineError, first_line, read_parquet
from pipeline.contracts import QUERIES_SCHEMA

METRICS_FILE = "metrics/eval.json"  # the fine-tuned model's figures on the test sets
BASE_FILE = "metrics/eval_base.json"  # the zero-shot base's: the same names
DEV_FILE = "metrics/dev.json"  # the fine-tuned model's figures on the held-out dev split (`dev.mono_map`, ...)
PARAMS_FILE = "params.yaml"

# Every headline figure a report shows, with its label; the first four are a run's summary.
FIGURE_LABELS = {
    "mono_map": "Mo. mAP",
    "cross_map": "Cr. mAP",
    "multi_map": "Mul. mAP",
    "rank_distance": "rank distance",
    "multi_recall_at_10": "Mul. R@10",
    "language_preference": "own language first",
}
SUMMARY_FIGURES = ("mono_map", "cross_map", "multi_map", "rank_distance")

# The per-query columns compared: files written before columns were added still compare.
COMPARED_SCHEMA = pa.schema(
    [
        QUERIES_SCHEMA.field(name)
        for name in (
            "setting",
            "query_lang",
            "passage_lang",
            "question_id",
            "paragraph",
            "ap",
            "recall_at_1",
            "recall_at_10",
            "rank_distance",
            "own_language_first",
        )
    ]
)
OPTIONAL_COLUMNS = ("paragraph", "own_language_first")  # files written before these columns existed still compare


def metrics_file(dataset: str) -> str:
    """The metrics file a dataset's figures are in: the dev split's own, else the test sets'."""
    return DEV_FILE if dataset == "dev" else METRICS_FILE


def figure_label(figure: str) -> str:
    """A figure's label, or its name where it has none (e.g. `noise.typo_0.15.multi_drop`)."""
    return FIGURE_LABELS.get(figure, figure)


def lower_is_better(figure: str) -> bool:
    """Rank distance and the drops under noise are better low; every mAP high."""
    return figure == "rank_distance" or figure.endswith("_drop")


def number(value) -> float | None:
    """A metric's value, or None where exp show has none ('!' = the file could not be read)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def exp_metric(exp: dict, name: str, file: str, unprefixed: str) -> float | None:
    """`name` from `file`'s column. `dvc exp show` prefixes a name with `file:` when several
    files have it (eval.json and eval_base.json share every name); a bare name is one file's
    only, and `unprefixed` says which (see main), so eval_base's is never taken for eval.json's."""
    if f"{file}:{name}" in exp:
        return number(exp[f"{file}:{name}"])
    return number(exp.get(name)) if unprefixed == file else None


def exp_param(exp: dict, name: str):
    """A param's column: bare, or `params.yaml:name` where another params file has the name too."""
    return exp[name] if name in exp else exp.get(f"{PARAMS_FILE}:{name}")


def flatten(params: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, as `dvc exp show` names params."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def parse_entry(text: str, queries_dir: str) -> tuple[str | None, str, str]:
    """'[LABEL=]REV[:DIR]' -> (label or None, rev, folder). Git refs cannot contain ':', and
    experiment names cannot contain '=', so the splits are safe."""
    label, sep, rest = text.partition("=")
    if not sep:
        label, rest = None, text
    rev, _, folder = rest.partition(":")
    return label, rev, folder or queries_dir


def label_groups(entries: list[str], labels: list[str | None]) -> list[tuple[str, list[str]]]:
    """Entries pooled by their LABEL= prefix, in order of first appearance (all or none labelled)."""
    if None in labels:
        unlabelled = entries[labels.index(None)]
        raise PipelineError(f"{unlabelled}: no LABEL= prefix; label every entry or none")
    groups: dict[str, list[str]] = {}
    for entry, label in zip(entries, labels):
        groups.setdefault(label, []).append(entry)
    return list(groups.items())


def read_queries(rev: str, path: str, repo: str | None = None, schema: pa.Schema = COMPARED_SCHEMA) -> pd.DataFrame:
    """The per-query table `path` at `rev` (an experiment, a git revision, or 'workspace'),
    with `schema`'s columns."""
    if rev == "workspace":
        local = Path(repo or ".") / path
        if not local.exists():
            raise PipelineError(f"workspace: {path} not found (run `dvc repro evaluate` first)")
        return read_parquet(local, schema, optional=OPTIONAL_COLUMNS).to_pandas()
    import dvc.api
    from dvc.exceptions import DvcException, PathMissingError
    from dvc.scm import RevError
    from dvc_data.index import DataIndexError

    try:
        with dvc.api.open(path, repo=repo, rev=rev, mode="rb") as f:
            data = f.read()
    except DataIndexError:  # a folder output (metrics/eval_queries) whose listing is not in this clone's cache
        raise PipelineError(
            f"{rev}: {path} is not in this clone's DVC cache (`dvc pull` it, or run that revision again with `dvc exp run`)"
        ) from None
    except RevError:
        raise PipelineError(f"{rev}: unknown revision (not an experiment name, a git revision or `workspace`)") from None
    except (PathMissingError, FileNotFoundError):
        raise PipelineError(
            f"{rev}: {path} not found at that revision nor in the DVC cache (run it with `dvc exp run`/`dvc repro`, or `dvc pull`)"
        ) from None
    except DvcException as err:
        raise PipelineError(f"{rev}: cannot read {path} ({first_line(err)})") from None
    # read_parquet checks the schema and its version; its messages name the temporary copy,
    # so they are rewritten to name the revision and path.
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(path).name
        copy.write_bytes(data)
        try:
            return read_parquet(copy, schema, optional=OPTIONAL_COLUMNS).to_pandas()
        except PipelineError as err:
            raise PipelineError(str(err).replace(str(copy), f"{rev}:{path}")) from None


def commit_of(rev: str) -> str:
    """The commit a run's files come from: a git revision's, a DVC experiment's (refs/exps/.../<name>),
    or 'workspace' (uncommitted, on top of HEAD)."""
    import subprocess

    if rev == "workspace":
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        return f"workspace on {head[:12]}" if head else "workspace"
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], capture_output=True, text=True).stdout.strip()
    if found:
        return found
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], capture_output=True, text=True).stdout
    return next((sha for sha, ref in (line.split(" ", 1) for line in refs.splitlines()) if ref.endswith(f"/{rev}")), "unknown")


def params_at(rev: str) -> dict:
    """A run's params, flat (`sampler.ratio`), as DVC reads them at `rev` (an experiment, a git revision or 'workspace')."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return flatten(dvc.api.params_show(rev=None if rev == "workspace" else rev))
    except DvcException as err:
        raise PipelineError(f"{rev}: cannot read its params ({first_line(err)})") from None


def run_rows(label: str, run: str, rev: str, figures: dict, own_params: bool = True) -> dict:
    """One row of a report's per-run table (`<out>_runs.csv`): which run, from which commit, with
    which seed, and its own figures, so every mean ± sd of the report can be recomputed from it.
    `own_params` False: the run's files are not the revision's own metrics (a `:DIR` entry, e.g. a
    grid's per-query folder), so the revision's params say nothing of it and the seed is left empty."""
    seed = params_at(rev).get("seed") if own_params else None
    return {"label": label, "run": run, "commit": commit_of(rev), "seed": seed, **figures}
