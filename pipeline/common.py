"""Helpers every stage shares: user-facing errors, the stage command line and its console, and atomic outputs.

Stages never leave a half-written output behind: each output is written to a
temporary sibling path, and a stage's outputs are renamed into place together only
once all are complete, so a crash or a validation error keeps the previous outputs
intact and consistent with each other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

SCHEMA_VERSION = "1"
log = logging.getLogger(__name__)


class PipelineError(Exception):
    """An expected user error (bad input, bad params): reported as one line, no traceback."""


def run_stage(main: Callable[[], Any]) -> None:
    """Run a stage's `main`: a PipelineError becomes one stderr line and exit code 2, Ctrl-C
    one line and exit code 130; outputs are only ever replaced whole, so neither leaves a
    partial one."""
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}{_restore_hint()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: no output of this stage was replaced{_restore_hint()}", file=sys.stderr)
        sys.exit(130)


@dataclass(frozen=True)
class DeclaredOutput:
    """An output that dvc.yaml declares."""

    stage: str  # as DVC addresses it: `train`, `evaluate@retriever`
    path: Path  # absolute
    cached: bool  # in DVC's cache, so `dvc checkout` restores it; else (`cache: false`) git tracks it
    persist: bool  # kept when its stage reruns


def declared_outputs(stage: str | None = None) -> list[DeclaredOutput]:
    """The outputs dvc.yaml declares, of one stage or of all, as DVC itself reads the file (foreach
    stages expanded, variables resolved); none outside a DVC project."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            stages = repo.stage.collect(stage) if stage else repo.index.stages
            return [DeclaredOutput(s.addressing, Path(out.fs_path), out.use_cache, out.persist) for s in stages for out in s.outs]
    except NotDvcRepoError:
        return []


def _restore_hint() -> str:
    """Under `dvc repro`, DVC removes a stage's outputs (all but `persist` ones) before running it: say
    how to get each back, `dvc checkout <stage>` the cached ones and git the ones DVC does not cache."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    removed = [out for out in declared_outputs(stage) if not out.persist]
    cached = [os.path.relpath(out.path) for out in removed if out.cached]
    in_git = [os.path.relpath(out.path) for out in removed if not out.cached]
    ways = [f"`dvc checkout {stage}` restores {', '.join(cached)}"] if cached else []
    ways += [f"`git checkout -- {' '.join(in_git)}` restores the rest as last committed"] if in_git else []
    return f" (dvc removed this stage's outputs before running it: {'; '.join(ways)})" if ways else ""


def refuse_declared_outputs(paths: list[str | Path]) -> None:
    """Outside `dvc repro`, refuse to write over or inside an output that dvc.yaml declares (or a folder
    holding one): it would replace what its stage made, and what git or DVC tracks, unseen."""
    if os.environ.get("DVC_STAGE"):
        return
    declared = declared_outputs()
    for path in paths:
        target = Path(path).resolve()
        for out in declared:
            if target == out.path or out.path in target.parents or target in out.path.parents:
                what = "is" if target == out.path else f"would replace {os.path.relpath(out.path)},"
                raise PipelineError(
                    f"{path}: {what} an output of stage {out.stage} in dvc.yaml, which only `dvc repro` writes (choose another path)"
                )


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (or its type): a stage's error is one line."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class StageParser(argparse.ArgumentParser):
    """A stage's command line, whose parsing also sets up the console at the verbosity asked for."""

    def parse_args(self, *args, **kwargs):
        parsed = super().parse_args(*args, **kwargs)
        setup_logging(parsed.verbose - parsed.quiet)
        return parsed


def stage_parser(doc: str, **paths: str) -> argparse.ArgumentParser:
    """A stage's command line: --params, -q/-v, and one option per input or output path (defaults = dvc.yaml's)."""
    parser = StageParser(description=doc.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="also debug lines, and the libraries' info lines")
    for name, default in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=default)
    return parser


class ConsoleHandler(logging.Handler):
    """Info and debug lines to stdout, warnings to stderr as `warning: ...`; the streams are looked up at
    each line (a test's captured ones, a stage's own). Errors are not logged: run_stage prints them."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            print(f"warning: {self.format(record)}", file=sys.stderr, flush=True)
        else:
            print(self.format(record), file=sys.stdout, flush=True)


def setup_logging(verbosity: int = 0) -> None:
    """The console of a stage: -1 (-q) warnings only, 0 its info lines, 1 (-v) its debug lines and the
    libraries' info lines and warnings too (which they otherwise keep to themselves, as before). The
    project's loggers are `pipeline.*`, and `__main__` for the module run by `python -m pipeline.<stage>`."""
    ours = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    for name in ("pipeline", "__main__", ""):
        logger = logging.getLogger(name or None)
        for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
            logger.removeHandler(handler)
        if name or verbosity > 0:
            logger.addHandler(ConsoleHandler())
        logger.setLevel(ours if name else logging.INFO)
        logger.propagate = not name  # ours are shown once, by their own handler


PROGRESS_STEPS = 10  # off a terminal, a progress line each time another tenth is done


def progress(
    iterable=None, total: float | None = None, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False, **tqdm_options
):
    """A tqdm progress bar on a terminal; elsewhere (DVC's log, a pipe, CI) a `LoggedProgress`, with the same
    interface, that logs a line at each tenth: a log gets ten lines, not a carriage-return frame per batch."""
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, **tqdm_options)
    return LoggedProgress(iterable, total, desc, unit, initial, disable, tqdm_options.get("unit_scale", False))


class LoggedProgress:
    """What `progress` gives off a terminal: tqdm's update/set_postfix/close and iteration, shown as info
    lines in tqdm's own format, one at each tenth of the total (and one at the end when the total is unknown)."""

    def __init__(self, iterable, total, desc: str, unit: str, initial: int, disable: bool, unit_scale: bool = False):
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc, self.unit, self.unit_scale, self.disable = desc, unit, unit_scale, disable
        self.n = self.initial = initial
        self.postfix = ""
        self.started = time.perf_counter()
        self.shown = self._tenths()  # tenths already logged

    def _tenths(self) -> int:
        return int(PROGRESS_STEPS * self.n / self.total) if self.total else 0

    def line(self) -> str:
        counted = "{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, " if self.total else "{n_fmt} [{elapsed}, "
        return tqdm.format_meter(
            self.n,
            self.total,
            time.perf_counter() - self.started,
            prefix=self.desc,
            unit=self.unit,
            unit_scale=self.unit_scale,
            postfix=self.postfix or None,
            initial=self.initial,
            bar_format="{desc}: " + counted + "{rate_fmt}{postfix}]",
        )

    def update(self, n: float = 1) -> None:
        self.n += n
        tenths = self._tenths()
        if tenths > self.shown and not self.disable:
            self.shown = tenths
            log.info(self.line())

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self.total and not self.disable:
            log.info(self.line())
        self.disable = True  # a second close says nothing

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _temp_beside(final: Path, made: list[Path]) -> Path:
    """A fresh temporary directory beside `final` (removing ones a killed run left); fails early
    with one line when the location cannot be written. Folders it had to make are added to `made`."""
    blocking = next((folder for folder in (final.parent, *final.parent.parents) if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise PipelineError(f"{final}: cannot write there ({blocking} is a file, not a folder)")
    try:
        made += [folder for folder in (final.parent, *final.parent.parents) if not folder.exists()]
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as err:
        raise PipelineError(f"{final}: cannot write there ({err.strerror or first_line(err)}: {err.filename or final.parent})") from None
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary directories
    return tmp


def _move_into_place(written: Path, final: Path) -> None:
    if written.is_dir() and final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(written, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(written, final)


@contextlib.contextmanager
def atomic_outputs(*finals: str | Path) -> Iterator[list[Path]]:
    """Temporary paths for a stage's outputs (files or directories), moved into place together
    once the block has written all of them.

    Entering checks every location up front, so a wrong output path fails before any work;
    a failure or kill part-way leaves every previous output as it was. An output the block
    did not write (an optional one) is left alone.
    """
    finals = [Path(f) for f in finals]
    temps: list[Path] = []
    made: list[Path] = []  # folders made for the outputs, deepest first: removed again if left empty
    try:
        for final in finals:
            temps.append(_temp_beside(final, made))
        targets = [tmp / final.name for tmp, final in zip(temps, finals)]
        yield targets
        for written, final in zip(targets, finals):
            if written.exists():
                _move_into_place(written, final)
    finally:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: an output is in it
                folder.rmdir()


@contextlib.contextmanager
def atomic_path(final: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """One output written atomically (see atomic_outputs); with is_dir the directory is made for the block."""
    with atomic_outputs(final) as (target,):
        if is_dir:
            target.mkdir()
        yield target


def write_parquet(table: pa.Table, path: str | Path, made_by: dict | None = None) -> None:
    """Write a Parquet file atomically, stamping the schema version and the params that made it."""
    meta = dict(table.schema.metadata or {})
    meta[b"hybridir.schema_version"] = SCHEMA_VERSION.encode()
    if made_by is not None:
        meta[b"hybridir.params"] = json.dumps(made_by, sort_keys=True).encode()
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)


def read_parquet(path: str | Path, schema: pa.Schema, made_by: dict | None = None, optional: tuple[str, ...] = ()) -> pa.Table:
    """Read a stage's Parquet output, checking its columns and types and, given `made_by`,
    that the params stamped in it by the stage that wrote it are these (not a stale file).
    Columns named in `optional` may be missing (files written before they existed): they are left out."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: file not found (run the stage that makes it first)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise PipelineError(f"{path}: not a readable Parquet file ({err})") from None
    version = (table.schema.metadata or {}).get(b"hybridir.schema_version", b"").decode()
    if version != SCHEMA_VERSION:
        raise PipelineError(f"{path}: schema version {version or 'missing'}, expected {SCHEMA_VERSION}")
    schema = pa.schema([field for field in schema if field.name in table.column_names or field.name not in optional])
    for field in schema:
        if field.name not in table.column_names:
            raise PipelineError(f"{path}: missing column '{field.name}'")
        if not table.schema.field(field.name).type.equals(field.type):
            raise PipelineError(f"{path}: column '{field.name}' has type {table.schema.field(field.name).type}, expected {field.type}")
    if made_by is not None:
        stamped = json.loads((table.schema.metadata or {}).get(b"hybridir.params", b"{}"))
        for key, want in made_by.items():
            if stamped.get(key) != want:
                raise PipelineError(
                    f"{path}: made with {key}={json.dumps(stamped.get(key))}, but params.yaml has "
                    f"{key}={json.dumps(want)} (stale output: run `dvc repro`)"
                )
    return table.select(schema.names)


def write_figure(fig, path: str | Path) -> None:
    """A matplotlib figure as a PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(out: str | Path, text: str, table) -> None:
    """`<out>.md` (the Markdown a reader pastes) and `<out>.csv` (the same table, for tools), each atomically."""
    with atomic_path(f"{out}.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    write_table(f"{out}.csv", table)


def write_table(path: str | Path, table) -> None:
    """A pandas table as CSV, atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
