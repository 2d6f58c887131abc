"""Hard negatives from the base model's ranking, and where each question's answer sits among the candidates.

Pure functions over the parallel tables, shared by the `mine` stage (which ranks) and `batches`
(which places the mined negatives and the paragraph ones in the plan).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.common import PipelineError
from pipeline.contracts import MINED_SCHEMA, PARALLEL_CANDIDATES_PATH, PARALLEL_QUESTIONS_PATH

ROWS_PER_BLOCK = 1024  # questions scored at once: a block's score matrix is ROWS_PER_BLOCK x one language's candidates


def answer_positions(questions: pd.DataFrame, candidates: pd.DataFrame) -> pd.Series:
    """(group_id, lang) -> the row of `candidates` holding that question's answer sentence."""
    position = pd.Series(np.arange(len(candidates)), index=pd.MultiIndex.from_frame(candidates[["lang", "candidate"]]))
    found = position.reindex(pd.MultiIndex.from_arrays([questions["lang"], questions["answer_candidate"]]))
    if found.isna().any():
        lang, candidate = found.index[found.isna()][0]
        raise PipelineError(
            f"{PARALLEL_QUESTIONS_PATH}: a '{lang}' question's answer_candidate {candidate} is not in {PARALLEL_CANDIDATES_PATH}"
        )
    answer = pd.Series(found.to_numpy(dtype=np.int64), index=pd.MultiIndex.from_frame(questions[["group_id", "lang"]]))
    if answer.index.has_duplicates:
        group, lang = answer.index[answer.index.duplicated()][0]
        raise PipelineError(f"{PARALLEL_QUESTIONS_PATH}: group '{group}' has more than one '{lang}' question")
    return answer


def mine_negatives(
    questions: pa.Table,
    candidates: pa.Table,
    question_embeddings: np.ndarray,
    candidate_embeddings: np.ndarray,
    top_k: int,
    relative_margin: float,
) -> tuple[pa.Table, dict[str, int]]:
    """The mined table (MINED_SCHEMA) and what the guards skipped, from unit-length embeddings row-aligned
    with `questions` and `candidates`.

    For each question and each language L of its group: L's candidates by cosine score, best first
    (ties: lower candidate id), one per distinct text, without the group's L answer, any candidate of
    its text, and any scoring above positive - |positive| x relative_margin (positive: the question's
    score with that answer); at most top_k. Counts: `skipped.same_text` (candidates sharing the
    answer's text, the answer included), `skipped.margin` (candidates the margin dropped).
    """
    q = questions.select(["group_id", "lang", "answer_candidate"]).to_pandas()
    cand = candidates.select(["lang", "candidate", "sentence"]).to_pandas()
    answer = answer_positions(q, cand)
    text = pd.factorize(cand["sentence"])[0]
    group_rows = q.groupby("group_id", sort=False).indices
    parts, skipped = [], {"skipped.same_text": 0, "skipped.margin": 0}
    for lang in sorted(cand["lang"].unique()):
        in_lang = cand.index[cand["lang"] == lang].to_numpy()
        in_lang = in_lang[np.argsort(cand["candidate"].to_numpy()[in_lang], kind="stable")]
        pool = in_lang[~pd.Series(text[in_lang]).duplicated().to_numpy()]  # one per distinct text, the lowest id
        answers = answer.xs(lang, level="lang")  # group -> its answer in `lang`
        rows = np.concatenate([group_rows[g] for g in answers.index]) if len(answers) else np.empty(0, np.int64)
        rows.sort()
        positive = answers.reindex(q["group_id"].to_numpy()[rows]).to_numpy(dtype=np.int64)
        pool_embeddings = candidate_embeddings[pool]
        per_text = np.bincount(text[in_lang], minlength=len(cand))  # the language's candidates of each text
        for start in range(0, len(rows), ROWS_PER_BLOCK):
            block, pos = rows[start : start + ROWS_PER_BLOCK], positive[start : start + ROWS_PER_BLOCK]
            scores = question_embeddings[block] @ pool_embeddings.T
            positive_scores = np.einsum("ij,ij->i", question_embeddings[block], candidate_embeddings[pos])
            same = text[pool][None, :] == text[pos][:, None]
            too_close = ~same & (scores > (positive_scores - np.abs(positive_scores) * relative_margin)[:, None])
            skipped["skipped.same_text"] += int(per_text[text[pos]].sum())
            skipped["skipped.margin"] += int(too_close.sum())
            scores = np.where(same | too_close, -np.inf, scores)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
            best = np.take_along_axis(scores, order, axis=1)
            keep = np.isfinite(best)
            row_of, rank = np.nonzero(keep)
            parts.append(
                pd.DataFrame(
                    {
                        "group_id": q["group_id"].to_numpy()[block][row_of],
                        "query_lang": q["lang"].to_numpy()[block][row_of],
                        "negative_lang": lang,
                        "rank": rank.astype(np.int32),
                        "negative_candidate": cand["candidate"].to_numpy()[pool[order[keep]]].astype(np.int32),
                        "score": best[keep].astype(np.float32),
                    }
                )
            )
    if not parts:
        return MINED_SCHEMA.empty_table(), skipped
    mined = pd.concat(parts, ignore_index=True).sort_values(
        ["group_id", "query_lang", "negative_lang", "rank"], kind="stable", ignore_index=True
    )
    return pa.Table.from_pandas(mined, MINED_SCHEMA, preserve_index=False).replace_schema_metadata(None), skipped
