"""The datasets a model is scored on, read, lined up and scored: shared by the `evaluate` stage and
by `train`'s dev curve (`train.eval_every`), so the curve's figures are the evaluation's own.

A dataset is a fetched LAReQA source (`data/raw/<name>/`) or the dev split of data.train
(`data/dev/`); `prepare_task` checks it before any model loads, and `evaluate_task` encodes
each distinct text once and scores every setting (pipeline/scoring/lareqa.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.common import PipelineError, read_parquet
from pipeline.contracts import CANDIDATES_SCHEMA, DEV_DIR, QUESTIONS_SCHEMA, RAW_DIR, pairs_stamp, raw_stamp, raw_tables
from pipeline.params import DataParams
from pipeline.scoring.encoding import encode_unique
from pipeline.scoring.lareqa import RetrievalTask, TaskScores, build_task, headline_figures, score_task, select_langs
from pipeline.sources.catalogue import LAREQA_SOURCES

DEV_DATASET = "dev"  # the held-out dev split of data.train (data/dev), for choices: never the reported result


def read_source_tables(name: str, data: DataParams, raw_dir: Path = RAW_DIR) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """A fetched LAReQA source's, or the dev split's, (questions, candidates) and the folder they came from."""
    if name == DEV_DATASET:
        questions_path, candidates_path, made_by = (
            DEV_DIR / "questions.parquet",
            DEV_DIR / "candidates.parquet",
            pairs_stamp(data.train, data.dev_share),
        )
        where = "run `dvc repro translate`"
    elif name in LAREQA_SOURCES:
        (questions_path, candidates_path), made_by = raw_tables(name, raw_dir), raw_stamp(name)
        known = name == data.train or name in data.eval
        where = "run `dvc repro fetch` first" if known else "add it to data.eval in params.yaml, then run `dvc repro fetch`"
    else:
        raise PipelineError(f"unknown evaluation dataset '{name}' (known: {', '.join([*sorted(LAREQA_SOURCES), DEV_DATASET])})")
    if not questions_path.exists():
        raise PipelineError(f"{questions_path.parent}: not made yet; {where}")
    questions = read_parquet(questions_path, QUESTIONS_SCHEMA, made_by=made_by).to_pandas()
    candidates = read_parquet(candidates_path, CANDIDATES_SCHEMA, made_by=made_by).to_pandas()
    if questions.empty:
        raise PipelineError(f"{questions_path}: no questions (data.dev_share is {data.dev_share}: no dev split is held out)")
    return questions, candidates, questions_path.parent


def prepare_task(questions: pd.DataFrame, candidates: pd.DataFrame, langs: list[str] | None, name: str, origin: str) -> RetrievalTask:
    """Check one dataset's tables and line them up for scoring, before any model is loaded."""
    langs = select_langs(sorted(candidates["lang"].unique()), langs, name)
    return build_task(questions, candidates, langs, origin)


@dataclass
class Evaluation:
    summary: dict
    scores: TaskScores
    timing: dict
    queries: np.ndarray  # [Q, D] embeddings, reused by the noise report
    pool: np.ndarray  # [C, D]


def evaluate_task(model, task: RetrievalTask, prefixes: tuple[str, str], batch_size: int, bf16: bool = False) -> Evaluation:
    """Encode (each distinct text once) and score one dataset."""
    query_prefix, passage_prefix = prefixes
    texts = [query_prefix + t for t in task.query_text] + [passage_prefix + t for t in task.candidate_text]
    started = time.perf_counter()
    unique_embeddings, index = encode_unique(model, texts, batch_size, bf16)
    encoded = time.perf_counter()
    embeddings = unique_embeddings[index]
    n_queries = len(task.query_text)
    queries, pool = embeddings[:n_queries], embeddings[n_queries:]
    scores = score_task(task, queries, pool)
    timing = {
        "texts": len(texts),
        "unique_texts": len(unique_embeddings),
        "encode_seconds": encoded - started,
        "score_seconds": time.perf_counter() - encoded,
    }
    return Evaluation(headline_figures(scores), scores, timing, queries, pool)
