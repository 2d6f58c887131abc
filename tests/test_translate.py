"""The translate stage on a tiny random-weight NLLB-architecture model built and converted here.

Structure is asserted (alignment, prefixes, cache, resumption, errors), never quality.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from pipeline import translate
from pipeline.common import PipelineError, read_parquet, write_parquet
from pipeline.contracts import CANDIDATES_SCHEMA, PAIRS_SCHEMA, QUESTIONS_SCHEMA
from pipeline.fetch import parse_lareqa, parse_squad
from pipeline.sources.catalogue import MLQA_R, XQUAD_R
from tests.helpers import REPO, mirror_file, write_params

SQUAD_DOC = {
    "data": [
        {
            "paragraphs": [
                {
                    "context": "The river is long. It flows north. Cities lie on its banks.",
                    "qas": [
                        {"id": "q1", "question": "Where does it flow?", "answers": [{"text": "north", "answer_start": 28}]},
                        {"id": "q2", "question": "What lies on its banks?", "answers": [{"text": "Cities", "answer_start": 35}]},
                    ],
                },
                {
                    "context": "Bread is baked daily. The oven is hot.",
                    "qas": [{"id": "q3", "question": "Is the oven hot?", "answers": [{"text": "hot", "answer_start": 34}]}],
                },
            ]
        }
    ]
}


def build_tiny_nllb(out: Path, texts: list[str]) -> Path:
    """A random NLLB-architecture (M2M100) model, 1+1 layers, with a character vocabulary of `texts`.

    The output embedding rows of special and language tokens are zeroed so that
    greedy decoding emits characters (a random model would otherwise emit language
    codes, which decode to nothing).
    """
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "▁": 4}
    for char in sorted({c for t in texts for c in t if not c.isspace()}):
        vocab.setdefault(char, len(vocab))
    tokenizer = NllbTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    config = M2M100Config(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=256, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    model = M2M100ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.shared.weight[:4] = 0
        model.model.shared.weight[len(vocab) :] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _texts() -> list[str]:
    texts = []
    for par in SQUAD_DOC["data"][0]["paragraphs"]:
        texts += [par["context"]] + [qa["question"] for qa in par["qas"]]
    return texts


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    xquad = [mirror_file(f"lareqa/xquad-r/{lang}.json") for lang in ("en", "de")]
    texts = _texts() + [p.read_text(encoding="utf-8")[:20000] for p in xquad]
    return build_tiny_nllb(tmp_path_factory.mktemp("nllb") / "hf", texts)


@pytest.fixture(scope="module")
def tiny_ct2(tiny_hf, tmp_path_factory) -> Path:
    import ctranslate2
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("nllb") / "ct2"
    ctranslate2.converters.TransformersConverter(str(tiny_hf)).convert(str(out), quantization="int8")
    AutoTokenizer.from_pretrained(tiny_hf).save_pretrained(out)
    return out


def _workdir(root: Path, monkeypatch, model, train: str = "squad", langs=("en", "de", "fr"), **translate_params) -> Path:
    """`root` as a project: params.yaml and the source's raw tables, as `fetch` writes them."""
    translate = {
        "model": None if model is None else str(model), "source_lang": "en", "langs": list(langs),
        "compute_type": "int8", "beam_size": 1, "max_decoding_length": 12, "max_input_tokens": 64,
        "max_batch_tokens": 256, **translate_params,
    }  # fmt: skip
    write_params(
        root,
        seed=1,
        **{"data.train": train, "data.dev_share": 0, "data.allow_eval_overlap": True},
        **{f"translate.{k}": v for k, v in translate.items()},
    )
    raw = root / "data" / "raw" / train
    if train == "squad":
        questions, candidates = parse_squad(SQUAD_DOC, "squad.json")
    else:
        parts = []
        for lang in ("en", "de"):
            doc = json.loads(mirror_file(f"lareqa/xquad-r/{lang}.json").read_text(encoding="utf-8"))
            parts.append(parse_lareqa({"data": doc["data"][:1]}, lang, f"{lang}.json"))
        questions = pa.concat_tables([q for q, _ in parts])
        candidates = pa.concat_tables([c for _, c in parts])
    write_parquet(questions, raw / "questions.parquet", made_by={"source": train})
    write_parquet(candidates, raw / "candidates.parquet", made_by={"source": train})
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["translate"])
    return root


def _outputs(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    parallel = root / "data" / "parallel"
    return (
        read_parquet(parallel / "questions.parquet", QUESTIONS_SCHEMA).to_pandas(),
        read_parquet(parallel / "candidates.parquet", CANDIDATES_SCHEMA).to_pandas(),
        read_parquet(parallel / "pairs.parquet", PAIRS_SCHEMA).to_pandas(),
        json.loads((root / "metrics" / "translate.json").read_text(encoding="utf-8")),
    )


def _distinct_texts() -> int:
    questions, candidates = parse_squad(SQUAD_DOC, "squad.json")
    return len(set(questions["question"].to_pylist()) | set(candidates["sentence"].to_pylist()))


# --- pure functions -----------------------------------------------------------------


def test_language_table_covers_the_datasets_and_refuses_unknown_codes():
    for lang in set(XQUAD_R.langs) | set(MLQA_R.langs):
        assert translate.nllb_code(lang).split("_")[1] in {"Arab", "Latn", "Cyrl", "Grek", "Deva", "Thai", "Hans"}
    assert translate.nllb_code("zh") == "zho_Hans" and translate.nllb_code("en") == "eng_Latn"
    with pytest.raises(PipelineError, match=r"^params.yaml: translate.langs: unknown language code 'xx' \(known: af, "):
        translate.nllb_code("xx")


def test_translate_corpus_keeps_every_sentence_and_the_answer_index():
    questions, candidates = (t.to_pandas() for t in parse_squad(SQUAD_DOC, "squad.json"))
    out_q, out_c = translate.translate_corpus(questions, candidates, ["de", "fr"], lambda texts, target: [f"{target}:{t}" for t in texts])
    assert len(out_q) == 3 * len(questions) and len(out_c) == 3 * len(candidates)
    for lang in ("de", "fr"):
        q, c = out_q[out_q["lang"] == lang], out_c[out_c["lang"] == lang]
        assert q["question"].tolist() == [f"{lang}:{t}" for t in questions["question"]]
        assert q[["group_id", "answer_candidate"]].values.tolist() == questions[["group_id", "answer_candidate"]].values.tolist()
        assert c["sentence"].tolist() == [f"{lang}:{t}" for t in candidates["sentence"]]
        assert (
            c[["candidate", "paragraph", "sentence_index"]].values.tolist()
            == candidates[["candidate", "paragraph", "sentence_index"]].values.tolist()
        )
    pairs = translate.pairs_from_source(
        pa.Table.from_pandas(out_q, QUESTIONS_SCHEMA, preserve_index=False),
        pa.Table.from_pandas(out_c, CANDIDATES_SCHEMA, preserve_index=False),
    ).to_pandas()
    q1_de = pairs[(pairs["group_id"] == "q1") & (pairs["lang"] == "de")].iloc[0]
    assert (q1_de["question"], q1_de["passage"]) == ("de:Where does it flow?", "de:It flows north.")


def test_quality_report_scores_identical_text_100_and_others_lower():
    human = pd.DataFrame(
        {
            "group_id": ["a", "b"],
            "lang": ["de", "de"],
            "question": ["Wo ist es?", "Wer war das?"],
            "passage": ["Es ist hier.", "Das war er."],
        }
    )
    same = translate.quality_report(human, human)
    assert same == {"bleu.de": 100.0, "chrf++.de": 100.0, "references.de": 4}
    wrong = translate.quality_report(human.assign(question=["Wie spät?", "Nein."]), human)
    assert wrong["bleu.de"] < 100 and wrong["chrf++.de"] < 100


# --- the CTranslate2 engine -----------------------------------------------------------


class RecordingTranslator:
    """Passes calls to a ctranslate2.Translator and keeps what it was given."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def translate_batch(self, source, **options):
        self.calls.append((source, options))
        return self.inner.translate_batch(source, **options)


def test_engine_applies_language_codes_and_cuts_long_inputs(tiny_ct2):
    options = translate.DecodeOptions(beam_size=2, max_decoding_length=10, max_input_tokens=20, max_batch_tokens=64)
    engine = translate.NllbTranslator(tiny_ct2, "cpu", "int8", options)
    engine.translator = RecordingTranslator(engine.translator)
    texts = ["It flows north.", "The river is long and it flows north past many cities."]
    out = engine.translate(texts, "en", "de")
    ((source, kwargs),) = engine.translator.calls
    assert [s[0] for s in source] == ["eng_Latn", "eng_Latn"] and all(s[-1] == "</s>" for s in source)
    assert len(source[0]) == len("It flows north.".replace(" ", "")) + 3 + 2  # chars, 3 "▁", code, </s>
    assert len(source[1]) == 20 and engine.truncated == 1
    assert kwargs["target_prefix"] == [["deu_Latn"], ["deu_Latn"]] and kwargs["beam_size"] == 2
    assert kwargs["batch_type"] == "tokens" and kwargs["max_batch_size"] == 64
    assert len(out) == 2 and all(isinstance(t, str) and t.strip() for t in out)
    assert not any(code in t for t in out for code in ("deu_Latn", "eng_Latn", "</s>"))


# --- the stage ------------------------------------------------------------------------


def test_stage_converts_once_translates_each_text_once_and_caches(tiny_hf, tmp_path, monkeypatch):
    root = _workdir(tmp_path, monkeypatch, tiny_hf)
    translate.main()
    questions, candidates, pairs, metrics = _outputs(root)
    converted = list((root / "models" / "nllb-ct2").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.bin").exists() and (converted[0] / "tokenizer.json").exists()
    n = _distinct_texts()
    assert metrics["texts_translated"] == 2 * n and metrics["texts_from_cache"] == 0
    assert metrics["compute_type"] == "int8" and metrics["device"] == "cpu"
    assert sorted(pairs["lang"].unique()) == ["de", "en", "fr"]
    assert len(pairs) == 3 * 3 and pairs.groupby("lang").size().tolist() == [3, 3, 3]
    src_c = candidates[candidates["lang"] == "en"]
    for lang in ("de", "fr"):
        c = candidates[candidates["lang"] == lang]
        assert (
            c[["candidate", "paragraph", "sentence_index"]].values.tolist()
            == src_c[["candidate", "paragraph", "sentence_index"]].values.tolist()
        )
        assert (c["sentence"] != "").all()
        q = questions[questions["lang"] == lang].set_index("group_id")
        assert q["answer_candidate"].to_dict() == {"q1": 1, "q2": 2, "q3": 4}
    first = (root / "data" / "parallel" / "pairs.parquet").read_bytes()

    translate.main()  # nothing new: everything from the cache, same output
    *_, metrics = _outputs(root)
    assert metrics["texts_translated"] == 0 and metrics["texts_from_cache"] == 2 * n
    assert (root / "data" / "parallel" / "pairs.parquet").read_bytes() == first

    _workdir(tmp_path, monkeypatch, tiny_hf, langs=("en", "de", "fr", "es"))  # one more language
    translate.main()
    _, _, pairs, metrics = _outputs(root)
    assert metrics["texts_translated"] == n and metrics["texts_from_cache"] == 2 * n
    assert len(pairs) == 4 * 3
    assert len(list((root / "models" / "nllb-ct2").iterdir())) == 1  # converted once


def test_interrupted_run_keeps_whole_chunks_and_resumes(tiny_ct2, tmp_path, monkeypatch):
    root = _workdir(tmp_path, monkeypatch, tiny_ct2, langs=("en", "de"))
    monkeypatch.setattr(translate, "CHUNK_SIZE", 3)
    real = translate.NllbTranslator.translate
    calls = []

    def dies_on_third_chunk(self, texts, source, target):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, texts, source, target)

    monkeypatch.setattr(translate.NllbTranslator, "translate", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        translate.main()
    assert not (root / "data" / "parallel").exists() and not (root / "metrics").exists()
    with sqlite3.connect(root / translate.CACHE_PATH) as db:
        assert db.execute("SELECT COUNT(*) FROM translation").fetchone() == (6,)

    monkeypatch.setattr(translate.NllbTranslator, "translate", real)
    translate.main()
    *_, metrics = _outputs(root)
    assert metrics["texts_from_cache"] == 6 and metrics["texts_translated"] == _distinct_texts() - 6


def test_quality_report_against_the_sources_human_translations(tiny_ct2, tmp_path, monkeypatch):
    root = _workdir(tmp_path, monkeypatch, tiny_ct2, train="xquad_r", langs=("en", "de"))
    translate.main()
    questions, _, pairs, metrics = _outputs(root)
    en_groups = set(questions.loc[questions["lang"] == "en", "group_id"])
    assert set(pairs.loc[pairs["lang"] == "de", "group_id"]) == en_groups  # MT of the English, not the human German
    assert metrics["references.de"] == 2 * len(en_groups)
    assert 0 <= metrics["bleu.de"] < 100 and 0 <= metrics["chrf++.de"] < 100


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "langs", "extra_env", "message"),
    [
        ("ct2", ("en", "xx"), {}, r"^error: params.yaml: translate.langs\[1\]: 'xx' is not one of af, "),
        (
            "no-such-org/no-such-nllb", ("en", "de"), {"HF_HUB_OFFLINE": "1"},
            r"^error: params.yaml: translate.model: cannot load 'no-such-org/no-such-nllb' \(not a local model directory",
        ),
        (None, ("en", "de"), {}, r"^error: params.yaml: translate.model: data.train=squad is English only"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_ct2, tmp_path, monkeypatch, model, langs, extra_env, message):
    root = _workdir(tmp_path, monkeypatch, tiny_ct2 if model == "ct2" else model, langs=langs)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **extra_env}
    result = subprocess.run([sys.executable, "-m", "pipeline.translate"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(message, lines[0]), result.stderr
    assert not (root / "data" / "parallel").exists() and not (root / "data" / "cache").exists()
