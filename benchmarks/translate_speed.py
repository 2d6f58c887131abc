"""Translation speed: CTranslate2 (int8) against transformers `generate` (fp32) on NLLB-200-distilled-600M's architecture.

NLLB weights cannot be downloaded here, but speed depends on the architecture, not
on the weights: the model is built from the published config (d_model 1024, 12+12
layers, 16 heads, FFN 4096, vocabulary 256,206) with random weights, converted with
CTranslate2's converter as the `translate` stage does, and both engines translate
the same random source sentences with every output forced to exactly
--new-tokens tokens. Each engine runs in its own process, so its peak memory
(max RSS) is its own. Run from the repository root:

    python benchmarks/translate_speed.py                 # CPU: int8 vs fp32
    python benchmarks/translate_speed.py --device cuda   # GPU: int8_float16 vs fp16
    python benchmarks/translate_speed.py --tiny          # the same path on a tiny architecture (seconds; tests)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.machine import describe, machine_record  # noqa: E402

NLLB_600M = dict(
    vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
    decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
    scale_embedding=True, activation_function="relu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
    decoder_start_token_id=2,
)  # fmt: skip
# The same architecture shrunk (tests/test_benchmarks.py): every code path, in seconds.
TINY = {**NLLB_600M, "vocab_size": 1206, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}  # fmt: skip


def build(workdir: Path, arch: dict) -> tuple[Path, Path]:
    """The random-weight model saved for transformers, and its CTranslate2 conversion (made once)."""
    import ctranslate2
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    hf_dir, ct2_dir = workdir / "hf", workdir / "ct2-int8"
    if not (hf_dir / "model.safetensors").exists():
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        vocab.update({f"▁w{i}": i for i in range(4, arch["vocab_size"] - 204)})  # + 202 language codes + <mask>
        tokenizer = NllbTokenizer(vocab=vocab, merges=[])
        torch.manual_seed(0)
        M2M100ForConditionalGeneration(M2M100Config(**arch)).save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    if not (ct2_dir / "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(hf_dir), low_cpu_mem_usage=True).convert(
            str(ct2_dir), quantization="int8", force=True
        )
    return hf_dir, ct2_dir


def source_ids(hf_dir: Path, sentences: int, length: int, words: int) -> tuple[list[list[int]], int]:
    """Random sentences as NLLB sees them (eng_Latn, `length` pieces, </s>), and deu_Latn's id."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    english, german = tokenizer.convert_tokens_to_ids(["eng_Latn", "deu_Latn"])
    rng = random.Random(0)
    return [[english] + [rng.randrange(4, words) for _ in range(length)] + [2] for _ in range(sentences)], german


def run_transformers(hf_dir: str, ids: list[list[int]], target: int, new_tokens: int, beam: int, device: str, queue) -> None:
    import torch
    from transformers import M2M100ForConditionalGeneration

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = M2M100ForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    inputs = torch.tensor(ids, device=device)

    def generate(batch):
        return model.generate(
            batch, attention_mask=torch.ones_like(batch), forced_bos_token_id=target, num_beams=beam,
            do_sample=False, min_new_tokens=new_tokens + 1, max_new_tokens=new_tokens + 1,
        )  # fmt: skip

    with torch.inference_mode():
        generate(inputs[:2])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    produced = (out.shape[1] - 2) * out.shape[0]  # minus decoder start and the forced language code
    queue.put({"seconds": seconds, "target_tokens": produced, "peak_rss_mib": peak_rss_mib()})


def run_ctranslate2(ct2_dir: str, ids: list[list[int]], target: int, new_tokens: int, beam: int, device: str, queue) -> None:
    import ctranslate2
    from transformers import AutoTokenizer

    compute_type = "int8_float16" if device == "cuda" else "int8"
    translator = ctranslate2.Translator(ct2_dir, device=device, compute_type=compute_type, intra_threads=0)
    tokenizer = AutoTokenizer.from_pretrained(Path(ct2_dir).parent / "hf")
    tokens = [tokenizer.convert_ids_to_tokens(s) for s in ids]
    target_code = tokenizer.convert_ids_to_tokens(target)

    def translate(batch):
        return translator.translate_batch(
            batch, target_prefix=[[target_code]] * len(batch), beam_size=beam, max_batch_size=len(batch),
            min_decoding_length=new_tokens + 1, max_decoding_length=new_tokens + 1,
        )  # fmt: skip

    translate(tokens[:2])  # warm-up
    start = time.perf_counter()
    results = translate(tokens)
    seconds = time.perf_counter() - start
    produced = sum(len(r.hypotheses[0]) - 1 for r in results)  # minus the language code
    queue.put({"seconds": seconds, "target_tokens": produced, "peak_rss_mib": peak_rss_mib()})


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM; getrusage's ru_maxrss would include the parent's from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/hybridir-nllb-600m-random")
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--source-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (checks the code path)")
    args = parser.parse_args()
    arch = TINY if args.tiny else NLLB_600M
    start = time.perf_counter()
    hf_dir, ct2_dir = build(Path(args.workdir + ("-tiny" if args.tiny else "")), arch)
    print(f"model built/converted in {time.perf_counter() - start:.0f} s ({hf_dir}, {ct2_dir})")
    ids, target = source_ids(hf_dir, args.sentences, args.source_tokens, arch["vocab_size"] - 206)
    common = (ids, target, args.new_tokens, args.beam_size, args.device)
    results = {
        "transformers " + ("fp16" if args.device == "cuda" else "fp32"): in_child(run_transformers, str(hf_dir), *common),
        "ctranslate2 " + ("int8_float16" if args.device == "cuda" else "int8"): in_child(run_ctranslate2, str(ct2_dir), *common),
    }
    import ctranslate2

    compute = "int8_float16" if args.device == "cuda" else "int8"
    print(f"machine: {describe(machine_record(args.device, compute))}; ctranslate2 {ctranslate2.__version__}")
    print(
        f"{args.sentences} sentences x {args.source_tokens} source tokens -> {args.new_tokens} target tokens, "
        f"beam {args.beam_size}, {args.device}"
    )
    for name, r in results.items():
        rate = r["target_tokens"] / r["seconds"]
        print(
            f"  {name:26s} {r['target_tokens']} tokens in {r['seconds']:.2f} s = {rate:8.1f} target tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB"
        )
    (hf_name, hf), (ct_name, ct) = results.items()
    speedup = (ct["target_tokens"] / ct["seconds"]) / (hf["target_tokens"] / hf["seconds"])
    print(f"  {ct_name} / {hf_name}: {speedup:.2f}x tokens/s, {ct['peak_rss_mib'] / hf['peak_rss_mib']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
