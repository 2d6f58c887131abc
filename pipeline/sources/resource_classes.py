"""Joshi et al. (2020) resource classes of languages, so that scores can be averaged per class.

Joshi, Santy, Budhiraja, Bali and Choudhury ("The State and Fate of Linguistic Diversity and
Inclusion in the NLP World", ACL 2020) sort languages into six classes by the labelled and
unlabelled data they have, from 0 ("The Left-Behinds") to 5 ("The Winners": English, German,
Spanish, French, Japanese, Arabic, Chinese). Whether a retriever trained on a few languages
transfers depends on this as much as on the language family, so the evaluation reports it.

resource_classes.csv beside this module holds the class of every language of XQuAD-R, MLQA-R,
MIRACL and Belebele, and of every other language whose code could be checked; its header says
where the classes come from and how the codes were mapped.
"""

from __future__ import annotations

import csv
import functools
import re
from collections import defaultdict
from pathlib import Path

from pipeline.common import PipelineError

TABLE = Path(__file__).with_name("resource_classes.csv")


@functools.cache
def classes() -> dict[str, int]:
    """ISO 639-1 and ISO 639-3 code -> class, from the table (its `#` lines are its header)."""
    with TABLE.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return {code: int(row["joshi_class"]) for row in rows for code in (row["iso639_1"], row["iso639_3"]) if code}


def language_code(code: str) -> str:
    """The language part of `de`, `deu`, `deu-Latn` (MTEB) or `deu_Latn` (FLORES, Belebele)."""
    return re.split(r"[-_]", code.strip(), maxsplit=1)[0].lower()


def has_class(code: str) -> bool:
    return language_code(code) in classes()


def resource_class(code: str) -> int:
    """The class (0-5) of a language given as ISO 639-1, ISO 639-3, or either with a script."""
    try:
        return classes()[language_code(code)]
    except KeyError:
        raise PipelineError(f"pipeline/{TABLE.name}: no Joshi et al. resource class for language '{code}' (add a row there)") from None


def mean_by_class(per_language: dict[str, float]) -> dict[int, float]:
    """The mean of the per-language figures in each class (each language counted once), classes in order."""
    grouped: dict[int, list[float]] = defaultdict(list)
    for code, value in per_language.items():
        grouped[resource_class(code)].append(value)
    return {joshi: sum(values) / len(values) for joshi, values in sorted(grouped.items())}
