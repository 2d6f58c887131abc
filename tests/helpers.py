"""Builders the tests share: the data mirror, a tiny random-weight model, training pairs and plans,
stage directories. Small real data: slices of the mirror, or data made here."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml

from pipeline import batches
from pipeline.common import write_parquet
from pipeline.contracts import (
    CANDIDATES_SCHEMA,
    DEV_DIR,
    PAIRS_PATH,
    PAIRS_SCHEMA,
    PARALLEL_CANDIDATES_PATH,
    PARALLEL_QUESTIONS_PATH,
    PLAN_PATH,
    QUESTIONS_SCHEMA,
    pairs_stamp,
    raw_stamp,
    raw_tables,
)
from pipeline.params import TrainParams, build, plan_made_by

REPO = Path(__file__).resolve().parents[1]


def mirror_root() -> Path:
    """The data mirror: $HYBRIDIR_MIRROR, else ../shared/mirror beside the checkout."""
    return Path(os.environ.get("HYBRIDIR_MIRROR", REPO.parent / "shared" / "mirror"))


def mirror_file(relative: str) -> Path:
    path = mirror_root() / relative
    if not path.exists():
        pytest.skip(f"data mirror not found ({path}); set HYBRIDIR_MIRROR")
    return path


# --- a tiny random-weight sentence-transformers model, built offline ----------------

TINY_HIDDEN = 32
TINY_MAX_POSITIONS = 128
TINY_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_LANGS = ("en", "de", "es", "ru", "ar", "zh", "hi", "el")


def tiny_corpus(per_lang: int = 60) -> list[str]:
    """A few hundred real sentences and questions of several scripts from the mirror.

    Falls back to made-up texts when the mirror is absent, so the model can always be built.
    """
    texts: list[str] = []
    folder = mirror_root() / "lareqa" / "xquad-r"
    for lang in TINY_LANGS:
        path = folder / f"{lang}.json"
        if not path.exists():
            continue
        own: list[str] = []
        for par in json.loads(path.read_text(encoding="utf-8"))["data"][0]["paragraphs"]:
            own += [par["context"][a:b] for a, b in par["sentence_breaks"]]
            own += [qa["question"] for qa in par["qas"]]
        texts += own[:per_lang]
    if not texts:
        words = ["alpha", "beta", "gamma", "delta", "river", "city", "year", "Stadt", "Fluss", "año", "город"]
        texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + f" {i}." for i in range(300)]
    return texts


def tiny_vocab(texts: list[str], vocab_size: int, normalizer, pre_tokenizer) -> dict[str, int]:
    """Special tokens, every character alone and as a ##continuation, then whole words by count.

    Not `WordPieceTrainer`: it breaks ties between equal counts in hash order, so each process
    built another vocabulary, another tiny model, and other test figures (CI once saw two configs
    tie at six digits that differ here). Ties here go in alphabetical order.
    """
    words = Counter(word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({char for word in words for char in word})
    tokens = [*TINY_SPECIAL_TOKENS, *chars, *(f"##{char}" for char in chars)]
    known = set(tokens)
    for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in known:
            tokens.append(word)
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_model(out: Path, texts: list[str] | None = None, vocab_size: int = 2000) -> Path:
    """Save a random-weight BERT (hidden 32, 2 layers, 2 heads) + mean pooling + Normalize to `out`.

    The WordPiece vocabulary comes from `texts` (default: `tiny_corpus()`) by `tiny_vocab`, and the
    weights from torch.manual_seed(0), so two builds, in any process, give the same model. Returns `out`.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = Path(out)
    hf_dir = out.parent / f"{out.name}-hf"
    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False, handle_chinese_chars=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = tiny_vocab(texts if texts is not None else tiny_corpus(), vocab_size, normalizer, pre_tokenizer)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=TINY_MAX_POSITIONS,
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    model = SentenceTransformer(
        modules=[
            Transformer(str(hf_dir), max_seq_length=TINY_MAX_POSITIONS),
            Pooling(TINY_HIDDEN, "mean"),
            Normalize(),
        ],
        device="cpu",
    )
    model.save(str(out))
    return out


CONFIG = TrainParams(
    lr=1e-3,
    temperature=0.05,
    warmup_ratio=0.1,
    weight_decay=0.01,
    freeze_embeddings=True,
    chunk_size=None,
    precision="fp32",
    adversarial_weight=0.0,
    adversary_lr=1e-3,
    query_noise=(),
    query_noise_rate=0.5,
    eval_every=0,
    keep_best=None,
)
SEED = 7
MAX_LENGTH = 64


def make_pairs(n_groups: int = 12, langs=("en", "de", "es"), first: int = 0) -> pa.Table:
    """Pairs of groups g<first> .. g<first + n_groups - 1>, each in every one of `langs`."""
    rows = [
        {
            "group_id": f"g{g}",
            "lang": lang,
            "question": f"{lang} question {g} about topic {g * 7}",
            "passage": f"{lang} passage {g}: the answer is {g * 7} in the city {g}.",
        }
        for g in range(first, first + n_groups)
        for lang in langs
    ]
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


def corpus_of(pairs: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The questions and candidates behind `pairs` (translate's layout): in each language, the
    answers of two groups share a paragraph with one more sentence, so every answer has two
    other sentences beside it."""
    questions, candidates = [], []
    for lang in sorted(set(pairs["lang"].to_pylist())):
        rows = [r for r in pairs.to_pylist() if r["lang"] == lang]
        for paragraph, start in enumerate(range(0, len(rows), 2)):
            members = rows[start : start + 2]
            texts = [r["passage"] for r in members] + [f"{lang} sentence {paragraph} says nothing."]
            first = sum(c["lang"] == lang for c in candidates)
            candidates += [
                {"lang": lang, "candidate": first + i, "paragraph": paragraph, "sentence_index": i, "sentence": text}
                for i, text in enumerate(texts)
            ]
            questions += [
                {
                    "group_id": r["group_id"],
                    "lang": lang,
                    "question": r["question"],
                    "answer_candidate": first + i,
                    "article": f"a{paragraph // 2}",
                    "paragraph": f"p{paragraph}",
                }
                for i, r in enumerate(members)
            ]
    return pa.Table.from_pylist(questions, schema=QUESTIONS_SCHEMA), pa.Table.from_pylist(candidates, schema=CANDIDATES_SCHEMA)


def make_plan(
    pairs: pa.Table,
    steps: int = 6,
    batch_size: int = 4,
    seed: int = 3,
    ratio: float = 0.5,
    schedule: str = "hybrid",
    negatives: str = "none",
) -> pa.Table:
    plan = batches.plan_batches(batches.groups_from_pairs(pairs), ratio, schedule, "mono_first", batch_size, steps, seed)
    return batches.plan_negatives(plan, *corpus_of(pairs), negatives, seed)


def load(model_dir: Path):
    """A saved model on the CPU, truncating at MAX_LENGTH."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = MAX_LENGTH
    return model


def stage_dir(tmp_path: Path, tiny_model_dir: Path, steps: int = 3, sampler: dict | None = None, **train_params) -> Path:
    """A project folder ready for `train`: params, the parallel tables, a dev split of 4 other groups,
    a plan of `steps` batches of 4 (with `sampler`'s schedule, ratio and negatives), the tiny base model."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sampler"].update({"batch_size": 4, "steps": steps, **(sampler or {})})  # the plan written below
    plan_stamp = plan_made_by(build(params))  # before the train params, which a test may break on purpose
    params["train"].update({"precision": "fp32", **train_params})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pairs = make_pairs()
    made_by = pairs_stamp(params["data"]["train"], params["data"]["dev_share"])
    write_parquet(pairs, tmp_path / PAIRS_PATH, made_by=made_by)
    for table, path in zip(corpus_of(pairs), (PARALLEL_QUESTIONS_PATH, PARALLEL_CANDIDATES_PATH)):
        write_parquet(table, tmp_path / path, made_by=made_by)
    for table, name in zip(corpus_of(make_pairs(4, first=100)), ("questions.parquet", "candidates.parquet")):
        write_parquet(table, tmp_path / DEV_DIR / name, made_by=made_by)
    s = params["sampler"]
    plan = make_plan(pairs, steps=steps, ratio=s["ratio"], schedule=s["schedule"], negatives=s["negatives"])
    write_parquet(plan, tmp_path / PLAN_PATH, made_by=plan_stamp)
    shutil.copytree(tiny_model_dir, tmp_path / "models/base")
    return tmp_path


def stage_env(**settings: str) -> dict[str, str]:
    """The environment of a stage run by a test: a checkpoint every 2 steps (the tiny runs take 3 to 12),
    and any other execution setting given (`HYBRIDIR_PROCESSES="2"`)."""
    return {**os.environ, "HYBRIDIR_CHECKPOINT_EVERY": "2", **settings}


def run_train_stage(cwd: Path, **settings: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.train", "--resume"]
    return subprocess.run(command, cwd=cwd, env=stage_env(**settings), capture_output=True, text=True, timeout=300)


def no_questions(doc: dict) -> None:
    """Empty every paragraph's questions (a LAReQA file with no questions)."""
    for article in doc["data"]:
        for par in article["paragraphs"]:
            par["qas"] = []


def write_raw(root: Path, questions: pa.Table, candidates: pa.Table, source: str = "xquad_r") -> None:
    """A project folder with fetched tables of `source` and the repository's params.yaml."""
    questions_path, candidates_path = raw_tables(source, root / "data" / "raw")
    write_parquet(questions, questions_path, raw_stamp(source))
    write_parquet(candidates, candidates_path, raw_stamp(source))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")


def write_params(root: Path, **dotted) -> dict:
    """root/params.yaml: the repository's, with dotted overrides (`**{"sampler.ratio": 1.0}`); returns it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for key, value in dotted.items():
        *groups, name = key.split(".")
        node = params
        for group in groups:
            node = node[group]
        node[name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return params


# --- projects under DVC, built from the repository's own dvc.yaml ---------------------------

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}  # fmt: skip


def repo_stages(*names: str, commands: dict[str, str] | None = None) -> dict:
    """Stages of the repository's dvc.yaml for a test's own project: their params, data deps and outputs
    as they are, `python` this interpreter, no code deps (the project has no pipeline/ folder), and a
    stand-in command where `commands` gives one."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    picked = {}
    for name in names:
        stage = copy.deepcopy(stages[name])
        body = stage["do"] if "foreach" in stage else stage
        body["cmd"] = (commands or {}).get(name) or body["cmd"].replace("python ", f"{sys.executable} ", 1)
        body["deps"] = [dep for dep in body["deps"] if not dep.startswith("pipeline/")]
        picked[name] = stage
    return picked


def stage_outputs(name: str) -> list[str]:
    """Every output the repository's dvc.yaml declares for stage `name` (outs, metrics, plots)."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"][name]
    return [next(iter(out)) if isinstance(out, dict) else out for key in ("outs", "metrics", "plots") for out in stage.get(key, [])]


def dvc_env(**settings: str) -> dict[str, str]:
    """The environment of `dvc` run by a test: this checkout's pipeline package, a git identity, no analytics,
    and $HYBRIDIR_MIRROR made absolute (CI gives it relative to the checkout; the test's project is elsewhere)."""
    mirror = {"HYBRIDIR_MIRROR": str(Path(os.environ["HYBRIDIR_MIRROR"]).resolve())} if os.environ.get("HYBRIDIR_MIRROR") else {}
    return {**os.environ, **GIT_IDENTITY, **mirror, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", **settings}


def dvc(cwd: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=dvc_env(**settings), capture_output=True, text=True, timeout=600
    )


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=dvc_env(), check=True, capture_output=True)


def init_dvc_project(root: Path, stages: dict) -> None:
    """git and DVC in `root`, with `stages` as its dvc.yaml, all of it committed (dvclive needs a commit)."""
    git(root, "init", "-q")
    assert dvc(root, "init", "-q").returncode == 0
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False), encoding="utf-8")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")


def files_under(root: Path, *relative: str | Path) -> dict[str, bytes]:
    """Every file at or under the given paths, by path relative to `root`: what a test compares before and after."""
    files = {}
    for rel in relative:
        path = root / rel
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                files[str(f.relative_to(root))] = f.read_bytes()
    return files


def without_dropout(model):
    """Dropout masks depend on how texts are split among passes and ranks; the math must not."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def free_port() -> int:
    """A free TCP port on loopback, for a gloo process group of the test's own processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_in_one_and_two_processes(one_step, model_dir: Path, tmp_path: Path) -> dict[int, dict]:
    """Run `one_step(rank, world_size, port, model_dir, out)` as 1 and as 2 gloo processes; rank 0's saved results by world size."""
    import torch.multiprocessing as mp

    results = {}
    for world_size in (1, 2):
        out = tmp_path / f"world{world_size}.pt"
        mp.spawn(one_step, args=(world_size, free_port(), str(model_dir), str(out)), nprocs=world_size)
        results[world_size] = torch.load(out)
    return results


def synthetic(ids: list[str], langs: list[str], latent: np.ndarray, rng: np.random.Generator, shift: float = 0.0) -> pd.DataFrame:
    """A per-query table like `evaluate`'s: every question in every language, all three settings.

    A question's `latent` difficulty (shared by two runs and by its translations) sets the mean
    of its beta-distributed ap in every row, so rows of one question are correlated, as real
    ones are; `shift` is added to every ap, so it is the true difference of each mAP figure."""
    n, k = len(ids), 6.0
    mono = [(x, x) for x in langs]
    cross = [(x, y) for x in langs for y in langs if x != y]
    parts = []
    for setting, cells in (("mono", mono), ("cross", cross), ("multi", [(x, None) for x in langs])):
        p = np.repeat(latent[None, :], len(cells), axis=0).ravel()
        ap = rng.beta(k * p, k * (1 - p)) + shift
        multi = setting == "multi"
        parts.append(
            pd.DataFrame(
                {
                    "setting": setting,
                    "query_lang": np.repeat([x for x, _ in cells], n),
                    "passage_lang": np.repeat([y for _, y in cells], n),
                    "question_id": np.tile(ids, len(cells)),
                    "paragraph": np.tile([f"p{k // 5}" for k in range(n)], len(cells)),  # 5 questions a paragraph
                    "ap": ap,
                    "recall_at_1": np.nan if multi else (ap > 0.5).astype(float),
                    "recall_at_10": rng.beta(k * p, k * (1 - p)) if multi else np.nan,
                    "rank_distance": rng.gamma(2.0, 300 * (1.2 - p)) if multi else np.nan,
                    "own_language_first": (rng.random(len(p)) < 0.5).astype(float) if multi else np.nan,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)
