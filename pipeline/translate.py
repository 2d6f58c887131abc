"""The `translate` stage: parallel (question, answer sentence) pairs for training.

With `translate.model` set (an NLLB-200 hub id, or a directory already converted for
CTranslate2), the source's `translate.source_lang` questions and passages are
machine-translated into `translate.langs` with CTranslate2. Passages go sentence by
sentence (NLLB is trained on sentences and truncates long inputs), so a paragraph in
any language is its translated sentences in order and the answer sentence keeps its
index; questions go whole. Translations are cached in SQLite, keyed by (model,
languages, text hash), one committed transaction per chunk: a re-run with one more
language translates only that language, and a killed run resumes where it stopped.
Where the source also has human translations (XQuAD-R, MLQA-R), BLEU and chrF++ of
the MT against them go to `metrics/translate.json`.

With `translate.model: null` (the embedded default) the source's own human
translations are passed through unchanged, and the metrics say so.

Outputs, under `data/parallel/`: `questions.parquet` and `candidates.parquet` (the
source's layout, one language per translation) and `pairs.parquet`, one row per
(group, language) with the question and its positive passage (the answer sentence).
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.common import (
    PipelineError,
    atomic_outputs,
    atomic_path,
    first_line,
    progress,
    read_parquet,
    run_stage,
    stage_parser,
    write_json,
    write_parquet,
)
from pipeline.contracts import (
    CANDIDATES_SCHEMA,
    DEV_DIR,
    PAIRS_PATH,
    PAIRS_SCHEMA,
    PARALLEL_CANDIDATES_PATH,
    PARALLEL_QUESTIONS_PATH,
    QUESTIONS_SCHEMA,
    pairs_stamp,
    raw_stamp,
    raw_tables,
)  # fmt: skip
from pipeline.machine import machine_record
from pipeline.params import TranslateParams, as_dict, load_params
from pipeline.sources.catalogue import SQUAD_SOURCES, raw_source
from pipeline.sources.languages import NLLB_CODES

log = logging.getLogger(__name__)

CACHE_PATH = Path("data/cache/translations.sqlite")
CONVERTED_DIR = Path("models/nllb-ct2")
CHUNK_SIZE = 512  # texts per committed cache transaction (and per progress-bar step)


# sacrebleu tokenizers for scripts written without spaces between words.
BLEU_TOKENIZE = {"zh": "zh", "ja": "char", "ko": "char", "th": "char", "my": "char"}


def nllb_code(lang: str, field: str = "translate.langs") -> str:
    try:
        return NLLB_CODES[lang]
    except KeyError:
        raise PipelineError(f"params.yaml: {field}: unknown language code '{lang}' (known: {', '.join(sorted(NLLB_CODES))})") from None


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pairs_from_source(questions: pa.Table, candidates: pa.Table) -> pa.Table:
    """Join every question with its answer sentence in the same language."""
    keyed = candidates.select(["lang", "candidate", "sentence"]).rename_columns(["lang", "answer_candidate", "passage"])
    joined = questions.join(keyed, keys=["lang", "answer_candidate"], join_type="inner")
    if joined.num_rows != questions.num_rows:
        raise PipelineError(f"{questions.num_rows - joined.num_rows} questions point at a candidate that does not exist")
    return joined.select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA).sort_by([("group_id", "ascending"), ("lang", "ascending")])


def dev_articles(questions: pa.Table, share: float, origin: str) -> set[str]:
    """The articles held out as the dev split: round(share x articles) of them, ranked by a hash of
    their id, so the split is the same for every run whatever its training seed, and no paragraph of
    a held-out article (in any language: article ids are shared across languages) is trained on."""
    articles = sorted(set(questions["article"].to_pylist()))
    held_out = round(share * len(articles))
    if share and not 0 < held_out < len(articles):
        raise PipelineError(
            f"params.yaml: data.dev_share: {share} of the {len(articles)} articles of {origin} holds out {held_out}: "
            f"a dev split needs at least one article held out and one left to train on (or set 0 for none)"
        )
    return set(sorted(articles, key=lambda article: hashlib.sha256(article.encode()).hexdigest())[:held_out])


def split_dev(questions: pa.Table, candidates: pa.Table, dev: set[str]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(training questions, dev questions, dev candidates): the dev tables in the raw tables' layout,
    its pool every sentence of the held-out paragraphs, renumbered 0..n-1 per language."""
    in_dev = pc.is_in(questions["article"], pa.array(sorted(dev), pa.string()))
    train_q, dev_q = questions.filter(pc.invert(in_dev)), questions.filter(in_dev)
    cands = candidates.to_pandas()
    local_paragraph = cands.set_index(["lang", "candidate"])["paragraph"]
    q = dev_q.to_pandas()
    held = set(zip(q["lang"], local_paragraph.reindex(pd.MultiIndex.from_frame(q[["lang", "answer_candidate"]])).to_numpy()))
    kept = cands[[(lang, paragraph) in held for lang, paragraph in zip(cands["lang"], cands["paragraph"])]].copy()
    kept["new"] = kept.groupby("lang").cumcount()
    renumber = kept.set_index(["lang", "candidate"])["new"]
    q["answer_candidate"] = renumber.reindex(pd.MultiIndex.from_frame(q[["lang", "answer_candidate"]])).to_numpy()
    kept["candidate"] = kept.pop("new")
    dev_questions = pa.Table.from_pandas(q, QUESTIONS_SCHEMA, preserve_index=False).replace_schema_metadata(None)
    dev_candidates = pa.Table.from_pandas(kept[CANDIDATES_SCHEMA.names], CANDIDATES_SCHEMA, preserve_index=False).replace_schema_metadata(
        None
    )
    return train_q, dev_questions, dev_candidates


def check_no_eval_overlap(train_groups: set[str], evaluated: dict[str, set[str]], data_train: str) -> None:
    """Refuse training questions that an evaluation dataset scores: every figure of it would be on questions
    the model was trained on. By question id, so the dev split held out of the training source stays allowed."""
    for name, ids in evaluated.items():
        shared = train_groups & ids
        if shared:
            raise PipelineError(
                f"{raw_tables(name)[0]}: {len(shared):,} of its questions are training questions (data.train={data_train}, "
                f"e.g. '{min(shared)}'): its figures would be on questions the model was trained on "
                f"(set data.allow_eval_overlap: true if that is what you want)"
            )


def translate_corpus(
    questions: pd.DataFrame, candidates: pd.DataFrame, targets: list[str], translate: Callable[[list[str], str], list[str]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The source questions and candidates, followed by their translation into each target.

    `translate(texts, target)` returns one translation per text. Candidate ids,
    paragraphs and sentence indices are kept, so every question's answer_candidate
    points at the translation of its answer sentence.
    """
    out_q, out_c = [questions], [candidates]
    for target in targets:
        texts = translate(questions["question"].tolist() + candidates["sentence"].tolist(), target)
        if len(texts) != len(questions) + len(candidates):
            raise PipelineError(f"translation into '{target}' returned {len(texts)} texts for {len(questions) + len(candidates)}")
        out_q.append(questions.assign(lang=target, question=texts[: len(questions)]))
        out_c.append(candidates.assign(lang=target, sentence=texts[len(questions) :]))
    return pd.concat(out_q, ignore_index=True), pd.concat(out_c, ignore_index=True)


class TranslationCache:
    """Finished translations in SQLite, keyed by (model, source, target, text hash).

    Each chunk is stored in one transaction, so a killed run leaves whole entries only.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        with self.db:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS translation (model TEXT, source TEXT, target TEXT, "
                "text_hash TEXT, translation TEXT, PRIMARY KEY (model, source, target, text_hash))"
            )

    def lookup(self, model: str, source: str, target: str) -> dict[str, str]:
        rows = self.db.execute(
            "SELECT text_hash, translation FROM translation WHERE model = ? AND source = ? AND target = ?",
            (model, source, target),
        )
        return dict(rows)

    def store(self, model: str, source: str, target: str, translations: dict[str, str]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO translation VALUES (?, ?, ?, ?, ?)",
                [(model, source, target, text_hash(s), t) for s, t in translations.items()],
            )


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int
    max_decoding_length: int
    max_input_tokens: int
    max_batch_tokens: int


class NllbTranslator:
    """A CTranslate2 NLLB model with its own tokenizer: texts in one language → another."""

    def __init__(self, model_dir: Path, device: str, compute_type: str, options: DecodeOptions):
        import ctranslate2
        from transformers import AutoTokenizer

        device_index = list(range(ctranslate2.get_cuda_device_count())) if device == "cuda" else [0]
        self.translator = ctranslate2.Translator(str(model_dir), device=device, device_index=device_index, compute_type=compute_type)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.options = options
        self.truncated = 0  # inputs cut to max_input_tokens

    def tokenize(self, texts: list[str], source_code: str) -> list[list[str]]:
        """NLLB's source format, `<lang> tokens </s>`, cut to max_input_tokens keeping the end token."""
        self.tokenizer.src_lang = source_code
        limit = self.options.max_input_tokens
        pieces = []
        for ids in self.tokenizer(texts)["input_ids"]:
            if len(ids) > limit:
                self.truncated += 1
                ids = ids[: limit - 1] + ids[-1:]
            pieces.append(self.tokenizer.convert_ids_to_tokens(ids))
        return pieces

    def translate(self, texts: list[str], source: str, target: str) -> list[str]:
        target_code = nllb_code(target)
        results = self.translator.translate_batch(
            self.tokenize(texts, nllb_code(source, "translate.source_lang")),
            target_prefix=[[target_code]] * len(texts),
            beam_size=self.options.beam_size,
            max_decoding_length=self.options.max_decoding_length,
            max_batch_size=self.options.max_batch_tokens,
            batch_type="tokens",
        )
        return [self.tokenizer.decode(self.tokenizer.convert_tokens_to_ids(r.hypotheses[0][1:]), skip_special_tokens=True) for r in results]


@dataclass
class TranslationCounts:
    translated: int = 0  # texts sent to the model in this run
    cached: int = 0  # distinct texts found in the cache
    empty_inputs: int = 0
    empty_outputs: int = 0
    seconds: float = 0.0


def cached_translate(
    engine: NllbTranslator, cache: TranslationCache, model_key: str, source: str, counts: TranslationCounts
) -> Callable[[list[str], str], list[str]]:
    """`translate(texts, target)` that translates each distinct text once, ever.

    Texts missing from the cache go longest first in chunks of CHUNK_SIZE (similar
    lengths batch with little padding); each chunk is committed before the next starts.
    """

    def translate(texts: list[str], target: str) -> list[str]:
        done = cache.lookup(model_key, source, target)
        distinct = {t: text_hash(t) for t in texts if t}
        todo = sorted((t for t, h in distinct.items() if h not in done), key=len, reverse=True)
        counts.cached += len(distinct) - len(todo)
        counts.empty_inputs += sum(1 for t in texts if not t)
        bar = progress(total=len(todo), unit="sent", desc=f"translate {source}→{target}")
        start = time.perf_counter()
        with bar:
            for i in range(0, len(todo), CHUNK_SIZE):
                chunk = todo[i : i + CHUNK_SIZE]
                out = engine.translate(chunk, source, target)
                cache.store(model_key, source, target, dict(zip(chunk, out)))
                done.update((distinct[s], t) for s, t in zip(chunk, out))
                counts.translated += len(chunk)
                counts.empty_outputs += sum(1 for t in out if not t.strip())
                bar.update(len(chunk))
        counts.seconds += time.perf_counter() - start
        return [done[distinct[t]] if t else "" for t in texts]

    return translate


def converted_model(model: str, compute_type: str) -> Path:
    """A CTranslate2 directory for `model`: used as it is if already converted, else converted once."""
    path = Path(model)
    if (path / "model.bin").exists():
        return path
    target = CONVERTED_DIR / f"{re.sub(r'[^A-Za-z0-9._-]+', '--', model.strip('/'))}-{compute_type}"
    if (target / "model.bin").exists():
        return target
    import ctranslate2
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        log.info(f"converting {model} to CTranslate2 ({compute_type}) in {target}")
        with atomic_path(target, is_dir=True) as tmp:
            converter = ctranslate2.converters.TransformersConverter(model, low_cpu_mem_usage=True)
            converter.convert(str(tmp), quantization=compute_type, force=True)
            tokenizer.save_pretrained(tmp)
    except OSError as err:  # what transformers raises for an unreachable hub or an unknown id
        raise PipelineError(
            f"params.yaml: translate.model: cannot load '{model}' (not a local model directory, "
            f"and the hub is unreachable or has no such id: {first_line(err)})"
        ) from None
    return target


def quality_report(mt_pairs: pd.DataFrame, human_pairs: pd.DataFrame) -> dict[str, float]:
    """BLEU and chrF++ (sacrebleu) of machine against human translations of the same questions and answer sentences."""
    from sacrebleu.metrics import BLEU, CHRF

    merged = mt_pairs.merge(human_pairs, on=["group_id", "lang"], suffixes=("_mt", "_human"))
    report = {}
    for lang, rows in merged.groupby("lang"):
        hypotheses = rows["question_mt"].tolist() + rows["passage_mt"].tolist()
        references = [rows["question_human"].tolist() + rows["passage_human"].tolist()]
        report[f"bleu.{lang}"] = round(BLEU(tokenize=BLEU_TOKENIZE.get(lang, "13a")).corpus_score(hypotheses, references).score, 2)
        report[f"chrf++.{lang}"] = round(CHRF(word_order=2).corpus_score(hypotheses, references).score, 2)
        report[f"references.{lang}"] = len(hypotheses)
    return report


def machine_translate(
    params: TranslateParams, source: str, questions: pd.DataFrame, candidates: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Translate the source language's questions and candidates into translate.langs; returns them with a report."""
    source_lang = params.source_lang
    targets = [lang for lang in params.langs if lang != source_lang]
    src_q = questions[questions["lang"] == source_lang].reset_index(drop=True)
    src_c = candidates[candidates["lang"] == source_lang].reset_index(drop=True)
    if src_q.empty:
        raise PipelineError(f"{raw_tables(source)[0]}: no '{source_lang}' questions to translate (translate.source_lang)")
    options = DecodeOptions(params.beam_size, params.max_decoding_length, params.max_input_tokens, params.max_batch_tokens)
    import ctranslate2

    device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    compute_type = params.compute_type
    if compute_type == "auto":
        compute_type = "int8_float16" if device == "cuda" else "int8"
    model = params.model
    model_dir = converted_model(model, compute_type)
    engine = NllbTranslator(model_dir, device, compute_type, options)
    model_key = f"{model}|{compute_type}|beam={options.beam_size}|max_len={options.max_decoding_length}|max_in={options.max_input_tokens}"
    counts = TranslationCounts()
    translate = cached_translate(engine, TranslationCache(CACHE_PATH), model_key, source_lang, counts)
    out_q, out_c = translate_corpus(src_q, src_c, targets, translate)
    for what, n in (
        ("were empty", counts.empty_inputs),
        ("came back empty", counts.empty_outputs),
        (f"were cut to {options.max_input_tokens} tokens", engine.truncated),
    ):
        if n:
            log.warning(f"{n} source texts {what}")
    report = {
        "model": model,
        "device": device,
        "compute_type": compute_type,
        "source_lang": source_lang,
        "texts_translated": counts.translated,
        "texts_from_cache": counts.cached,
        "texts_truncated": engine.truncated,
        "empty_inputs": counts.empty_inputs,
        "empty_outputs": counts.empty_outputs,
        "sentences_per_s": round(counts.translated / counts.seconds, 1) if counts.seconds else None,
        "machine": machine_record(device, compute_type),
    }
    return out_q, out_c, report


def main() -> None:
    args = stage_parser(__doc__, out=str(PAIRS_PATH), metrics="metrics/translate.json", dev=str(DEV_DIR)).parse_args()
    params = load_params(args.params)
    source = params.data.train
    model = params.translate.model
    out_dir = Path(args.out).parent
    outputs = (out_dir / PARALLEL_QUESTIONS_PATH.name, out_dir / PARALLEL_CANDIDATES_PATH.name, args.out, args.metrics, args.dev)
    with atomic_outputs(*outputs) as (questions_out, candidates_out, pairs_out, metrics_out, dev_out):
        fetched = raw_source(source)
        questions_path, candidates_path = raw_tables(fetched)
        fetched_by = raw_stamp(fetched, source)
        questions = read_parquet(questions_path, QUESTIONS_SCHEMA, made_by=fetched_by)
        candidates = read_parquet(candidates_path, CANDIDATES_SCHEMA, made_by=fetched_by)
        if model is None:
            report = {"model": "none (human translations passed through)"}
            made_by = {**pairs_stamp(source, params.data.dev_share), "translate.model": None}
        else:
            q_frame, c_frame, report = machine_translate(params.translate, fetched, questions.to_pandas(), candidates.to_pandas())
            human = pairs_from_source(questions, candidates)  # references, where the source has them
            questions = pa.Table.from_pandas(q_frame, QUESTIONS_SCHEMA, preserve_index=False).replace_schema_metadata(None)
            candidates = pa.Table.from_pandas(c_frame, CANDIDATES_SCHEMA, preserve_index=False).replace_schema_metadata(None)
            made_by = {**pairs_stamp(source, params.data.dev_share), "translate": as_dict(params.translate)}
        dev = dev_articles(questions, params.data.dev_share, str(questions_path.parent))
        questions, dev_questions, dev_candidates = split_dev(questions, candidates, dev)
        if not params.data.allow_eval_overlap:
            evaluated = {
                name: set(read_parquet(raw_tables(name)[0], QUESTIONS_SCHEMA).column("group_id").to_pylist())
                for name in params.evaluate.datasets
            }
            check_no_eval_overlap(set(questions["group_id"].to_pylist()), evaluated, source)
        pairs = pairs_from_source(questions, candidates)
        if model is not None and source not in SQUAD_SOURCES:
            machine = pairs.to_pandas().query("lang != @report['source_lang']")
            report.update(quality_report(machine, human.to_pandas()))
        per_lang = dict(zip(*pairs.group_by("lang").aggregate([("group_id", "count")]).to_pydict().values()))
        report.update(
            source=source,
            groups=len(set(pairs["group_id"].to_pylist())),
            **{f"pairs.{lang}": n for lang, n in sorted(per_lang.items())},
            **{
                "dev.articles": len(dev),
                "dev.groups": len(set(dev_questions["group_id"].to_pylist())),
                "dev.questions": dev_questions.num_rows,
            },
        )
        dev_out.mkdir()
        write_parquet(dev_questions, dev_out / "questions.parquet", made_by=made_by)
        write_parquet(dev_candidates, dev_out / "candidates.parquet", made_by=made_by)
        write_parquet(questions, questions_out, made_by=made_by)
        write_parquet(candidates, candidates_out, made_by=made_by)
        write_parquet(pairs, pairs_out, made_by=made_by)
        write_json(report, metrics_out)
    how = "human translations, no MT" if model is None else f"MT by {model}"
    log.info(
        f"wrote {args.out}: {pairs.num_rows} pairs from {source} ({how}); {args.dev}: {report['dev.questions']} questions of "
        f"{report['dev.articles']} held-out articles (data.dev_share {params.data.dev_share})"
    )


if __name__ == "__main__":
    run_stage(main)
