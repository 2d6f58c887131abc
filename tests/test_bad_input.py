"""The bad-input matrix: every input a stage reads, broken in the ways users break it.

Each case starts from a small valid project (a sliced XQuAD-R mirror, the Parquet
files between stages, a tiny model), breaks one thing, and runs one stage as its
command line does (`run_stage(main)`). The stage must exit with code 2 and one line
on stderr naming the file or param and what is wrong, with no traceback, and must
leave every file of the project as it was: nothing half-written, nothing replaced.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import base_model, batches, evaluate, fetch, train, translate
from pipeline.common import run_stage, write_parquet
from pipeline.contracts import BASE_MODEL_DIR, PAIRS_PATH, PLAN_PATH, pairs_stamp, raw_tables
from pipeline.params import build, plan_made_by
from pipeline.sources.catalogue import LAREQA_SOURCES, XQUAD_R
from tests.helpers import REPO, mirror_file, no_questions

pytestmark = pytest.mark.slow  # subprocesses, torchrun, dvc or a grid: `pytest -m 'not slow'` skips it

STAGES = {"fetch": fetch, "base_model": base_model, "translate": translate, "batches": batches, "train": train, "evaluate": evaluate}
LANGS = ("de", "en")


@dataclass
class Project:
    root: Path
    docs: dict[str, dict]  # the mirror's LAReQA documents, by language
    pins: dict[str, str]  # the sha256 pins the patched XQUAD_R source reads
    monkeypatch: pytest.MonkeyPatch  # undoes `setenv` after the case

    def setenv(self, name: str, value: str) -> None:
        """Set an execution setting (a HYBRIDIR_* variable) for this case only."""
        self.monkeypatch.setenv(name, value)

    @property
    def mirror(self) -> Path:
        return self.root / "mirror" / XQUAD_R.mirror_dir

    def params(self, **dotted) -> None:
        """Set params.yaml values, e.g. params(**{"sampler.ratio": 1.5})."""
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        for key, value in dotted.items():
            *groups, name = key.split(".")
            node = params
            for group in groups:
                node = node[group]
            node[name] = value
        path.write_text(yaml.safe_dump(params))

    def put_mirror(self, lang: str, data: bytes) -> None:
        """Replace a mirror file by bytes that carry a valid pin (as a broken upstream file would)."""
        (self.mirror / f"{lang}.json").write_bytes(data)
        self.pins[lang] = hashlib.sha256(data).hexdigest()

    def edit_doc(self, lang: str, change: Callable[[dict], None]) -> None:
        doc = copy.deepcopy(self.docs[lang])
        change(doc)
        self.put_mirror(lang, json.dumps(doc).encode())

    def rewrite_parquet(self, relative: str, change: Callable[[pa.Table], pa.Table]) -> None:
        path = self.root / relative
        table = pq.read_table(path)
        pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path)


@pytest.fixture(scope="module")
def valid_project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project whose every stage input is valid; each case gets a copy."""
    root = tmp_path_factory.mktemp("valid")
    docs = {}
    for lang in LANGS:
        doc = json.loads(mirror_file(f"{XQUAD_R.mirror_dir}/{lang}.json").read_text(encoding="utf-8"))
        docs[lang] = {"data": doc["data"][:2]}
        (root / "mirror" / XQUAD_R.mirror_dir).mkdir(parents=True, exist_ok=True)
        (root / "mirror" / XQUAD_R.mirror_dir / f"{lang}.json").write_text(json.dumps(docs[lang]), encoding="utf-8")
    (root / "docs.json").write_text(json.dumps(docs))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(train="xquad_r", eval=["xquad_r"], squad="squad.json", allow_eval_overlap=True, dev_share=0)  # one small dataset
    params["evaluate"].update(datasets=["xquad_r"], langs=None)
    params["sampler"].update(batch_size=4, steps=3)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    tables = [fetch.parse_lareqa(docs[lang], lang, f"{lang}.json") for lang in LANGS]
    questions, candidates = (pa.concat_tables(t) for t in zip(*tables))
    questions = fetch.link_across_languages(questions)  # as fetch writes them
    write_parquet(questions, root / "data/raw/xquad_r/questions.parquet", made_by={"source": "xquad_r"})
    write_parquet(candidates, root / "data/raw/xquad_r/candidates.parquet", made_by={"source": "xquad_r"})
    pairs = translate.pairs_from_source(questions, candidates)
    write_parquet(pairs, root / "data/parallel/pairs.parquet", made_by={**pairs_stamp("xquad_r", 0), "translate.model": None})
    sampler = params["sampler"]
    plan_params = {key: value for key, value in sampler.items() if key != "negatives"}
    plan = batches.plan_batches(batches.groups_from_pairs(pairs), seed=params["seed"], **plan_params)
    write_parquet(plan, root / "data/batches/plan.parquet", made_by=plan_made_by(build(params)))
    shutil.copytree(tiny_model_dir, root / "models/base")
    shutil.copytree(tiny_model_dir, root / "models/retriever")
    (root / "squad.json").write_text(json.dumps(SQUAD_DOC))
    return root


SQUAD_DOC = {
    "data": [{"paragraphs": [{"context": "Alpha is first. Beta is second.",
                              "qas": [{"id": "s1", "question": "Which is second?", "answers": [{"text": "Beta", "answer_start": 16}]}]}]}]
}  # fmt: skip


@pytest.fixture
def project(valid_project, tmp_path, monkeypatch) -> Project:
    root = tmp_path / "project"
    shutil.copytree(valid_project, root)
    docs = json.loads((root / "docs.json").read_text())
    monkeypatch.chdir(root)
    monkeypatch.setenv("HYBRIDIR_MIRROR", str(root / "mirror"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pins = {lang: hashlib.sha256((root / "mirror" / XQUAD_R.mirror_dir / f"{lang}.json").read_bytes()).hexdigest() for lang in LANGS}
    monkeypatch.setitem(LAREQA_SOURCES, "xquad_r", dataclasses.replace(XQUAD_R, sha256=pins))
    return Project(root, docs, pins, monkeypatch)


def _squad(change: Callable[[dict], None]) -> Callable[[Project], None]:
    def broken(p: Project) -> None:
        doc = copy.deepcopy(SQUAD_DOC)
        change(doc)
        (p.root / "squad.json").write_text(json.dumps(doc))
        p.params(**{"data.train": "squad", "translate.model": "models/nllb-ct2/any"})

    return broken


def _own_data(rows: list[dict]) -> Callable[[Project], None]:
    """data.train: a JSONL file of the user's own with these rows (docs/own-data.md)."""

    def broken(p: Project) -> None:
        import datasets

        p.monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", p.root.parent / "hf-cache")  # outside the project
        (p.root / "data/own").mkdir(parents=True, exist_ok=True)
        (p.root / "data/own/faq.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        p.params(**{"data.train": "data/own/faq.jsonl"})

    return broken


OWN_ROWS = [
    {"group_id": f"g{g}", "lang": lang, "question": f"{lang} q{g}?", "passage": f"{lang} p{g}."} for g in (1, 2) for lang in ("de", "en")
]


def _set(path: list, value) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return change


_DELETE = object()
PAR = ["data", 0, "paragraphs", 0]
QA = [*PAR, "qas", 0]
RAW_Q = "data/raw/xquad_r/questions.parquet"


def _second_qa_copies_first(doc):
    par = doc["data"][0]["paragraphs"][0]
    par["qas"][1]["id"] = par["qas"][0]["id"]


# (id, stage, break the project, what the one error line must say after "error: ")
CASES: list[tuple[str, str, Callable[[Project], None], str]] = [
    # LAReQA JSON (fetch)
    ("lareqa file missing", "fetch", lambda p: (p.mirror / "de.json").unlink(), r"\S*/mirror/lareqa/xquad-r/de.json: file not found in the mirror"),
    ("lareqa empty file", "fetch", lambda p: p.put_mirror("de", b""), r"\S*/de.json: malformed JSON at line 1 column 1"),
    ("lareqa truncated", "fetch", lambda p: p.put_mirror("de", json.dumps(p.docs["de"]).encode()[:-9]), r"\S*/de.json: malformed JSON at line 1 column \d+"),
    ("lareqa not utf-8", "fetch", lambda p: p.put_mirror("de", b'{"data": "\xff"}'), r"\S*/de.json: not valid UTF-8 \(byte 0xff at offset 10\)"),
    ("lareqa wrong type", "fetch", lambda p: p.edit_doc("de", _set([*QA, "answers", 0, "answer_start"], "12")), r"\S*/de.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]\.answer_start: expected an integer, got a string"),
    ("lareqa missing field", "fetch", lambda p: p.edit_doc("de", _set([*PAR, "sentence_breaks"], _DELETE)), r"\S*/de.json: data\[0\]\.paragraphs\[0\]: missing field 'sentence_breaks'"),
    ("lareqa answer outside passage", "fetch", lambda p: p.edit_doc("de", _set([*QA, "answers", 0, "answer_start"], 10**6)), r"\S*/de.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]\.answer_start: 1000000 is outside the context"),
    ("lareqa breaks overlap", "fetch", lambda p: p.edit_doc("de", _set([*PAR, "sentence_breaks", 1, 0], 0)), r"\S*/de.json: data\[0\]\.paragraphs\[0\]\.sentence_breaks\[1\]: .*overlaps the previous break"),
    ("lareqa breaks past text", "fetch", lambda p: p.edit_doc("de", _set([*PAR, "sentence_breaks", -1, 1], 10**6)), r"\S*/de.json: data\[0\]\.paragraphs\[0\]\.sentence_breaks\[\d+\]: .*runs past the context"),
    ("lareqa duplicate question id", "fetch", lambda p: p.edit_doc("de", _second_qa_copies_first), r"\S*/de.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]\.id: duplicate question id"),
    ("lareqa language without questions", "fetch", lambda p: p.edit_doc("de", no_questions), r"\S*/de.json: .*no questions"),
    ("lareqa changed upstream", "fetch", lambda p: (p.mirror / "de.json").write_bytes(b'{"data": []}'), r"\S*/de.json: sha256 \w+ does not match the pinned"),
    # SQuAD-format JSON (fetch, data.train=squad)
    ("squad file missing", "fetch", lambda p: (_squad(lambda d: None)(p), (p.root / "squad.json").unlink()), r"params.yaml: data.squad: file not found: squad.json"),
    ("squad truncated", "fetch", lambda p: (_squad(lambda d: None)(p), (p.root / "squad.json").write_text('{"data": [')), r"squad.json: malformed JSON at line 1 column \d+"),
    ("squad missing question", "fetch", _squad(_set([*QA, "question"], _DELETE)), r"squad.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'question'"),
    ("squad answer outside passage", "fetch", _squad(_set([*QA, "answers", 0, "answer_start"], 99)), r"squad.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]\.answer_start: 99 is outside the context"),
    # data of the user's own (fetch, data.train=<file>)
    ("own data file missing", "fetch", lambda p: p.params(**{"data.train": "data/own/faq.jsonl"}), r"params.yaml: data.train: file not found: data/own/faq.jsonl"),
    ("own data missing column", "fetch", _own_data([{k: v for k, v in r.items() if k != "question"} for r in OWN_ROWS]), r"data/own/faq.jsonl: missing column 'question' \(it has: group_id, lang, passage\)"),
    ("own data group in one language", "fetch", _own_data(OWN_ROWS[:3]), r"data/own/faq.jsonl: row 3: group 'g2' has one language only \('de'\): a group is one question in two or more languages"),
    ("own data unknown language", "fetch", _own_data([{**r, "lang": "xx"} if i == 1 else r for i, r in enumerate(OWN_ROWS)]), r"data/own/faq.jsonl: row 2: lang: unknown language code 'xx'"),
    ("own data empty passage", "fetch", _own_data([{**r, "passage": " "} if i == 2 else r for i, r in enumerate(OWN_ROWS)]), r"data/own/faq.jsonl: row 3: passage is empty"),
    ("own data duplicate row", "fetch", _own_data([*OWN_ROWS, OWN_ROWS[0]]), r"data/own/faq.jsonl: rows 1 and 5: group 'g1' has two 'de' rows"),
    # Parquet between stages
    ("parquet missing", "translate", lambda p: (p.root / RAW_Q).unlink(), rf"{RAW_Q}: file not found \(run the stage that makes it first\)"),
    ("parquet empty file", "translate", lambda p: (p.root / RAW_Q).write_bytes(b""), rf"{RAW_Q}: not a readable Parquet file"),
    ("parquet truncated", "translate", lambda p: (p.root / RAW_Q).write_bytes((p.root / RAW_Q).read_bytes()[:-100]), rf"{RAW_Q}: not a readable Parquet file"),
    ("parquet wrong type", "translate", lambda p: p.rewrite_parquet(RAW_Q, lambda t: t.set_column(3, "answer_candidate", t["answer_candidate"].cast(pa.string()))), rf"{RAW_Q}: column 'answer_candidate' has type string, expected int32"),
    ("parquet missing column", "translate", lambda p: p.rewrite_parquet(RAW_Q, lambda t: t.drop_columns(["question"])), rf"{RAW_Q}: missing column 'question'"),
    ("parquet without schema version", "train", lambda p: pq.write_table(pq.read_table(p.root / "data/batches/plan.parquet").replace_schema_metadata(None), p.root / "data/batches/plan.parquet"), r"data/batches/plan.parquet: schema version missing, expected \d+"),
    ("parquet made by other params", "batches", lambda p: p.params(**{"data.train": "mlqa_r"}), r'data/parallel/pairs.parquet: made with data.train="xquad_r", but params.yaml has data.train="mlqa_r"'),
    ("pairs without any pair", "batches", lambda p: p.rewrite_parquet("data/parallel/pairs.parquet", lambda t: t.slice(0, 0)), r"data/parallel/pairs.parquet: no pairs"),
    ("candidates missing column", "evaluate", lambda p: p.rewrite_parquet("data/raw/xquad_r/candidates.parquet", lambda t: t.drop_columns(["sentence"])), r"data/raw/xquad_r/candidates.parquet: missing column 'sentence'"),
    # params.yaml values
    ("params not yaml", "batches", lambda p: (p.root / "params.yaml").write_text("sampler: [\n"), r"params.yaml: not valid YAML"),
    ("ratio below 0", "batches", lambda p: p.params(**{"sampler.ratio": -0.1}), r"params.yaml: sampler.ratio: -0.1 is outside \[0, 1\]"),
    ("ratio above 1", "batches", lambda p: p.params(**{"sampler.ratio": 1.5}), r"params.yaml: sampler.ratio: 1.5 is outside \[0, 1\]"),
    ("batch_size 0", "batches", lambda p: p.params(**{"sampler.batch_size": 0}), r"params.yaml: sampler.batch_size: 0 .*"),
    ("negative steps", "batches", lambda p: p.params(**{"sampler.steps": -5}), r"params.yaml: sampler.steps: -5 .*"),
    ("temperature 0", "train", lambda p: p.params(**{"train.temperature": 0}), r"params.yaml: train.temperature: 0 must be > 0"),
    ("unknown source", "fetch", lambda p: p.params(**{"data.train": "nq"}), r"params.yaml: data.train: 'nq' is not one of mlqa_r, squad, xquad_r"),
    ("unknown language code (translate)", "translate", lambda p: p.params(**{"translate.model": "models/nllb", "translate.langs": ["en", "xx"]}), r"params.yaml: translate.langs\[1\]: 'xx' is not one of af, am, "),
    ("unknown language code (evaluate)", "evaluate", lambda p: p.params(**{"evaluate.langs": ["en", "xx"]}), r"params.yaml: evaluate.langs: xx not in xquad_r \(its languages: de, en\)"),
    ("unknown noise", "evaluate", lambda p: p.params(**{"evaluate.noise": ["typo_0.05", "blur"]}), r"params.yaml: evaluate.noise\[1\]: unknown noise 'blur'"),
    ("typo rate above 1", "evaluate", lambda p: p.params(**{"evaluate.noise": ["typo_1.5"]}), r"params.yaml: evaluate.noise\[0\]: 'typo_1.5': a typo rate must be a number in \(0, 1\]"),
    ("noise_queries 0", "evaluate", lambda p: p.params(**{"evaluate.noise_queries": 0}), r"params.yaml: evaluate.noise_queries: 0 must be >= 1"),
    ("unknown MTEB task", "evaluate", lambda p: p.params(**{"evaluate.mteb_tasks": ["NoSuchRetrieval"]}), r"params.yaml: evaluate.mteb_tasks: unknown MTEB task 'NoSuchRetrieval'"),
    # model directories and ids
    ("base model dir missing", "train", lambda p: shutil.rmtree(p.root / "models/base"), r"models/base: no such directory \(run `dvc repro base_model`\)"),
    ("retriever dir missing", "evaluate", lambda p: shutil.rmtree(p.root / "models/retriever"), r"models/retriever: no such directory"),
    ("tokenizer file deleted", "train", lambda p: (p.root / "models/base/tokenizer.json").unlink(), r"models/base: (cannot load the tokenizer|the tokenizer has \d+ tokens but the embedding matrix has \d+ rows).*"),
    ("weights truncated", "train", lambda p: _truncate(p.root / "models/base/model.safetensors"), r"models/base/model.safetensors: truncated or corrupt \(fewer bytes than its header lists\)"),
    ("weights truncated (evaluate)", "evaluate", lambda p: _truncate(p.root / "models/retriever/model.safetensors"), r"models/retriever/model.safetensors: truncated or corrupt"),
    # issue 27: weights that do not fit the architecture would be a random init, scored as if trained
    ("config edited to another architecture", "evaluate", lambda p: _edit_config(p.root / "models/retriever", model_type="gpt2"), r"models/retriever: the weights do not fit the GPT2Model that config.json describes \(\d+ missing: .*; \d+ unexpected: .*\); loading them would initialise the rest at random"),
    ("config edited to another architecture (train)", "train", lambda p: _edit_config(p.root / "models/base", model_type="gpt2"), r"models/base: the weights do not fit the GPT2Model that config.json describes"),
    # params found by trying (issue 15): one schema, checked whole before any work
    ("misspelt key", "batches", lambda p: _add_param(p, "sampler", "ratoi", 0.25), r"params.yaml: sampler.ratoi: unknown parameter \(did you mean sampler.ratio\?\)"),
    ("misspelt group", "train", lambda p: _add_param(p, "sampeler", "ratio", 0.25), r"params.yaml: sampeler: unknown parameter group \(did you mean sampler\?\)"),
    ("lr infinite", "train", lambda p: p.params(**{"train.lr": float("inf")}), r"params.yaml: train.lr: inf is not a finite number"),
    ("batch of one pair", "batches", lambda p: p.params(**{"sampler.batch_size": 1}), r"params.yaml: sampler.batch_size: 1 must be >= 2 \(InfoNCE needs in-batch negatives\)"),
    ("steps beyond any plan", "batches", lambda p: p.params(**{"sampler.steps": 10**12}), r"params.yaml: sampler.steps: 1000000000000 steps x 4 pairs .* more than the 50,000,000 a plan may hold.*"),
    ("no languages", "evaluate", lambda p: p.params(**{"evaluate.langs": []}), r"params.yaml: evaluate.langs: .*empty.*"),
    ("languages as a string", "evaluate", lambda p: p.params(**{"evaluate.langs": "en"}), r"params.yaml: evaluate.langs: expected a list of language codes or null, got the string 'en'"),
    ("encoding batch 0", "evaluate", lambda p: p.setenv("HYBRIDIR_EVAL_BATCH_SIZE", "0"), r"environment: HYBRIDIR_EVAL_BATCH_SIZE: 0 must be >= 1"),
    ("encoding batch as text", "evaluate", lambda p: p.setenv("HYBRIDIR_EVAL_BATCH_SIZE", "sixteen"), r"environment: HYBRIDIR_EVAL_BATCH_SIZE: expected an integer, got the string 'sixteen'"),
    ("training on the test set's questions", "translate", lambda p: p.params(**{"data.allow_eval_overlap": False}), r"data/raw/xquad_r/questions.parquet: [\d,]+ of its questions are training questions \(data.train=xquad_r, e.g. '[^']+'\): its figures would be on questions the model was trained on \(set data.allow_eval_overlap: true if that is what you want\)"),
    ("a dev split that holds out nothing", "translate", lambda p: p.params(**{"data.dev_share": 0.1}), r"params.yaml: data.dev_share: 0.1 of the 2 articles of data/raw/xquad_r holds out 0: a dev split needs at least one article held out and one left to train on \(or set 0 for none\)"),
    ("execution setting left in params.yaml", "train", lambda p: _add_param(p, "train", "processes", 2), r"params.yaml: train.processes: an execution setting now, not a parameter: set HYBRIDIR_PROCESSES \(remove it from params.yaml\)"),
    ("a key given twice", "batches", lambda p: _duplicate(p, "  ratio: "), r"params.yaml: line \d+: found duplicate key \"ratio\" \(given twice in one group: DVC refuses the file, and which value would count is a guess\)"),
    ("unknown precision", "evaluate", lambda p: p.params(**{"evaluate.precision": "fp16"}), r"params.yaml: evaluate.precision: 'fp16' is not one of auto, fp32, bf16.*"),
    ("hub id offline", "base_model", lambda p: p.params(**{"model.base": "no-such-org/no-such-model"}), r"params.yaml: model.base: .*no-such-org/no-such-model.*"),
    # training strategies (issue 17)
    ("sampler.unit kept", "batches", lambda p: _add_param(p, "sampler", "unit", "pair"), r"params.yaml: sampler.unit: replaced by sampler.schedule \(unit: batch -> schedule: hybrid, unit: pair -> schedule: pair\)"),
    ("unknown schedule", "batches", lambda p: p.params(**{"sampler.schedule": "curriculum"}), r"params.yaml: sampler.schedule: 'curriculum' is not one of hybrid, sequential, multitask, pair"),
    ("unknown negatives mode", "batches", lambda p: p.params(**{"sampler.negatives": "bm25"}), r"params.yaml: sampler.negatives: 'bm25' is not one of none, paragraph, query_language"),
    ("negatives without the questions", "batches", lambda p: p.params(**{"sampler.negatives": "paragraph"}), r"data/parallel/questions.parquet: file not found"),
    ("multitask with one row per task", "batches", lambda p: p.params(**{"sampler.schedule": "multitask", "sampler.batch_size": 2, "sampler.ratio": 0.5, "sampler.negatives": "none"}), r"params.yaml: sampler.batch_size: 2 at sampler.ratio 0.5 gives multitask 1 mono and 1 cross row per batch; each task needs at least 2 rows, so that every query has an in-batch negative \(or ratio 0 or 1 for one task\)"),
    ("adversarial weight below 0", "train", lambda p: p.params(**{"train.adversarial_weight": -1}), r"params.yaml: train.adversarial_weight: -1 must be >= 0"),
    ("unknown query noise", "train", lambda p: p.params(**{"train.query_noise": ["blur"]}), r"params.yaml: train.query_noise\[0\]: unknown noise 'blur'"),
    ("translation model offline", "translate", lambda p: p.params(**{"translate.model": "no-such-org/no-such-nllb"}), r"params.yaml: translate.model: cannot load 'no-such-org/no-such-nllb'"),
]  # fmt: skip


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _add_param(p: Project, group: str, name: str, value) -> None:
    params = yaml.safe_load((p.root / "params.yaml").read_text())
    params.setdefault(group, {})[name] = value
    (p.root / "params.yaml").write_text(yaml.safe_dump(params))


def _duplicate(p: Project, key_prefix: str) -> None:
    """Give the first line starting with `key_prefix` twice (the second value 0.25), as a hand edit might."""
    lines = (p.root / "params.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(key_prefix))
    lines.insert(at + 1, key_prefix + "0.25")
    (p.root / "params.yaml").write_text("\n".join(lines) + "\n")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file() and "__pycache__" not in f.parts}


@pytest.mark.parametrize(("stage", "breaks", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_line_and_touches_nothing(project, monkeypatch, capsys, stage, breaks, message):
    breaks(project)
    before = _snapshot(project.root)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [stage])
    with pytest.raises(SystemExit) as exit_:
        run_stage(STAGES[stage].main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(f"error: {message}.*", lines[0]), lines[0]
    assert _snapshot(project.root) == before


def test_the_matrix_covers_every_stage_and_every_file_between_stages():
    assert {stage for _, stage, _, _ in CASES} == set(STAGES)
    messages = "\n".join(message.replace("\\", "") for *_, message in CASES)
    for path in (PAIRS_PATH, PLAN_PATH, *raw_tables("xquad_r"), BASE_MODEL_DIR):
        assert str(path) in messages, f"no bad-input case names {path}"
