"""The `mine` stage: hard negatives the base model ranks highest, for `sampler.negatives: mined` (negatives
in the passage's language) and `mined_query_language` (in the query's language), one table for both.

For every training question (group, language) and every language of its group (the only
languages a plan can pair it with, whatever `sampler.ratio` or schedule), the candidates
of that language that `models/base` scores highest against the prefixed question, best
first, `mine.top_k` of them. Queries and candidates are encoded as the evaluation encodes
them (params.yaml's prefixes, `pipeline/scoring/encoding.py`). Two guards keep likely
false negatives out, as sentence-transformers' `mine_hard_negatives` does: the positive
(the group's answer sentence in that language) and any candidate of the same text are
skipped, and so is any candidate scoring above positive - |positive| x
`mine.relative_margin` (NV-Retriever's TopK-PercPos). A language's candidates count once
per distinct text, ties go to the lower candidate id: the table is a function of the
embeddings. `batches` picks one per plan row (pipeline/batches.py).

Not `sentence_transformers.util.mine_hard_negatives`: it searches one corpus for every
query, so restricting each negative to one language takes a call per language, each
encoding the queries again; it returns texts, not the candidate ids the plan stores, and
deduplicates queries by text, pooling the positives of two groups whose questions read
alike. Here each language is one matrix product of the normalized embeddings.

DVC stages cannot be conditional: under any other negatives mode the stage writes an
empty table at once, without loading the model, stamped with that mode (and without the
mining params, so editing them reruns nothing after it).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from pipeline.common import atomic_outputs, read_parquet, run_stage, stage_parser, write_json, write_parquet
from pipeline.contracts import (
    BASE_MODEL_DIR,
    CANDIDATES_SCHEMA,
    MINED_MODES,
    MINED_PATH,
    MINED_SCHEMA,
    PARALLEL_CANDIDATES_PATH,
    PARALLEL_QUESTIONS_PATH,
    QUESTIONS_SCHEMA,
    pairs_stamp,
)
from pipeline.machine import describe, machine_record, resolve_precision
from pipeline.params import execution, load_params, mined_made_by
from pipeline.scoring.encoding import encode_unique, load_model
from pipeline.training.negatives import answer_positions, mine_negatives

log = logging.getLogger(__name__)


def encode_for_mining(model, questions: pa.Table, candidates: pa.Table, prefixes: tuple[str, str], batch_size: int, bf16: bool):
    """(question embeddings, candidate embeddings), row-aligned with the tables: prefixed as the evaluation
    prefixes queries and passages, each distinct text encoded once."""
    embedded = []
    for table, column, prefix, what in (
        (questions, "question", prefixes[0], "questions"),
        (candidates, "sentence", prefixes[1], "candidates"),
    ):
        unique, index = encode_unique(model, [prefix + t for t in table[column].to_pylist()], batch_size, bf16, desc=f"mine: {what}")
        embedded.append(unique[index])
    return embedded[0], embedded[1]


def mined_summary(mined: pa.Table, questions: pa.Table, top_k: int, skipped: dict[str, int]) -> dict[str, float | int]:
    """Flat counts for `dvc metrics diff`: questions, (question, language) lists mined, negatives, lists short of top_k or empty."""
    per_list = mined.group_by(["group_id", "query_lang", "negative_lang"]).aggregate([("rank", "count")])["rank_count"].to_numpy()
    q = questions.select(["group_id", "lang"]).to_pandas()
    lists = int(q.groupby("group_id")["lang"].size().pow(2).sum())  # each question x each language of its group
    metrics: dict[str, float | int] = {
        "questions": questions.num_rows,
        "lists": lists,
        "negatives": mined.num_rows,
        "lists.short": int((per_list < top_k).sum()) + lists - len(per_list),
        "lists.empty": lists - len(per_list),
        **skipped,
    }
    if mined.num_rows:
        metrics["score.mean"] = round(float(np.mean(mined["score"].to_numpy())), 4)
    return metrics


def main() -> None:
    args = stage_parser(__doc__, out=str(MINED_PATH), metrics="metrics/mine.json", model=str(BASE_MODEL_DIR)).parse_args()
    params = load_params(args.params)
    mode, mine = params.sampler.negatives, params.mine
    with atomic_outputs(args.out, args.metrics) as (out, metrics_path):
        if mode not in MINED_MODES:
            write_parquet(MINED_SCHEMA.empty_table(), out, made_by=mined_made_by(params))
            write_json({"mode": mode, "negatives": 0}, metrics_path)
        else:
            made_by = pairs_stamp(params.data.train, params.data.dev_share)
            questions = read_parquet(PARALLEL_QUESTIONS_PATH, QUESTIONS_SCHEMA, made_by=made_by)
            candidates = read_parquet(PARALLEL_CANDIDATES_PATH, CANDIDATES_SCHEMA, made_by=made_by)
            answer_positions(questions.to_pandas(), candidates.to_pandas())  # bad input fails before the model loads
            model = load_model(args.model, params.model.max_length)
            precision = resolve_precision(mine.precision, model.device.type, "mine.precision")
            machine = machine_record(str(model.device), precision)
            log.info(f"mine: encoding on {describe(machine)}")
            started = time.perf_counter()
            prefixes = (params.model.query_prefix, params.model.passage_prefix)
            embedded = encode_for_mining(model, questions, candidates, prefixes, execution().eval_batch_size, precision == "bf16")
            encoded = time.perf_counter()
            mined, skipped = mine_negatives(questions, candidates, *embedded, mine.top_k, mine.relative_margin)
            scored = time.perf_counter()
            metrics = {
                "mode": mode,
                **mined_summary(mined, questions, mine.top_k, skipped),
                "seconds.encode": round(encoded - started, 1),
                "seconds.score": round(scored - encoded, 1),
                "machine": machine,
            }
            write_parquet(mined, out, made_by=mined_made_by(params))
            write_json(metrics, metrics_path)
    if mode not in MINED_MODES:
        log.info(f"mine: sampler.negatives is {mode}, nothing to mine: an empty table -> {args.out}")
        return
    log.info(
        f"mine: {metrics['negatives']} negatives for {metrics['lists']} (question, language) lists of {metrics['questions']} questions "
        f"({metrics['lists.short']} short of {mine.top_k}, {metrics['lists.empty']} empty; skipped {skipped['skipped.same_text']} "
        f"answer texts and {skipped['skipped.margin']} within mine.relative_margin {mine.relative_margin}) in "
        f"{metrics['seconds.encode'] + metrics['seconds.score']:.0f} s -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
