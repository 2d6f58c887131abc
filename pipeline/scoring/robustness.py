"""The noisy-query robustness report: the LAReQA settings clean and under each query noise.

A seeded sample of queries per language is perturbed (pipeline/scoring/noise.py) and scored
again in all three settings against the same pool embeddings; only the queries a noise
changed are re-encoded, never the pool.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.scoring.encoding import encode_unique
from pipeline.scoring.lareqa import SETTINGS, RetrievalTask, sample_queries, score_task, settings_of, subset_queries
from pipeline.scoring.noise import Noise, perturb

log = logging.getLogger(__name__)


def noise_robustness(
    model,
    task: RetrievalTask,
    queries: np.ndarray,
    pool: np.ndarray,
    noises: list[Noise],
    query_prefix: str,
    batch_size: int,
    per_lang: int | None,
    seed: int,
    bf16: bool = False,
) -> dict:
    """Mo./Cr./Mul. mAP of a query sample, clean and under each noise, with the drop from clean.

    Only queries a noise changed are encoded again; the pool embeddings are reused as they
    are. A query a noise leaves as it was (no diacritics in Chinese, no capitals in Hindi,
    no letter drawn for a typo) keeps its clean embedding and is counted as unchanged.
    """
    rows = sample_queries(task, per_lang, seed)
    sample = subset_queries(task, rows)
    clean_queries = queries[rows]
    clean = settings_of(score_task(sample, clean_queries, pool))
    report: dict = {"queries": len(rows), "clean": clean}
    langs = np.asarray(task.langs)[sample.query_lang]
    for noise in noises:
        noisy_text = [perturb(text, noise, seed) for text in sample.query_text]
        changed = np.array([a != b for a, b in zip(noisy_text, sample.query_text)], dtype=bool)
        noisy_queries = clean_queries.copy()
        if changed.any():
            log.info(f"  {noise.name}: encoding the {changed.sum()} changed of {len(rows)} queries")
            embedded, index = encode_unique(
                model, [query_prefix + text for text, c in zip(noisy_text, changed) if c], batch_size, bf16, f"encoding {noise.name}"
            )
            noisy_queries[changed] = embedded[index]
        noisy = settings_of(score_task(sample, noisy_queries, pool))
        unchanged = pd.Series(langs[~changed]).value_counts().reindex(task.langs, fill_value=0)
        report[noise.name] = {
            **noisy,
            **{key.replace("_map", "_drop"): round(clean[key] - noisy[key], 6) for key in SETTINGS},
            "unchanged": int((~changed).sum()),
            "unchanged_by_lang": {lang: int(n) for lang, n in unchanged.items()},
        }
    return report
