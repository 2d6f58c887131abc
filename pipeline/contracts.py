"""What one stage writes and the next reads: paths, Parquet schemas and provenance stamps.

Producer and consumer import the same definitions, so a path, a column or a param
that a file is stamped with cannot drift between the two. The stamps are the params
a file was made from (`write_parquet(..., made_by=...)`); a consumer passes its own
params' stamp to `read_parquet`, which refuses a file made from other params.

Tables:
- `data/raw/<source>/questions.parquet`: one row per (question id, language);
  `group_id` is the id shared by a question's translations, `answer_candidate`
  indexes `candidates` of the same language (the sentence that holds the answer),
  `article` and `paragraph` name the question's article and its answer's paragraph with
  ids shared across languages (`fetch.link_across_languages`);
- `data/raw/<source>/candidates.parquet`: every sentence of every paragraph, per
  language, in document order (`candidate` = 0..n-1 within the language);
- `data/parallel/{questions,candidates}.parquet`: the same layout for the training
  source after `translate`; `data/parallel/pairs.parquet`: one row per (group,
  language), the question and its answer sentence (the positive passage);
- `data/batches/plan.parquet`: the batch plan, one row per planned pair; `kind` says
  whether the row is monolingual or cross-lingual (under `sampler.schedule: multitask`,
  which task it trains), `negative_lang` and `negative_candidate` name its hard negative
  (a row of `data/parallel/candidates.parquet`; null when it has none);
- `data/mined/negatives.parquet`: the hard negatives the base model ranks highest, one
  row per (question, candidate language, rank): for each question (`group_id`,
  `query_lang`) and each language of its group, up to `mine.top_k` candidates of that
  language (`negative_lang`, `negative_candidate`), best first; empty unless
  `sampler.negatives` is `mined` or `mined_query_language`;
- `metrics/eval_queries/<dataset>.parquet`: one row per scored query and setting.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

PARAMS_CHECKED_PATH = Path("data/checked/params.ok")  # the `params` stage's output, upstream of every stage
RAW_DIR = Path("data/raw")
OWN_SOURCE = "own"  # the source name of data of the user's own (data.train: a file, folder or hub id): data/raw/own/
PARALLEL_DIR = Path("data/parallel")
PAIRS_PATH = PARALLEL_DIR / "pairs.parquet"
PARALLEL_QUESTIONS_PATH = PARALLEL_DIR / "questions.parquet"
PARALLEL_CANDIDATES_PATH = PARALLEL_DIR / "candidates.parquet"
DEV_DIR = Path("data/dev")  # the held-out dev split of the training source: questions.parquet, candidates.parquet
PLAN_PATH = Path("data/batches/plan.parquet")
MINED_PATH = Path("data/mined/negatives.parquet")
BASE_MODEL_DIR = Path("models/base")
RESULTS_DIR = Path("results")  # where scoring a model by hand writes (git-ignored): never over a stage's outputs

QUESTIONS_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer_candidate", pa.int32(), nullable=False),
        pa.field("article", pa.string(), nullable=False),  # the question's article, one id across languages
        pa.field("paragraph", pa.string(), nullable=False),  # its answer's paragraph, likewise (the unit statistics resample)
    ]
)

CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("lang", pa.string(), nullable=False),
        pa.field("candidate", pa.int32(), nullable=False),
        pa.field("paragraph", pa.int32(), nullable=False),
        pa.field("sentence_index", pa.int32(), nullable=False),
        pa.field("sentence", pa.string(), nullable=False),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("passage", pa.string(), nullable=False),
    ]
)

PLAN_SCHEMA = pa.schema(
    [
        pa.field("batch", pa.int32(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("query_lang", pa.string(), nullable=False),
        pa.field("passage_lang", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # mono | cross
        pa.field("negative_lang", pa.string()),  # the hard negative's language; null = none
        pa.field("negative_candidate", pa.int32()),  # its `candidate` in data/parallel/candidates.parquet
    ]
)

MINED_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("query_lang", pa.string(), nullable=False),  # the question's language
        pa.field("negative_lang", pa.string(), nullable=False),  # the language of the candidates ranked
        pa.field("rank", pa.int32(), nullable=False),  # 0 = the base model's best after the guards
        pa.field("negative_candidate", pa.int32(), nullable=False),  # its `candidate` in data/parallel/candidates.parquet
        pa.field("score", pa.float32(), nullable=False),  # cosine similarity to the prefixed question
    ]
)

# Per-query evaluation results: the unit that paired statistics resample (pipeline/analysis/compare.py).
QUERIES_SCHEMA = pa.schema(
    [
        pa.field("setting", pa.string(), nullable=False),  # mono | cross | multi
        pa.field("query_lang", pa.string(), nullable=False),
        pa.field("passage_lang", pa.string()),  # null for multi (the pool of every language)
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("paragraph", pa.string()),  # the question's paragraph id: the cluster paired statistics resample
        pa.field("ap", pa.float64(), nullable=False),
        pa.field("recall_at_1", pa.float64()),  # mono, cross
        pa.field("recall_at_10", pa.float64()),  # multi
        pa.field("rank_distance", pa.float64()),  # multi
        pa.field("own_language_first", pa.float64()),  # multi: 1 if the best-ranked answer is in the query's language
        pa.field("top1", pa.string()),  # mono, cross: answer | sibling (same paragraph) | other
    ]
)

# The sampler params a plan is made from; `batches` stamps them and `train` checks them.
SAMPLER_PARAMS = ("ratio", "schedule", "order", "batch_size", "steps", "negatives")
# hybrid: a coin per batch (the paper); sequential: mono_count(ratio, steps) mono batches, then
# cross ones (or the reverse); multitask: mono_count(ratio, batch_size) mono rows and the rest
# cross in every batch, one loss each; pair: a coin per pair (baseline).
SAMPLER_SCHEDULES = ("hybrid", "sequential", "multitask", "pair")
SAMPLER_ORDERS = ("mono_first", "cross_first")  # sequential only
# none | another sentence of the answer's paragraph in the passage's language | in the query's language |
# what the base model ranks highest in the passage's language (the `mine` stage's table) | in the query's language
NEGATIVE_MODES = ("none", "paragraph", "query_language", "mined", "mined_query_language")
MINED_MODES = ("mined", "mined_query_language")  # the modes that read the `mine` stage's table (one table serves both)
QUERY_LANGUAGE_MODES = ("query_language", "mined_query_language")  # the negative is in the query's language
# The headline figure of each LAReQA setting: the metrics name them, and so do the dev curve
# (`dev/<figure>` in metrics/train_live) and `train.keep_best`.
HEADLINE_FIGURES = ("mono_map", "cross_map", "multi_map")
PRECISIONS = ("auto", "fp32", "bf16")  # auto = bf16 autocast where the device has native bf16 units (pipeline/machine.py)


def raw_tables(source: str, raw_dir: Path = RAW_DIR) -> tuple[Path, Path]:
    """(questions, candidates) paths of a fetched source."""
    return raw_dir / source / "questions.parquet", raw_dir / source / "candidates.parquet"


def raw_stamp(source: str, data_train: str | None = None) -> dict:
    """What `fetch` stamps on a source's tables (a SQuAD source adds its spec and split); data of the
    user's own (OWN_SOURCE) also names the file or dataset id it came from, `data.train`."""
    return {"source": source, "data.train": data_train} if source == OWN_SOURCE else {"source": source}


def pairs_stamp(data_train: str, dev_share: float) -> dict:
    """What consumers of `data/parallel/*` and `data/dev/*` check: the training source and the share held out as dev."""
    return {"data.train": data_train, "data.dev_share": dev_share}


def mined_stamp(data_train: str, dev_share: float, negatives: str, mining: dict | None = None) -> dict:
    """What `mine` stamps on its table and `batches` checks: the training data, the negatives mode (another mode
    gets an empty table; both mined modes read the same table, stamped `mined`) and, for them, the params the
    mining used (`mine.*`, the model's prefixes and length)."""
    return {**pairs_stamp(data_train, dev_share), "sampler.negatives": "mined" if negatives in MINED_MODES else negatives, **(mining or {})}


def mono_count(ratio: float, n: int) -> int:
    """Monolingual batches of a sequential run (n = steps), or rows of a multitask batch (n = batch_size)."""
    return round(ratio * n)


def plan_stamp(seed: int, sampler: dict, inert: Collection[str] = ()) -> dict:
    """What `batches` stamps on the plan and `train` checks: the seed and every sampler param but the
    `inert` ones (dotted names of params with no effect on the plan), so editing one leaves the plan's
    bytes, and so the stages after it, as they were."""
    return {"seed": seed, "sampler": {key: sampler[key] for key in SAMPLER_PARAMS if f"sampler.{key}" not in inert}}


def queries_dir(metrics_file: str | Path) -> Path:
    """Where per-query results go beside a metrics file: metrics/eval.json -> metrics/eval_queries/<dataset>.parquet."""
    metrics_file = Path(metrics_file)
    return metrics_file.with_name(f"{metrics_file.stem}_queries")


# Query perturbations, by name: params.yaml names them (evaluate.noise, train.query_noise) and the
# metrics are keyed by them (`xquad_r.noise.typo_0.05.multi_drop`). The grammar is here, apart from
# the perturbations themselves (pipeline/scoring/noise.py), so checking params needs no scoring code.
NOISE_KINDS = ("typo", "no_diacritics", "lowercase")


@dataclass(frozen=True)
class Noise:
    """One perturbation as named in params.yaml: `typo_<rate>`, `no_diacritics` or `lowercase`."""

    name: str
    kind: str
    rate: float | None = None  # typo: probability that a letter gets an edit

    @classmethod
    def parse(cls, name: str) -> Noise:
        if name in ("no_diacritics", "lowercase"):
            return cls(name, name)
        kind, _, rate = str(name).partition("_")
        if kind == "typo":
            try:
                value = float(rate)
            except ValueError:
                value = -1.0
            if 0 < value <= 1:
                return cls(name, kind, value)
            raise ValueError(f"'{name}': a typo rate must be a number in (0, 1], e.g. typo_0.05")
        raise ValueError(f"unknown noise '{name}' (known: typo_<rate>, no_diacritics, lowercase)")
