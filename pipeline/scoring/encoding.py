"""Sentence-transformers models for `train` and `evaluate`: checked before use, run in the precision asked for.

A model directory is checked before anything is loaded from it: a missing tokenizer
file makes `AutoTokenizer` fall back to a handful of tokens without any error, and a
truncated weights file fails deep inside a library, so both get one line here. Models
load strictly: weights that do not fit the architecture config.json names (an edited
`model_type`, another model's file) are an error, where transformers would initialise
what is missing at random and only log a warning.

Which precision runs where is decided in pipeline/machine.py; `autocast` applies it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.common import PipelineError, first_line, progress


def autocast(device_type: str, bf16: bool):
    """bf16 autocast of matrix products (fp32 elsewhere), or nothing."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative, or under a folder that exists here."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name.split("/")[0]).is_dir()


def _safetensors_complete(path: Path) -> bool:
    """Whether the file holds every byte its header promises (a killed copy or a full disk leaves less)."""
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return 8 + header_len + end <= path.stat().st_size


PASSAGE_PROMPT_NAMES = ("document", "passage", "corpus")  # what SentenceTransformer.encode_document looks for, in its order


def saved_prefixes(name: str) -> dict[str, tuple[str, str]]:
    """The query and passage prompts a sentence-transformers model was saved with, as `encode_query` and
    `encode_document` would apply them: {"query": (text, prompt name)}, "" where it has none. Read from its
    config_sentence_transformers.json before the model loads (a path that does not exist has none: loading
    it says why)."""
    from sentence_transformers.util import load_file_path

    prompts = {}
    if Path(name).exists() or not _looks_local(name):  # a missing folder is not asked of the hub
        try:
            path = load_file_path(name, "config_sentence_transformers.json")
            prompts = (json.loads(Path(path).read_text(encoding="utf-8")).get("prompts") or {}) if path else {}
        except Exception as err:  # the hub unreachable, a broken file: each library fails its own way
            raise PipelineError(f"{name}: cannot read the prompts it was saved with ({first_line(err)})") from None
    passage = next((prompt for prompt in PASSAGE_PROMPT_NAMES if prompts.get(prompt)), "document")
    return {"query": (prompts.get("query") or "", "query"), "passage": (prompts.get(passage) or "", passage)}


def check_model_dir(name: str, hint: str = "") -> Path | None:
    """Refuse a model directory that would load wrong or fail late: one line naming the file.

    Checks the files a sentence-transformers checkpoint needs (modules.json, the encoder's
    config and weights, whole) and that its tokenizer's vocabulary matches the embedding
    matrix; returns the encoder's folder. A hub id is left to the hub (None).
    """
    from transformers import AutoTokenizer

    path = Path(name)
    where = f" ({hint})" if hint else ""
    if not path.exists():
        if _looks_local(name):
            raise PipelineError(f"{name}: no such directory{where}")
        return None
    if not (path / "modules.json").is_file():
        raise PipelineError(f"{name}: not a sentence-transformers model (no modules.json){where}")
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        encoder = next(m for m in modules if m["type"].endswith(".Transformer"))
        encoder_dir = path / encoder["path"]
        config = json.loads((encoder_dir / "config.json").read_text(encoding="utf-8"))
        vocab_size = int(config["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as err:
        raise PipelineError(f"{name}: modules.json or the encoder's config.json is missing or broken ({first_line(err)})") from None
    weights = encoder_dir / "model.safetensors"
    if weights.exists() and not _safetensors_complete(weights):
        raise PipelineError(f"{weights}: truncated or corrupt (fewer bytes than its header lists){where}")
    if not weights.exists() and not (encoder_dir / "pytorch_model.bin").exists():
        raise PipelineError(f"{encoder_dir}: no model.safetensors (or pytorch_model.bin){where}")
    try:
        tokens = len(AutoTokenizer.from_pretrained(str(encoder_dir)))
    except Exception as err:  # tokenizers, sentencepiece and transformers fail in their own ways
        raise PipelineError(f"{encoder_dir}: cannot load the tokenizer ({first_line(err)})") from None
    if not 0.9 * vocab_size <= tokens <= vocab_size:
        raise PipelineError(
            f"{encoder_dir}: the tokenizer has {tokens} tokens but the embedding matrix has {vocab_size} rows "
            f"(a tokenizer file is missing or broken){where}"
        )
    return encoder_dir


@contextlib.contextmanager
def loading_report_held_back():
    """Silence transformers' loading report (a table of weights that did not load) and progress bar:
    `check_weights_fit` turns what they say into one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def check_weights_fit(encoder, encoder_dir: Path) -> None:
    """Refuse weights that do not fit the encoder's architecture: transformers' own loading info for the
    class the model was built as, read again on the meta device (no weights are copied). Weights of the
    wrong shape already fail the load."""
    with loading_report_held_back():
        _, info = type(encoder).from_pretrained(str(encoder_dir), config=encoder.config, device_map="meta", output_loading_info=True)
    kinds = {"missing": info["missing_keys"], "unexpected": info["unexpected_keys"]}
    found = [f"{len(keys)} {kind}: {', '.join(sorted(keys)[:2])}{', ...' if len(keys) > 2 else ''}" for kind, keys in kinds.items() if keys]
    if found:
        raise PipelineError(
            f"{encoder_dir}: the weights do not fit the {type(encoder).__name__} that config.json describes "
            f"({'; '.join(found)}); loading them would initialise the rest at random"
        )


def load_model(name: str, max_length: int, device: str | None = None):
    """A checked sentence-transformers model (a directory or a hub id), truncating at `max_length` tokens;
    a directory's weights must fit its architecture exactly."""
    from sentence_transformers import SentenceTransformer

    encoder_dir = check_model_dir(name)
    try:
        with loading_report_held_back():
            model = SentenceTransformer(name, device=device)
    except Exception as err:  # a bad directory or an unreachable hub fails in many library-specific ways
        raise PipelineError(f"{name}: cannot load a sentence-transformers model ({first_line(err)})") from None
    if encoder_dir is not None:
        check_weights_fit(model[0].auto_model, encoder_dir)
    model.max_seq_length = max_length
    return model


@contextlib.contextmanager
def counting_texts(model, bar):
    """Advance `bar` by each batch the model's encoder runs: the project's own progress (common.progress) in
    place of sentence-transformers' bar, which draws a carriage-return frame per batch even into a log."""

    def count(module, args, output) -> None:
        bar.update(len(args[0]["input_ids"]))

    hook = model.register_forward_hook(count)
    try:
        with bar:
            yield
    finally:
        hook.remove()


def encode_unique(model, texts: list[str], batch_size: int, bf16: bool = False, desc: str = "encoding") -> tuple[np.ndarray, np.ndarray]:
    """Encode each distinct text once (one call; sentence-transformers sorts it by length).

    Returns (float32 embeddings of the distinct texts, index of each input text into them).
    """
    index, unique = pd.factorize(pd.Series(texts, dtype=object))
    with autocast(model.device.type if bf16 else "cpu", bf16), counting_texts(model, progress(total=len(unique), desc=desc, unit="text")):
        embeddings = model.encode(
            list(unique),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=not bf16,
            convert_to_tensor=bf16,
            show_progress_bar=False,
        )
    if bf16:  # re-normalized in fp32: in bf16 the unit length holds to about 3 digits only
        embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu().numpy()
    return np.asarray(embeddings, dtype=np.float32), index


def embedding_dim(model) -> int:
    """The sentence embedding's size (sentence-transformers 6 renamed the getter)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return getter()


def embed(model, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings with gradients (dynamic padding to the longest text of the call)."""
    features = model.tokenize(texts)
    features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return model(features)["sentence_embedding"]
