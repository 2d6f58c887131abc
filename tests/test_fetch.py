"""Tests of the `fetch` stage on small real data: slices of the offline mirror and files the tests write."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import fetch
from pipeline.common import PipelineError, read_parquet
from pipeline.contracts import CANDIDATES_SCHEMA, QUESTIONS_SCHEMA
from pipeline.sources.catalogue import LAREQA_SOURCES, XQUAD_R
from tests.helpers import no_questions, write_params

REPO = Path(__file__).parents[1]
MIRROR = Path(os.environ.get("HYBRIDIR_MIRROR") or Path(__file__).parents[2] / "shared" / "mirror")
needs_mirror = pytest.mark.skipif(not (MIRROR / "lareqa").is_dir(), reason=f"no data mirror at {MIRROR}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _slice(lang: str, articles: int = 2) -> dict:
    doc = json.loads((MIRROR / "lareqa" / "xquad-r" / f"{lang}.json").read_text(encoding="utf-8"))
    return {"data": doc["data"][:articles]}


def _write_params(root: Path, **data) -> None:
    data = {"train": "xquad_r", "eval": ["xquad_r"], "squad": "x.json", "squad_split": "train", **data}
    model = {"translate.model": "models/nllb-ct2/any"} if data["train"] == "squad" else {}  # squad is translated
    write_params(
        root,
        seed=1,
        **model,
        **{"evaluate.datasets": [d for d in data["eval"] if d != "squad"] or ["xquad_r"]},
        **{f"data.{k}": v for k, v in data.items()},
    )


def _parquets(root: Path) -> list[Path]:
    return sorted((root / "data").rglob("*.parquet")) if (root / "data").exists() else []


@pytest.fixture(scope="module")
def slices() -> dict[str, dict]:
    if not (MIRROR / "lareqa").is_dir():
        pytest.skip(f"no data mirror at {MIRROR}")
    return {lang: _slice(lang) for lang in ("de", "en")}


@pytest.fixture
def stage(tmp_path, monkeypatch, slices):
    """A working directory with params.yaml and a tmp mirror of two sliced XQuAD-R languages.

    `stage.put(lang, bytes)` writes a mirror file and pins its sha256 (like a real upstream file).
    """
    _write_params(tmp_path)
    mirror_dir = tmp_path / "mirror" / XQUAD_R.mirror_dir
    mirror_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYBRIDIR_MIRROR", str(tmp_path / "mirror"))
    pins: dict[str, str] = {}

    class Stage:
        root = tmp_path

        @staticmethod
        def put(lang: str, data: bytes, pin: bool = True) -> Path:
            path = mirror_dir / f"{lang}.json"
            path.write_bytes(data)
            if pin:
                pins[lang] = _sha(data)
            monkeypatch.setitem(LAREQA_SOURCES, "xquad_r", dataclasses.replace(XQUAD_R, sha256=dict(pins)))
            return path

    for lang, doc in slices.items():
        Stage.put(lang, json.dumps(doc).encode())
    return Stage


# --- pure functions ---------------------------------------------------------------


def test_split_sentences():
    text = 'Alpha is first.  "Beta?" said the second. Then e.g. the third!\nLast one'
    assert [text[s:e] for s, e in fetch.split_sentences(text)] == [
        "Alpha is first.",
        '"Beta?" said the second.',
        "Then e.g. the third!",
        "Last one",
    ]
    assert fetch.split_sentences("   ") == []


@needs_mirror
def test_parse_mirror_slice_finds_answer_sentences(slices):
    doc = slices["de"]
    questions, candidates = fetch.parse_lareqa(doc, "de", "de.json")
    paragraphs = [p for a in doc["data"] for p in a["paragraphs"]]
    qas = [qa for p in paragraphs for qa in p["qas"]]
    assert questions.schema.equals(QUESTIONS_SCHEMA) and candidates.schema.equals(CANDIDATES_SCHEMA)
    assert questions.num_rows == len(qas) == 97
    assert candidates.column("candidate").to_pylist() == list(range(candidates.num_rows))
    assert candidates.column("sentence").to_pylist() == [s for p in paragraphs for s in p["sentences"]]
    assert max(candidates.column("paragraph").to_pylist()) == len(paragraphs) - 1
    assert set(questions.column("lang").to_pylist()) == {"de"}
    sentences = candidates.column("sentence").to_pylist()
    groups, answers = questions.column("group_id").to_pylist(), questions.column("answer_candidate").to_pylist()
    for qa, group, answer in zip(qas, groups, answers):
        assert group == qa["id"]
        assert qa["answers"][0]["text"] in sentences[answer]


@needs_mirror
def test_real_mirror_file_matches_its_pin_and_counts():
    path = MIRROR / XQUAD_R.mirror_dir / "en.json"
    data = path.read_bytes()
    fetch.check_sha256(data, XQUAD_R.sha256["en"], str(path))
    questions, candidates = fetch.parse_lareqa(fetch.decode_json(data, str(path)), "en", str(path))
    assert (questions.num_rows, candidates.num_rows) == (1190, 1180)


def test_sha256_mismatch_message():
    with pytest.raises(PipelineError, match=r"^f\.json: sha256 [0-9a-f]{64} does not match the pinned abc \(corrupted"):
        fetch.check_sha256(b"{}", "abc", "f.json")


# --- the stage, in-process --------------------------------------------------------


def test_stage_writes_both_tables(stage, slices, capsys):
    fetch.main()
    root = stage.root / "data" / "raw" / "xquad_r"
    questions = read_parquet(root / "questions.parquet", QUESTIONS_SCHEMA)
    candidates = read_parquet(root / "candidates.parquet", CANDIDATES_SCHEMA)
    meta = pq.read_schema(root / "questions.parquet").metadata
    assert json.loads(meta[b"hybridir.params"]) == {"source": "xquad_r"}
    assert sorted(set(questions.column("lang").to_pylist())) == ["de", "en"]
    parsed = [fetch.parse_lareqa(slices[lang], lang, "x") for lang in ("de", "en")]
    linked = fetch.link_across_languages(pa.concat_tables([q for q, _ in parsed]))
    for lang, (_, expected_c) in zip(("de", "en"), parsed):
        assert questions.filter(pc.equal(questions["lang"], lang)).equals(linked.filter(pc.equal(linked["lang"], lang)))
        assert candidates.filter(pc.equal(candidates["lang"], lang)).equals(expected_c)
    # parallel questions share their group ids, and so their article and paragraph ids, across languages
    by_lang = [questions.filter(pc.equal(questions["lang"], lang)).to_pandas().set_index("group_id") for lang in ("de", "en")]
    assert set(by_lang[0].index) == set(by_lang[1].index)
    shared = by_lang[0].index
    assert (by_lang[0].loc[shared, ["article", "paragraph"]] == by_lang[1].loc[shared, ["article", "paragraph"]]).all().all()
    assert questions["article"].to_pylist()[0] == "a00000" and len(set(questions["paragraph"].to_pylist())) > 1
    out = capsys.readouterr().out
    assert "xquad_r   de" in out and "questions" in out


def _at(doc, a=0, p=0):
    return doc["data"][a]["paragraphs"][p]


def _del_breaks(doc):
    del _at(doc, 0, 2)["sentence_breaks"]


def _str_answer_start(doc):
    _at(doc, 1)["qas"][0]["answers"][0]["answer_start"] = "12"


def _answer_past_context(doc):
    par = _at(doc)
    par["qas"][1]["answers"][0]["answer_start"] = len(par["context"]) + 5


def _answer_outside_breaks(doc):
    par = _at(doc)
    par["sentence_breaks"] = [[0, 1]]
    par["qas"][0]["answers"][0]["answer_start"] = 2


def _overlap(doc):
    breaks = _at(doc)["sentence_breaks"]
    breaks[1][0] = breaks[0][1] - 3


def _past_context(doc):
    par = _at(doc)
    par["sentence_breaks"][-1][1] = len(par["context"]) + 1


def _duplicate_id(doc):
    qas = _at(doc, 0, 1)["qas"]
    qas[1]["id"] = qas[0]["id"]


def _two_answers(doc):
    answers = _at(doc)["qas"][0]["answers"]
    answers.append(dict(answers[0]))


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_del_breaks, "data[0].paragraphs[2]: missing field 'sentence_breaks'"),
        (_str_answer_start, "data[1].paragraphs[0].qas[0].answers[0].answer_start: expected an integer, got a string"),
        (_answer_past_context, "data[0].paragraphs[0].qas[1].answers[0].answer_start: "),
        (_answer_outside_breaks, "qas[0].answers[0].answer_start: 2 is outside every sentence break of its paragraph"),
        (_overlap, "data[0].paragraphs[0].sentence_breaks[1]: "),
        (_past_context, "runs past the context"),
        (_duplicate_id, "data[0].paragraphs[1].qas[1].id: duplicate question id"),
        (_two_answers, "data[0].paragraphs[0].qas[0].answers: expected exactly one answer, got 2"),
        (no_questions, "no questions"),
    ],
)
def test_invalid_file_fails_naming_file_and_field(stage, slices, corrupt, expected):
    doc = copy.deepcopy(slices["de"])
    corrupt(doc)
    path = stage.put("de", json.dumps(doc).encode())
    with pytest.raises(PipelineError) as err:
        fetch.main()
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    assert _parquets(stage.root) == []


def test_specific_messages(stage, slices):
    """The error kinds whose wording the corruption table above only matches loosely."""
    cases = [(_answer_past_context, "is outside the context (length"), (_overlap, "overlaps the previous break")]
    for corrupt, wording in cases:
        doc = copy.deepcopy(slices["de"])
        corrupt(doc)
        stage.put("de", json.dumps(doc).encode())
        with pytest.raises(PipelineError, match=re.escape(wording)):
            fetch.main()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda good: good[:-7], r": malformed JSON at line 1 column \d+"),
        (lambda good: b'{"data": "\xff"}', r": not valid UTF-8 \(byte 0xff at offset 10\)"),
    ],
)
def test_undecodable_file(stage, slices, make, expected):
    path = stage.put("de", make(json.dumps(slices["de"]).encode()))
    with pytest.raises(PipelineError, match=f"^{re.escape(str(path))}{expected}"):
        fetch.main()
    assert _parquets(stage.root) == []


def test_sha256_mismatch_keeps_previous_outputs(stage):
    fetch.main()
    before = {p: p.read_bytes() for p in _parquets(stage.root)}
    path = stage.put("en", b'{"data": []}', pin=False)
    with pytest.raises(PipelineError, match=f"^{re.escape(str(path))}: sha256 .* does not match the pinned"):
        fetch.main()
    assert {p: p.read_bytes() for p in _parquets(stage.root)} == before


def test_missing_mirror_file(stage):
    path = stage.put("de", b"{}")
    path.unlink()
    with pytest.raises(PipelineError, match=f"^{re.escape(str(path))}: file not found in the mirror"):
        fetch.main()


def test_bad_params_subprocess_exits_2_with_one_line(tmp_path):
    _write_params(tmp_path, train="nope")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.fetch"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: data.train: 'nope' is not one of mlqa_r, squad, xquad_r, nor a .parquet, .jsonl or .csv file, "
        "a folder or a hub id (org/name)"
    ]
    assert "Traceback" not in proc.stderr


# --- downloads (from a local HTTP server: no real network) -------------------------


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve `files` (name → bytes) on localhost; names in `fail_once` answer 500 the first time."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")

    class State:
        files: dict[str, bytes] = {}
        fail_once: set[str] = set()
        hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.lstrip("/")
            State.hits.append(name)
            if name in State.fail_once:
                State.fail_once.discard(name)
                self.send_error(500)
            elif name not in State.files:
                self.send_error(404)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(State.files[name])))
                self.end_headers()
                self.wfile.write(State.files[name])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    State.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield State
    httpd.shutdown()
    httpd.server_close()


def test_stage_downloads_without_mirror_and_caches(stage, server, slices, monkeypatch):
    monkeypatch.delenv("HYBRIDIR_MIRROR")
    server.files = {f"{lang}.json": json.dumps(doc).encode() for lang, doc in slices.items()}
    pins = {lang: _sha(server.files[f"{lang}.json"]) for lang in slices}
    source = dataclasses.replace(XQUAD_R, url_template=server.url + "/{lang}.json", sha256=pins)
    monkeypatch.setitem(LAREQA_SOURCES, "xquad_r", source)
    fetch.main()
    assert (stage.root / "data/downloads/xquad_r/de.json").read_bytes() == server.files["de.json"]
    assert len(_parquets(stage.root)) == 2
    fetch.main()  # the second run reads the verified cache
    assert sorted(server.hits) == ["de.json", "en.json"]


def test_download_retries_then_checks_sha256(tmp_path, server):
    server.files = {"a.json": b'{"data": []}'}
    server.fail_once = {"a.json"}
    dest = tmp_path / "cache" / "a.json"
    assert fetch.download(f"{server.url}/a.json", dest, _sha(b'{"data": []}'), backoff_s=0) == b'{"data": []}'
    assert server.hits == ["a.json", "a.json"]
    dest.unlink()
    with pytest.raises(PipelineError, match="a.json: sha256 .* does not match the pinned"):
        fetch.download(f"{server.url}/a.json", dest, "0" * 64, backoff_s=0)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing unverified is cached
    with pytest.raises(PipelineError, match=r"/b.json: HTTP 404"):
        fetch.download(f"{server.url}/b.json", dest, "0" * 64, backoff_s=0)


# --- the English SQuAD-format source -------------------------------------------------

P1 = "Alpha is first. Beta comes second!  Gamma ends it."
P2 = 'Delta is fourth. "Epsilon?" said the fifth.\nZeta.'
SQUAD_QAS = [  # (context, id, question, answer text, answer_start, expected answer_candidate)
    (P1, "q1", "Which comes second?", "Beta", P1.index("Beta"), 1),
    (P2, "q2", "Which is last?", "Zeta", P2.index("Zeta"), 5),
    (P1, "q3", "Which ends it?", " Gamma", P1.index("Gamma") - 1, 2),
]


def _squad_doc() -> dict:
    def qas(ctx):
        return [{"id": i, "question": q, "answers": [{"text": t, "answer_start": s}]} for c, i, q, t, s, _ in SQUAD_QAS if c == ctx]

    paragraphs = [{"context": ctx, "qas": qas(ctx)} for ctx in (P1, P2)]
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def _check_squad_tables(questions, candidates):
    assert candidates.column("sentence").to_pylist() == [
        "Alpha is first.",
        "Beta comes second!",
        "Gamma ends it.",
        "Delta is fourth.",
        '"Epsilon?" said the fifth.',
        "Zeta.",
    ]
    assert candidates.column("paragraph").to_pylist() == [0, 0, 0, 1, 1, 1]
    assert candidates.column("sentence_index").to_pylist() == [0, 1, 2, 0, 1, 2]
    assert set(candidates.column("lang").to_pylist()) == set(questions.column("lang").to_pylist()) == {"en"}
    got = sorted(zip(questions.column("group_id").to_pylist(), questions.column("answer_candidate").to_pylist()))
    assert got == sorted((i, cand) for _, i, _, _, _, cand in SQUAD_QAS)


def test_squad_local_json_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "squad.json").write_text(json.dumps(_squad_doc()), encoding="utf-8")
    _write_params(tmp_path, train="squad", eval=["xquad_r"], squad="squad.json")
    monkeypatch.setattr(fetch, "sources_to_fetch", lambda params: ["squad"])  # the evaluation data is another test's
    fetch.main()
    root = tmp_path / "data" / "raw" / "squad"
    questions = read_parquet(root / "questions.parquet", QUESTIONS_SCHEMA)
    _check_squad_tables(questions, read_parquet(root / "candidates.parquet", CANDIDATES_SCHEMA))
    meta = json.loads(pq.read_schema(root / "candidates.parquet").metadata[b"hybridir.params"])
    assert meta == {"source": "squad", "squad": "squad.json", "squad_split": "train"}


def test_squad_json_errors_name_the_field(tmp_path):
    doc = _squad_doc()
    doc["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] = len(P2)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    field = re.escape("data[0].paragraphs[1].qas[0].answers[0].answer_start")
    with pytest.raises(PipelineError, match=rf"bad.json: {field}: \d+ is outside the context"):
        fetch.fetch_squad(str(path), "train")
    with pytest.raises(PipelineError, match="^params.yaml: data.squad: file not found: nope.json"):
        fetch.fetch_squad("nope.json", "train")


def test_squad_hf_dataset_route_matches_json_route(tmp_path, monkeypatch):
    """A local directory of flat rows loads through `datasets` offline, like a hub id would online."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data_dir = tmp_path / "squad_rows"
    data_dir.mkdir()
    rows = [
        {"id": i, "title": "t", "context": c, "question": q, "answers": {"text": [t], "answer_start": [s]}}
        for c, i, q, t, s, _ in SQUAD_QAS
    ]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    questions, candidates = fetch.fetch_squad(str(data_dir), "train")
    _check_squad_tables(questions, candidates)
    json_q, json_c = fetch.parse_squad(_squad_doc(), "squad.json")
    assert candidates.equals(json_c)
    assert questions.sort_by("group_id").equals(json_q.sort_by("group_id"))


def test_squad_hf_dataset_unreachable(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'rajpurkar/squad' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    expected = "params.yaml: data.squad: cannot load dataset 'rajpurkar/squad' (offline? ConnectionError: Couldn't reach"
    with pytest.raises(PipelineError, match="^" + re.escape(expected)):
        fetch.fetch_squad("rajpurkar/squad", "train")
