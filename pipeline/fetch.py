"""The `fetch` stage: turn the raw QA sources into the Parquet tables of `contracts.py`.

Sources fetched = {data.train} ∪ data.eval. LAReQA files come from the offline
mirror when HYBRIDIR_MIRROR is set, otherwise they are downloaded (and cached in
`data/downloads/`); either way each file must match its pinned sha256, so every
run sees the same bytes. The English `squad` source is a local SQuAD v1.1 .json
file or a Hugging Face dataset id. Data of the user's own (docs/own-data.md) is one
row per (group, language), read with `datasets` from a .parquet, .jsonl or .csv file,
a `save_to_disk` folder or a hub id, and written as the source `own`. Every source is
parsed and validated before anything is written, so a bad input never leaves a
partial `data/raw/` behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import requests

from pipeline.common import (
    PipelineError,
    atomic_outputs,
    atomic_path,
    first_line,
    progress,
    run_stage,
    stage_parser,
    write_parquet,
)
from pipeline.contracts import CANDIDATES_SCHEMA, OWN_SOURCE, QUESTIONS_SCHEMA, raw_stamp, raw_tables
from pipeline.params import DataParams, load_params
from pipeline.sources.catalogue import (
    LAREQA_SOURCES,
    OWN_DATA_DIR,
    OWN_FILE_LOADERS,
    SQUAD_SOURCES,
    LareqaSource,
    raw_source,
)
from pipeline.sources.languages import NLLB_CODES

log = logging.getLogger(__name__)

DOWNLOADS_DIR = Path("data/downloads")

Tables = tuple[pa.Table, pa.Table]  # (questions, candidates)

_JSON_TYPES = {str: "a string", int: "an integer", list: "an array", dict: "an object"}


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", float: "a number", type(None): "null"}
    return names.get(type(value)) or _JSON_TYPES.get(type(value), type(value).__name__)


def _get(obj: Any, key: str, typ: type, where: str, origin: str) -> Any:
    """obj[key], checked to be of JSON type `typ`; errors name the file and the field path."""
    if not isinstance(obj, dict):
        raise PipelineError(f"{origin}: {where or 'top level'}: expected an object, got {_json_type(obj)}")
    if key not in obj:
        raise PipelineError(f"{origin}: {where + ': ' if where else ''}missing field '{key}'")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        path = f"{where}.{key}" if where else key
        raise PipelineError(f"{origin}: {path}: expected {_JSON_TYPES[typ]}, got {_json_type(value)}")
    return value


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, want: str, origin: str) -> None:
    """Refuse bytes that differ from the pinned ones: results must not drift with upstream edits."""
    got = sha256_hex(data)
    if got != want:
        raise PipelineError(f"{origin}: sha256 {got} does not match the pinned {want} (corrupted or changed file)")


def decode_json(data: bytes, origin: str) -> Any:
    """Decode UTF-8 JSON bytes, with one-line errors that point into the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PipelineError(f"{origin}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineError(f"{origin}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None


# Sentence-final punctuation (optionally closed by quotes/brackets) followed by
# whitespace and then something other than a lowercase letter ("e.g. the" stays whole).
_SENTENCE = re.compile(r"""\S(?:.*?[.!?]["'”’)\]]*(?=\s+[^\sa-z])|(?:.*\S)?)""", re.DOTALL)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """[start, end) offsets of the sentences of `text`, for SQuAD contexts that lack sentence_breaks.

    A small regex rather than a library: no sentence splitter is among the
    project's dependencies, and NLTK's punkt would need a data download that
    offline machines cannot make. It splits after . ! ? (and closing quotes)
    followed by whitespace and a character that is not a lowercase letter, so
    abbreviations before a capital ("Dr. Who") are split too; in a candidate
    pool that only costs a few short candidates.
    """
    return [m.span() for m in _SENTENCE.finditer(text)]


def _sentence_breaks(par: dict, context: str, where: str, origin: str) -> list[tuple[int, int]]:
    """A LAReQA paragraph's sentence_breaks, checked to be ordered, disjoint and inside the context."""
    breaks = _get(par, "sentence_breaks", list, where, origin)
    checked, prev_end = [], 0
    for n, brk in enumerate(breaks):
        at = f"{origin}: {where}.sentence_breaks[{n}]"
        if not (isinstance(brk, list) and len(brk) == 2 and all(type(x) is int for x in brk)):
            raise PipelineError(f"{at}: expected [start, end] integers, got {json.dumps(brk)[:80]}")
        start, end = brk
        if not 0 <= start < end:
            raise PipelineError(f"{at}: [{start}, {end}] is empty or reversed")
        if end > len(context):
            raise PipelineError(f"{at}: [{start}, {end}] runs past the context (length {len(context)})")
        if start < prev_end:
            raise PipelineError(f"{at}: [{start}, {end}] overlaps the previous break (which ends at {prev_end})")
        checked.append((start, end))
        prev_end = end
    return checked


def _parse(doc: Any, lang: str, origin: str, split: Callable[[str], list[tuple[int, int]]] | None) -> Tables:
    """Shared parser of SQuAD-format documents.

    With `split=None` the sentences are the paragraph's `sentence_breaks`
    (LAReQA); otherwise `split(context)` makes them, and paragraphs repeating an
    earlier context share its candidates (SQuAD repeats a context per question).
    """
    q_group, q_text, q_answer, q_article, q_paragraph = [], [], [], [], []
    c_para, c_index, c_sentence = [], [], []
    first_seen: dict[str, str] = {}  # question id -> where it first appeared
    known: dict[str, tuple[int, list[int], list[int]]] = {}  # context -> (first candidate, starts, ends)
    n_paragraphs = 0
    for i, article in enumerate(_get(doc, "data", list, "", origin)):
        for j, par in enumerate(_get(article, "paragraphs", list, f"data[{i}]", origin)):
            where = f"data[{i}].paragraphs[{j}]"
            context = _get(par, "context", str, where, origin)
            if split is not None and context in known:
                first, starts, ends = known[context]
            else:
                breaks = _sentence_breaks(par, context, where, origin) if split is None else split(context)
                first, starts, ends = len(c_sentence), [s for s, _ in breaks], [e for _, e in breaks]
                for n, (start, end) in enumerate(breaks):
                    c_para.append(n_paragraphs)
                    c_index.append(n)
                    c_sentence.append(context[start:end])
                n_paragraphs += 1
                if split is not None:
                    known[context] = (first, starts, ends)
            for k, qa in enumerate(_get(par, "qas", list, where, origin)):
                q_where = f"{where}.qas[{k}]"
                qid = _get(qa, "id", str, q_where, origin)
                question = _get(qa, "question", str, q_where, origin)
                answers = _get(qa, "answers", list, q_where, origin)
                if len(answers) != 1:
                    raise PipelineError(f"{origin}: {q_where}.answers: expected exactly one answer, got {len(answers)}")
                a_where = f"{q_where}.answers[0]"
                start = _get(answers[0], "answer_start", int, a_where, origin)
                text = _get(answers[0], "text", str, a_where, origin)
                if not 0 <= start < len(context):
                    raise PipelineError(f"{origin}: {a_where}.answer_start: {start} is outside the context (length {len(context)})")
                pos = start + len(text) - len(text.lstrip())  # an answer's leading blanks may sit between sentences
                n = bisect_right(starts, pos) - 1
                if n < 0 or pos >= ends[n]:
                    raise PipelineError(f"{origin}: {a_where}.answer_start: {start} is outside every sentence break of its paragraph")
                if qid in first_seen:
                    raise PipelineError(f"{origin}: {q_where}.id: duplicate question id '{qid}' (first at {first_seen[qid]})")
                first_seen[qid] = q_where
                q_group.append(qid)
                q_text.append(question)
                q_answer.append(first + n)
                q_article.append(f"{lang}:{i}")
                q_paragraph.append(f"{lang}:{c_para[first + n]}")
    if not q_group:
        raise PipelineError(f"{origin}: no questions (every language needs at least one)")
    questions = pa.table(
        {
            "group_id": q_group,
            "lang": [lang] * len(q_group),
            "question": q_text,
            "answer_candidate": q_answer,
            "article": q_article,
            "paragraph": q_paragraph,
        },
        schema=QUESTIONS_SCHEMA,
    )
    candidates = pa.table(
        {
            "lang": [lang] * len(c_sentence),
            "candidate": list(range(len(c_sentence))),
            "paragraph": c_para,
            "sentence_index": c_index,
            "sentence": c_sentence,
        },
        schema=CANDIDATES_SCHEMA,
    )
    return questions, candidates


def link_across_languages(questions: pa.Table) -> pa.Table:
    """The questions with `article` and `paragraph` made ids shared across languages.

    A parsed file names its own articles and paragraphs (`de:3`); a question id is shared by
    its translations. Two units are one when a question links them, at any remove (connected
    components of the question-unit graph), so a paragraph id is the same in every language,
    and a held-out article (docs/evaluation.md, the dev split) takes every translation with it.
    Ids are numbered in order of each component's first question, so they are deterministic."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    groups, group_of = np.unique(questions["group_id"].to_numpy(zero_copy_only=False), return_inverse=True)
    columns = {}
    for column, prefix in (("article", "a"), ("paragraph", "p")):
        units, unit_of = np.unique(questions[column].to_numpy(zero_copy_only=False), return_inverse=True)
        n = len(groups) + len(units)
        edges = coo_matrix((np.ones(len(group_of)), (group_of, len(groups) + unit_of)), shape=(n, n))
        _, label = connected_components(edges, directed=False)
        row_label = label[group_of]
        order = {component: k for k, component in enumerate(dict.fromkeys(row_label.tolist()))}
        columns[column] = pa.array([f"{prefix}{order[component]:05d}" for component in row_label.tolist()], pa.string())
    for column, values in columns.items():
        questions = questions.set_column(questions.schema.get_field_index(column), QUESTIONS_SCHEMA.field(column), values)
    return questions


def parse_lareqa(doc: Any, lang: str, origin: str) -> Tables:
    """One LAReQA language file → (questions, candidates); `origin` names the file in errors."""
    return _parse(doc, lang, origin, split=None)


def parse_squad(doc: Any, origin: str) -> Tables:
    """A SQuAD v1.1 document (no sentence_breaks) → English (questions, candidates)."""
    questions, candidates = _parse(doc, "en", origin, split=split_sentences)
    return link_across_languages(questions), candidates


def squad_rows_to_doc(rows: Iterable[dict]) -> dict:
    """Hugging Face SQuAD rows → a SQuAD document: the rows of each title (in order of first
    appearance) become one article, data[k].paragraphs[j] the j-th row of the k-th title, so a
    held-out article keeps all of its paragraphs (rows without a title make one article).

    Field checks are left to `parse_squad`, so both squad routes validate alike.
    """

    def answers(value: Any) -> Any:
        if isinstance(value, dict) and all(isinstance(value.get(k), list) for k in ("text", "answer_start")):
            return [{"text": t, "answer_start": s} for t, s in zip(value["text"], value["answer_start"])]
        return value

    articles: dict[Any, list[dict]] = {}
    for row in rows:
        qa = {key: row[key] for key in ("id", "question") if key in row}
        if "answers" in row:
            qa["answers"] = answers(row["answers"])
        par = {"qas": [qa]}
        if "context" in row:
            par["context"] = row["context"]
        articles.setdefault(row.get("title"), []).append(par)
    return {"data": [{"title": title, "paragraphs": paragraphs} for title, paragraphs in articles.items()]}


def download(url: str, dest: Path, want_sha256: str, tries: int = 3, backoff_s: float = 1.0, timeout_s: float = 60) -> bytes:
    """The pinned bytes of `url`, cached at `dest`; retries transient failures with exponential backoff.

    The cache file is only moved into place once its sha256 matches, so a
    failed or corrupted download is never reused.
    """
    if dest.exists():
        data = dest.read_bytes()
        if sha256_hex(data) == want_sha256:
            return data
    with atomic_path(dest) as tmp:
        for attempt in range(1, tries + 1):
            try:
                with requests.get(url, stream=True, timeout=timeout_s) as resp:
                    if 400 <= resp.status_code < 500:
                        raise PipelineError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                    resp.raise_for_status()
                    total = int(resp.headers.get("content-length", 0)) or None
                    bar = progress(total=total, unit="B", unit_scale=True, desc=dest.name)
                    with tmp.open("wb") as f, bar:
                        for chunk in resp.iter_content(chunk_size=1 << 16):
                            f.write(chunk)
                            bar.update(len(chunk))
                break
            except requests.RequestException as err:
                if attempt == tries:
                    raise PipelineError(f"{url}: download failed after {tries} tries ({err})") from None
                time.sleep(backoff_s * 2 ** (attempt - 1))
        data = tmp.read_bytes()
        check_sha256(data, want_sha256, url)
    return data


def fetch_lareqa(source: LareqaSource, mirror: Path | None, downloads: Path) -> Tables:
    """All languages of a LAReQA source, from the mirror if given, else downloaded into `downloads`."""
    parts = []
    for lang in source.langs:
        if mirror is not None:
            path = mirror / source.mirror_dir / f"{lang}.json"
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise PipelineError(f"{path}: file not found in the mirror (HYBRIDIR_MIRROR={mirror})") from None
            check_sha256(data, source.sha256[lang], str(path))
        else:
            path = downloads / source.name / f"{lang}.json"
            data = download(source.url_template.format(lang=lang), path, source.sha256[lang])
        parts.append(parse_lareqa(decode_json(data, str(path)), lang, str(path)))
    return link_across_languages(pa.concat_tables([q for q, _ in parts])), pa.concat_tables([c for _, c in parts])


def fetch_squad(spec: str, split: str) -> Tables:
    """The `squad` source: a local SQuAD v1.1 .json file, or else a Hugging Face dataset id."""
    if spec.endswith(".json"):
        try:
            data = Path(spec).read_bytes()
        except FileNotFoundError:
            raise PipelineError(f"params.yaml: data.squad: file not found: {spec}") from None
        return parse_squad(decode_json(data, spec), spec)
    import datasets  # slow to import, and only this route needs it

    try:
        rows = datasets.load_dataset(spec, split=split).to_list()
    except Exception as err:  # datasets raises many unrelated types for "not reachable / not found"
        raise PipelineError(
            f"params.yaml: data.squad: cannot load dataset '{spec}' (offline? {type(err).__name__}: {first_line(err)})"
        ) from None
    return parse_squad(squad_rows_to_doc(rows), f"dataset '{spec}' split '{split}' (data[k].paragraphs[j]: the j-th row of its k-th title)")


OWN_COLUMNS = ("group_id", "lang", "question", "passage")  # and optionally `negative` (docs/own-data.md)


def load_own_data(spec: str) -> pa.Table:
    """`data.train`'s data of the user's own, read with `datasets`: a file by its suffix, a `save_to_disk`
    folder, else a hub dataset id (or a local folder of data files); its `train` split."""
    import datasets  # slow to import, and only this route and squad's need it

    datasets.disable_progress_bars()  # "Generating train split" frames would fill DVC's log, or bury an error line under them
    path = Path(spec)
    builder = OWN_FILE_LOADERS.get(path.suffix.lower())
    if builder and not path.is_file():
        raise PipelineError(f"params.yaml: data.train: file not found: {spec}")
    try:
        if builder:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(spec, split="train")
    except Exception as err:  # datasets raises many unrelated types for "unreadable / not reachable / not found"
        raise PipelineError(f"params.yaml: data.train: cannot read '{spec}' ({type(err).__name__}: {first_line(err)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise PipelineError(f"{spec}: no 'train' split (it has {', '.join(dataset)})")
        dataset = dataset["train"]
    return dataset.with_format("arrow")[:]


def _own_columns(rows: pa.Table, origin: str) -> pd.DataFrame:
    """The schema's columns as text (integer group ids become text), checked to be there and to be text."""
    missing = [name for name in OWN_COLUMNS if name not in rows.column_names]
    if missing:
        raise PipelineError(f"{origin}: missing column '{missing[0]}' (it has: {', '.join(rows.column_names) or 'no columns'})")
    columns = {}
    for name in (*OWN_COLUMNS, *(["negative"] if "negative" in rows.column_names else [])):
        column = rows[name]
        if name == "group_id" and pa.types.is_integer(column.type):
            column = column.cast(pa.string())
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
            raise PipelineError(f"{origin}: column '{name}' holds {column.type}, expected text")
        columns[name] = column.to_pylist()
    negatives = columns.get("negative", [None] * rows.num_rows)
    columns["negative"] = [text if text and text.strip() else None for text in negatives]  # blank: no negative
    return pd.DataFrame(columns, dtype=object)


def _check_own_rows(frame: pd.DataFrame, origin: str) -> None:
    """One line for the first row that is empty, of an unknown language or given twice, or group with one language."""
    if frame.empty:
        raise PipelineError(f"{origin}: no rows")
    row = frame.index.to_numpy() + 1  # rows as a reader counts them, from 1 (a CSV's header not counted)
    for name in OWN_COLUMNS:
        empty = frame[name].fillna("").str.strip() == ""
        if empty.any():
            raise PipelineError(f"{origin}: row {row[empty.to_numpy()][0]}: {name} is empty")
    unknown = ~frame["lang"].isin(list(NLLB_CODES))
    if unknown.any():
        at, lang = row[unknown.to_numpy()][0], frame["lang"][unknown].iloc[0]
        known = lang.strip().lower() in NLLB_CODES
        hint = (
            f"did you mean '{lang.strip().lower()}'?"
            if known
            else f"not among the {len(NLLB_CODES)} ISO 639-1 codes of pipeline/sources/languages.py"
        )
        raise PipelineError(f"{origin}: row {at}: lang: unknown language code '{lang}' ({hint})")
    again = np.flatnonzero(frame.duplicated(["group_id", "lang"]).to_numpy())
    if len(again):
        group, lang = frame.loc[again[0], ["group_id", "lang"]]
        first = np.flatnonzero(((frame["group_id"] == group) & (frame["lang"] == lang)).to_numpy())[0]
        raise PipelineError(f"{origin}: rows {row[first]} and {row[again[0]]}: group '{group}' has two '{lang}' rows")
    languages = frame.groupby("group_id", sort=False)["lang"].transform("size").to_numpy()
    if (languages < 2).any():
        at = row[languages < 2][0]
        group, lang = frame.loc[at - 1, ["group_id", "lang"]]
        raise PipelineError(
            f"{origin}: row {at}: group '{group}' has one language only ('{lang}'): a group is one question in two or more languages"
        )


def own_data_tables(rows: pa.Table, origin: str) -> Tables:
    """The user's (group, language) rows, checked, as the raw tables (questions, candidates).

    Each passage is a paragraph of its own, its `negative` (where given) that paragraph's second
    sentence, so `sampler.negatives: paragraph` / `query_language` draw exactly the user's
    negatives, and rows without one get none. A question's article and paragraph are its group,
    so the dev split holds out whole groups.
    """
    frame = _own_columns(rows, origin)
    _check_own_rows(frame, origin)
    frame = frame.sort_values("lang", kind="stable", ignore_index=True)  # each language's rows in file order
    sentences = 1 + frame["negative"].notna().astype(np.int32)
    frame["answer_candidate"] = (sentences.groupby(frame["lang"]).cumsum() - sentences).astype(np.int32)
    frame["paragraph"] = frame.groupby("lang").cumcount().astype(np.int32)
    questions = pa.table(
        {
            "group_id": frame["group_id"],
            "lang": frame["lang"],
            "question": frame["question"],
            "answer_candidate": frame["answer_candidate"],
            "article": frame["group_id"],
            "paragraph": frame["group_id"],
        },
        schema=QUESTIONS_SCHEMA,
    )
    passages = frame.assign(candidate=frame["answer_candidate"], sentence_index=0, sentence=frame["passage"])
    negatives = frame[frame["negative"].notna()]
    negatives = negatives.assign(candidate=negatives["answer_candidate"] + 1, sentence_index=1, sentence=negatives["negative"])
    candidates = pd.concat([passages, negatives]).sort_values(["lang", "candidate"], ignore_index=True)
    return questions, pa.Table.from_pandas(
        candidates[CANDIDATES_SCHEMA.names], CANDIDATES_SCHEMA, preserve_index=False
    ).replace_schema_metadata(None)


def untracked_warning(spec: str) -> str | None:
    """Why DVC would not rerun `fetch` when data of the user's own changes: a file outside data/own/ (the folder
    dvc.yaml lists as fetch's dependency), or a hub dataset, which can change upstream. None for data/own/."""
    path = Path(spec)
    if not path.exists():
        return f"data.train: the hub dataset {spec} is not pinned: DVC reruns fetch when data.train changes, not when the dataset does (`dvc repro -f fetch` reads it again)"
    if Path(OWN_DATA_DIR).resolve() in path.resolve().parents:
        return None
    return f"data.train: {spec} is outside {OWN_DATA_DIR}/, which fetch depends on: DVC will not rerun fetch when it changes (move it into {OWN_DATA_DIR}/)"


def sources_to_fetch(data: DataParams) -> list[str]:
    """The sources whose tables `fetch` writes: data.train's (`own` for data of the user's own), then data.eval's."""
    return list(dict.fromkeys([raw_source(data.train), *data.eval]))


def count_table(tables: dict[str, Tables]) -> str:
    """Rows per (source, language), as a small text table."""
    lines = [f"{'source':<10}{'lang':<6}{'questions':>10}{'candidates':>12}"]
    for name, (questions, candidates) in tables.items():
        q_counts = Counter(questions.column("lang").to_pylist())
        c_counts = Counter(candidates.column("lang").to_pylist())
        for lang in sorted(q_counts):
            lines.append(f"{name:<10}{lang:<6}{q_counts[lang]:>10}{c_counts[lang]:>12}")
    return "\n".join(lines)


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    params = load_params(args.params)
    mirror = os.environ.get("HYBRIDIR_MIRROR")
    tables, made_by = {}, {}
    names = sources_to_fetch(params.data)
    outputs = [path for name in names for path in raw_tables(name)]
    with atomic_outputs(*outputs) as targets:
        for name in names:
            made_by[name] = raw_stamp(name, params.data.train)
            if name == OWN_SOURCE:
                tables[name] = own_data_tables(load_own_data(params.data.train), params.data.train)
            elif name in SQUAD_SOURCES:
                spec, split = params.data.squad, params.data.squad_split
                made_by[name].update(squad=spec, squad_split=split)
                tables[name] = fetch_squad(spec, split)
            else:
                tables[name] = fetch_lareqa(LAREQA_SOURCES[name], Path(mirror) if mirror else None, DOWNLOADS_DIR)
        written = iter(targets)
        for name, (questions, candidates) in tables.items():
            write_parquet(questions, next(written), made_by=made_by[name])
            write_parquet(candidates, next(written), made_by=made_by[name])
    log.info(count_table(tables))
    if OWN_SOURCE in tables:
        warning = untracked_warning(params.data.train)
        if warning:
            log.warning(warning)
        if params.data.license is None:
            log.info(f"note: data.license is not set: the licence of {params.data.train} is not declared (the model card says so)")


if __name__ == "__main__":
    run_stage(main)
