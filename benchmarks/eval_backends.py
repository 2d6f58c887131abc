"""Benchmark of evaluation (encoding) backends for CPUs: torch vs OpenVINO vs ONNX Runtime, fp32 and int8 (issue #25).

Question: is an optional `evaluate.backend: torch | openvino | onnx` worth adding for CPUs
without native bf16? Kept only if a backend encodes >= 2x torch fp32 there with every mAP
within 0.003 of torch fp32.

Measured side by side in one run, on the same model:
  (a) speed: --texts distinct XQuAD-R en texts (the en candidate pool with the passage prefix,
      then en questions with the query prefix), max length params.yaml's model.max_length,
      encoded by every backend of --backends at --batch-size, interleaved: round 1 runs each
      backend once, every later round the same again, so that a busy, shared CPU slows every
      backend alike; best-of-rounds texts/s, the ratio to torch fp32 and, for ov-*/ort-*, to the
      same runtime at fp32 ("x own fp32"). Then the fastest
      non-torch backend and torch fp32 again at each of --more-batch-sizes, interleaved too.
      Every backend sorts texts by length and pads each batch to its longest text, as
      sentence-transformers does; tokenizing is inside the timing for all of them.
  (b) agreement: the cosine between each text's embedding and torch fp32's (min, mean).
  (c) accuracy, for the backends at least --speed-gate x torch fp32 in (a): the project's own
      LAReQA scoring (`prepare_task`, `score_task`, `headline_figures`) on --langs with --limit
      (candidates < N and the questions they answer), Mo./Cr./Mul. mAP minus torch fp32's
      (target: within 0.003).

Backends (all but torch-* are built here from the model's encoder, mean pooling and L2
normalization inside the graph; build seconds are reported):
  torch-fp32   SentenceTransformer.encode (pipeline.scoring.encoding.encode_unique), the baseline
  torch-bf16   the same under bf16 autocast (reference: native only with AVX-512 BF16 / AMX)
  ov-fp32      openvino.convert_model of the torch module, INFERENCE_PRECISION_HINT f32
  ov-bf16      the same at the CPU plugin's bf16 hint (its default where bf16 is native; reference)
  ov-int8      nncf.quantize (static int8 activations and weights, ModelType.TRANSFORMER,
               --calibration texts of languages outside --langs), run at the f32 hint
  ov-int8w     nncf.compress_weights (int8_asym weights), f32 hint: the CPU plugin then quantizes
               each linear layer's activations on the fly in groups of 32 (its default
               DYNAMIC_QUANTIZATION_GROUP_SIZE) and runs int8 kernels; with that set to 0 it
               decompresses to fp32 and runs at ov-fp32's speed
  ort-fp32     torch.onnx.export (TorchScript exporter) + ONNX Runtime CPU
  ort-int8d    onnxruntime.quantization.quantize_dynamic (s8 weights per channel, u8 activations
               per tensor on the fly): the route the issue measured on the CPU without bf16
  ort-int8s    onnxruntime.quantization.quantize_static (QDQ, per-channel s8 weights, u8
               activations, MinMax on the same calibration texts)
On a CPU with native bf16 the f32 hint stands in for a CPU without it (OpenVINO picks bf16 by
itself there); the int8 kernels want VNNI, which AVX-512 CPUs without BF16 mostly have
(Cascade Lake, Ice Lake). The ratio to torch fp32 also hangs on torch's fp32 BLAS: the header
line times one fp32 linear layer in torch (MKL) and in OpenVINO. Where torch's is much slower
(MKL on AMD), every "x fp32" is inflated; "x own fp32" is the more portable figure.
Before each round the load average is printed: the timings mean little when other work runs
(torch's 2 OpenMP threads slow down far more than OpenVINO's or ONNX Runtime's when a core is
taken).

OpenVINO, NNCF and ONNX Runtime are not project dependencies; install them aside, e.g.
    .venv/bin/pip install --no-deps --target /tmp/ov-site openvino openvino-telemetry nncf ninja onnxruntime onnx ml_dtypes flatbuffers
Run from the repository root, after `dvc repro fetch base_model`:
    PYTHONPATH=/tmp/ov-site .venv/bin/python benchmarks/eval_backends.py --model models/base
    PYTHONPATH=/tmp/ov-site .venv/bin/python benchmarks/eval_backends.py --texts 200 --rounds 1 --limit 20 --backends torch-fp32,ov-fp32,ov-int8w
    (--no-accuracy skips (c); about 15 minutes in all on 2 cores with every backend, 2 rounds)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import evaluate  # noqa: E402
from pipeline.machine import describe, machine_record  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.scoring.encoding import encode_unique, load_model  # noqa: E402
from pipeline.scoring.lareqa import headline_figures, score_task  # noqa: E402

BACKENDS = ("torch-fp32", "torch-bf16", "ov-fp32", "ov-bf16", "ov-int8", "ov-int8w", "ort-fp32", "ort-int8d", "ort-int8s")
SPEED_TARGET = 2.0  # x torch fp32 texts/s, on a CPU without bf16
MAP_TOLERANCE = 0.003  # |backend - torch fp32| for Mo./Cr./Mul. mAP
Encoder = Callable[[list[str], int], np.ndarray]  # (distinct texts, batch size) -> [N, D] unit float32


class Pooled(torch.nn.Module):
    """The encoder with the model's mean pooling and L2 normalization, one graph for export."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def batched_encoder(tokenizer, max_length: int, run: Callable[[dict], np.ndarray]) -> Encoder:
    """Sort by length (longest first, as sentence-transformers), pad per batch, run, restore order."""

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            feed = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            parts.append(run({"input_ids": feed["input_ids"].astype(np.int64), "attention_mask": feed["attention_mask"].astype(np.int64)}))
        out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return out / np.linalg.norm(out, axis=1, keepdims=True)  # in fp32, whatever the backend computed in

    return encode


def calibration_feeds(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """One feed (batch of 1, unpadded) per calibration text."""
    feeds = []
    for text in texts:
        feed = tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
        feeds.append({"input_ids": feed["input_ids"].astype(np.int64), "attention_mask": feed["attention_mask"].astype(np.int64)})
    return feeds


class Builder:
    """Builds each backend once; shares the converted OpenVINO model and the ONNX export."""

    def __init__(self, model, tokenizer, max_length: int, calibration: list[str], workdir: Path):
        self.model, self.tokenizer, self.max_length, self.workdir = model, tokenizer, max_length, workdir
        self.calibration = calibration_feeds(tokenizer, calibration, max_length)
        self.pooled = Pooled(model[0].auto_model).eval()
        self._ov_model = None
        self._onnx_path: Path | None = None

    def example(self) -> dict:
        return {k: torch.from_numpy(v) for k, v in self.calibration[0].items()}

    def ov_model(self):
        import openvino as ov

        if self._ov_model is None:
            with torch.no_grad():
                self._ov_model = ov.convert_model(self.pooled, example_input=self.example())
        return self._ov_model

    def ov_encoder(self, ov_model, precision: str) -> Encoder:
        import openvino as ov

        compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        output = compiled.outputs[0]
        return batched_encoder(self.tokenizer, self.max_length, lambda feed: request.infer(feed)[output].copy())

    def onnx_path(self) -> Path:
        if self._onnx_path is None:
            path = self.workdir / "model.onnx"
            ids, mask = self.example().values()
            with torch.no_grad():
                torch.onnx.export(
                    self.pooled,
                    (ids, mask),
                    str(path),
                    dynamo=False,
                    input_names=["input_ids", "attention_mask"],
                    output_names=["embedding"],
                    dynamic_axes={
                        "input_ids": {0: "batch", 1: "tokens"},
                        "attention_mask": {0: "batch", 1: "tokens"},
                        "embedding": {0: "batch"},
                    },
                    opset_version=17,
                )
            self._onnx_path = path
        return self._onnx_path

    def ort_encoder(self, path: Path) -> Encoder:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return batched_encoder(self.tokenizer, self.max_length, lambda feed: session.run(None, feed)[0])

    def build(self, name: str) -> Encoder:
        if name == "torch-fp32":
            return lambda texts, batch: encode_unique(self.model, texts, batch, False)[0]
        if name == "torch-bf16":
            return lambda texts, batch: encode_unique(self.model, texts, batch, True)[0]
        if name == "ov-fp32":
            return self.ov_encoder(self.ov_model(), "f32")
        if name == "ov-bf16":
            return self.ov_encoder(self.ov_model(), "bf16")
        if name == "ov-int8":
            import nncf

            quantized = nncf.quantize(
                self.ov_model().clone(),
                nncf.Dataset(self.calibration),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(self.calibration),
            )
            return self.ov_encoder(quantized, "f32")
        if name == "ov-int8w":
            import nncf

            return self.ov_encoder(nncf.compress_weights(self.ov_model().clone()), "f32")
        if name == "ort-fp32":
            return self.ort_encoder(self.onnx_path())
        if name == "ort-int8d":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            out = self.workdir / "model.int8d.onnx"
            quantize_dynamic(
                str(self.onnx_path()), str(out), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
            )
            return self.ort_encoder(out)
        if name == "ort-int8s":
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

            feeds = self.calibration

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.items = iter(feeds)

                def get_next(self):
                    return next(self.items, None)

            prepared = self.workdir / "model.pre.onnx"
            quant_pre_process(str(self.onnx_path()), str(prepared), skip_symbolic_shape=True)
            out = self.workdir / "model.int8s.onnx"
            quantize_static(
                str(prepared),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
                extra_options={"MatMulConstBOnly": True},
            )
            return self.ort_encoder(out)
        raise ValueError(name)


def gemm_check(rows: int = 640, inner: int = 384, cols: int = 1536, repeats: int = 50) -> str:
    """GFLOP/s of one fp32 linear layer of the model's shape (16 texts x 40 tokens, 384 -> 1536) in torch and in OpenVINO.

    torch's fp32 linear layers run on MKL's sgemm, OpenVINO's (and ONNX Runtime's) on their own
    kernels; on AMD CPUs MKL can be much slower than on Intel, which inflates every ratio to torch fp32."""
    import openvino as ov
    import openvino.opset13 as ops

    x, w = torch.randn(rows, inner), torch.randn(cols, inner)

    def rate(step) -> float:
        step()
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        return 2 * rows * inner * cols * repeats / (time.perf_counter() - started) / 1e9

    param_x = ops.parameter([rows, inner], np.float32)
    graph = ov.Model([ops.matmul(param_x, ops.constant(w.numpy()), False, True)], [param_x])
    request = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    xn = x.numpy()
    return f"torch {rate(lambda: torch.nn.functional.linear(x, w)):.0f}, openvino {rate(lambda: request.infer({0: xn})):.0f}"


def speed_texts(questions: pd.DataFrame, candidates: pd.DataFrame, prefixes: tuple[str, str], n: int) -> list[str]:
    passages = [prefixes[1] + t for t in candidates.loc[candidates["lang"] == "en", "sentence"]]
    queries = [prefixes[0] + t for t in questions.loc[questions["lang"] == "en", "question"]]
    return list(pd.unique(pd.Series(passages + queries, dtype=object)))[:n]


def calibration_texts(questions, candidates, prefixes, exclude: list[str], n: int, seed: int = 0) -> list[str]:
    """n texts, half questions and half candidates, of the languages not in `exclude`."""
    rng = np.random.default_rng(seed)
    q = questions.loc[~questions["lang"].isin(exclude), "question"].to_numpy()
    c = candidates.loc[~candidates["lang"].isin(exclude), "sentence"].to_numpy()
    picked_q = rng.choice(q, size=min(len(q), n // 2), replace=False)
    picked_c = rng.choice(c, size=min(len(c), n - n // 2), replace=False)
    return [prefixes[0] + t for t in picked_q] + [prefixes[1] + t for t in picked_c]


def encode_any(encoder: Encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """Each distinct text once, as encode_unique does, then back to the input order."""
    index, unique = pd.factorize(pd.Series(texts, dtype=object))
    return encoder(list(unique), batch_size)[index]


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def backend_list(text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    for b in chosen:
        if b not in BACKENDS:
            raise argparse.ArgumentTypeError(f"{b!r} is not one of {', '.join(BACKENDS)}")
    return ["torch-fp32"] + [b for b in BACKENDS if b in chosen and b != "torch-fp32"]  # the baseline always runs


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--dataset", default="xquad_r")
    parser.add_argument("--backends", type=backend_list, default=list(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--texts", type=int, default=1500, help="distinct en texts encoded in (a)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--more-batch-sizes", type=int_list, default=[32, 64], help="tried for the fastest backend and torch fp32")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of them is kept")
    parser.add_argument("--calibration", type=int, default=300, help="calibration texts for the static int8 backends")
    parser.add_argument("--langs", default="en,de,zh", help="languages of the accuracy check (c)")
    parser.add_argument("--limit", type=int, default=300, help="(c): candidates < N per language and the questions they answer")
    parser.add_argument("--speed-gate", type=float, default=1.5, help="(c) runs for backends at least this x torch fp32")
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True, help="run (c)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    if args.rounds < 1 or args.texts < 1:
        parser.error("--rounds and --texts must be positive")
    params = load_params(args.params)
    prefixes = (params.model.query_prefix, params.model.passage_prefix)
    max_length = params.model.max_length
    langs = args.langs.split(",")

    questions, candidates, folder = evaluate.read_source_tables(args.dataset, params.data)
    texts = speed_texts(questions, candidates, prefixes, args.texts)
    model = load_model(args.model, max_length, device="cpu")
    print(f"machine: {describe(machine_record('cpu', 'fp32'))}")
    print(
        "versions: "
        + ", ".join(f"{p} {version(p)}" for p in ("transformers", "sentence-transformers", "openvino", "nncf", "onnxruntime", "onnx"))
    )
    if any(b.startswith("ov-") for b in args.backends):
        print(f"fp32 linear {{640x384}} x {{384x1536}}, GFLOP/s: {gemm_check()}")
    print(f"model {args.model}, {len(texts)} distinct en texts, max length {max_length}, batch {args.batch_size}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        builder = Builder(
            model, model.tokenizer, max_length, calibration_texts(questions, candidates, prefixes, langs, args.calibration), Path(tmp)
        )
        encoders: dict[str, Encoder] = {}
        build_seconds: dict[str, float] = {}
        for name in args.backends:
            started = time.perf_counter()
            try:
                encoders[name] = builder.build(name)
            except Exception as err:  # an exporter or quantizer failing is a result too
                print(f"    {name}: cannot build ({type(err).__name__}: {str(err).splitlines()[0][:160]})", flush=True)
                continue
            build_seconds[name] = time.perf_counter() - started
            encoders[name](texts[: args.batch_size], args.batch_size)  # warm-up, compiles the first shapes
            print(f"    built {name} in {build_seconds[name]:.1f} s", flush=True)

        # (a) speed, interleaved rounds
        runs: dict[tuple[str, int], list[float]] = {}
        embeddings: dict[str, np.ndarray] = {}

        def timed(name: str, batch: int) -> None:
            started = time.perf_counter()
            result = encoders[name](texts, batch)
            seconds = time.perf_counter() - started
            runs.setdefault((name, batch), []).append(seconds)
            embeddings.setdefault(name, result)
            print(f"    {name}/{batch}: {seconds:.1f} s, {len(texts) / seconds:.1f} texts/s", flush=True)

        for r in range(args.rounds):
            print(
                f"round {r + 1} (1-min load average {os.getloadavg()[0]:.2f}; this run adds up to {len(os.sched_getaffinity(0))}, more is other work)"
            )
            for name in encoders:
                timed(name, args.batch_size)
        speed = {cell: len(texts) / min(s) for cell, s in runs.items()}
        others = [n for n in encoders if not n.startswith("torch")]
        fastest = max(others, key=lambda n: speed[n, args.batch_size]) if others else None
        if fastest and args.more_batch_sizes:
            for r in range(args.rounds):
                print(f"batch-size round {r + 1}")
                for batch in args.more_batch_sizes:
                    for name in ("torch-fp32", fastest):
                        timed(name, batch)
            speed = {cell: len(texts) / min(s) for cell, s in runs.items()}

        base = speed["torch-fp32", args.batch_size]
        reference = embeddings["torch-fp32"]
        print()
        print(f"(a, b) {len(texts)} distinct en texts, batch {args.batch_size}, best of {args.rounds} round(s)")
        print(f"    {'backend':<12}{'build s':>9}{'texts/s':>9}{'x fp32':>8}{'x own fp32':>11}{'cos min':>9}{'cos mean':>10}")
        for name in encoders:
            cos = np.sum(embeddings[name] * reference, axis=1)
            own = f"{name.split('-')[0]}-fp32"  # the same runtime at fp32: a ratio that does not hang on torch's BLAS
            own_ratio = f"{speed[name, args.batch_size] / speed[own, args.batch_size]:>10.2f}x" if own in encoders else f"{'-':>11}"
            print(
                f"    {name:<12}{build_seconds[name]:>9.1f}{speed[name, args.batch_size]:>9.1f}{speed[name, args.batch_size] / base:>7.2f}x"
                f"{own_ratio}{cos.min():>9.4f}{cos.mean():>10.5f}"
            )
        if fastest and args.more_batch_sizes:
            sizes = [args.batch_size, *args.more_batch_sizes]
            print("    batch size      " + "".join(f"{b:>9}" for b in sizes))
            for name in ("torch-fp32", fastest):
                print(f"    {name:<16}" + "".join(f"{speed[name, b]:>9.1f}" for b in sizes))
            best = {n: max(speed[n, b] for b in sizes) for n in ("torch-fp32", fastest)}
            print(f"    {fastest} / torch-fp32, each at its best batch size: {best[fastest] / best['torch-fp32']:.2f}x")

        # (c) accuracy through the project's scoring, for the backends fast enough
        gated = [n for n in encoders if n == "torch-fp32" or speed[n, args.batch_size] >= args.speed_gate * base]
        gated = gated if args.accuracy else []
        figures = {}
        if gated:
            q = questions[questions["answer_candidate"] < args.limit]
            c = candidates[candidates["candidate"] < args.limit]
            task = evaluate.prepare_task(q, c, langs, args.dataset, str(folder))
            query_texts = [prefixes[0] + t for t in task.query_text]
            pool_texts = [prefixes[1] + t for t in task.candidate_text]
            print()
            print(
                f"(c) LAReQA {args.dataset} {','.join(task.langs)}, limit {args.limit}: {len(query_texts)} queries, {len(pool_texts)} candidates; "
                f"backends >= {args.speed_gate}x torch fp32: {', '.join(gated)}",
                flush=True,
            )
            for name in gated:
                started = time.perf_counter()
                both = encode_any(encoders[name], query_texts + pool_texts, args.batch_size)
                seconds = time.perf_counter() - started
                figures[name] = headline_figures(score_task(task, both[: len(query_texts)], both[len(query_texts) :]))
                print(f"    {name}: encoded in {seconds:.1f} s", flush=True)
            print(
                f"    {'backend':<12}{'Mo. mAP':>9}{'Cr. mAP':>9}{'Mul. mAP':>9}{'rank dist':>10}{'max |dmAP|':>11}   target <= {MAP_TOLERANCE}"
            )
            for name, f in figures.items():
                diff = max(abs(f[k] - figures["torch-fp32"][k]) for k in ("mono_map", "cross_map", "multi_map"))
                verdict = "" if name == "torch-fp32" else ("PASS" if diff <= MAP_TOLERANCE else "FAIL")
                print(
                    f"    {name:<12}{f['mono_map']:>9.4f}{f['cross_map']:>9.4f}{f['multi_map']:>9.4f}{f['rank_distance']:>10.3f}{diff:>11.4f}   {verdict}"
                )

    print()
    print(
        f"summary: target >= {SPEED_TARGET}x torch fp32 on a CPU without bf16 and every mAP within {MAP_TOLERANCE} "
        "(speed as measured on this machine; see the BLAS line and 'x own fp32')"
    )
    for name in encoders:
        if name == "torch-fp32":
            continue
        ratio = speed[name, args.batch_size] / base
        acc = figures.get(name)
        diff = max(abs(acc[k] - figures["torch-fp32"][k]) for k in ("mono_map", "cross_map", "multi_map")) if acc else None
        ok = ratio >= SPEED_TARGET and diff is not None and diff <= MAP_TOLERANCE
        shown = f"max |dmAP| {diff:.4f}" if diff is not None else "mAP not checked (--no-accuracy or below the speed gate)"
        print(f"    {name:<12}{ratio:>6.2f}x   {shown:<40}{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
