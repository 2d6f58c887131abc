"""The `translate` stage: parallel (question, answer sentence) pairs for training.

Its output, `data/parallel/pairs.parquet`, is one row per (group, language): the
question and its positive passage (the answer sentence, as in the evaluation).
With `translate.model: null` (the embedded default) the training source's own
human translations are passed through unchanged, and `metrics/translate.json`
says so.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.common import PipelineError, load_params, param, read_parquet, run_stage, stage_parser, write_json, write_parquet
from pipeline.sources import CANDIDATES_SCHEMA, PAIRS_PATH, PAIRS_SCHEMA, QUESTIONS_SCHEMA, SQUAD_SOURCES


def pairs_from_source(questions: pa.Table, candidates: pa.Table) -> pa.Table:
    """Join every question with its answer sentence in the same language."""
    keyed = candidates.select(["lang", "candidate", "sentence"]).rename_columns(
        ["lang", "answer_candidate", "passage"]
    )
    joined = questions.join(keyed, keys=["lang", "answer_candidate"], join_type="inner")
    if joined.num_rows != questions.num_rows:
        raise PipelineError(
            f"{questions.num_rows - joined.num_rows} questions point at a candidate that does not exist"
        )
    return joined.select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA).sort_by([("group_id", "ascending"), ("lang", "ascending")])


def main() -> None:
    args = stage_parser(__doc__, out=str(PAIRS_PATH), metrics="metrics/translate.json").parse_args()
    params = load_params(args.params)
    source = param(params, "data.train")
    model = param(params, "translate.model")
    if model is not None:
        raise PipelineError(
            "params.yaml: translate.model: machine translation is not available in this version; "
            "set it to null to train on the source's human translations"
        )
    if source in SQUAD_SOURCES:
        raise PipelineError(
            f"params.yaml: translate.model: data.train={source} is English only; it needs a translation model"
        )
    raw = Path("data/raw") / source
    questions = read_parquet(raw / "questions.parquet", QUESTIONS_SCHEMA)
    candidates = read_parquet(raw / "candidates.parquet", CANDIDATES_SCHEMA)
    pairs = pairs_from_source(questions, candidates)
    write_parquet(pairs, args.out, made_by={"data.train": source, "translate.model": None})
    per_lang = dict(zip(*pairs.group_by("lang").aggregate([("group_id", "count")]).to_pydict().values()))
    write_json(
        {
            "model": "none (human translations passed through)",
            "source": source,
            "groups": len(set(pairs["group_id"].to_pylist())),
            **{f"pairs.{lang}": n for lang, n in sorted(per_lang.items())},
        },
        args.metrics,
    )
    print(f"wrote {args.out}: {pairs.num_rows} pairs from {source} (human translations, no MT)")


if __name__ == "__main__":
    run_stage(main)
