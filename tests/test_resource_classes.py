"""Joshi et al. (2020) resource classes: the table's anchors, every code form a dataset uses, and
one-line errors for a language the table lacks."""

from __future__ import annotations

import csv
import re

import pytest

from pipeline.common import PipelineError
from pipeline.sources.resource_classes import TABLE, has_class, mean_by_class, resource_class

XQUAD_R = "ar de el en es hi ru th tr vi zh".split()
MLQA_R = "ar de en es hi vi zh".split()
MIRACL = "ar bn en es fa fi fr hi id ja ko ru sw te th zh yo de".split()

# Values from Joshi et al.'s list (the class of the name in lang2tax.txt), not from memory.
ANCHORS = {
    5: ["en", "de", "es", "fr", "ja", "zh", "ar"],
    4: ["hi", "ru", "ko", "tr", "vi", "fa", "fi", "it", "pt", "nl"],
    3: ["el", "th", "bn", "id", "he", "uk", "ro"],
    2: ["sw", "yo", "zu", "am", "mr", "ga"],
    1: ["te", "my", "ne", "so", "cy"],
    0: ["shn"],
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with TABLE.open(encoding="utf-8") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@pytest.mark.parametrize(("joshi", "codes"), sorted(ANCHORS.items()))
def test_well_known_languages_have_the_papers_class(joshi, codes):
    assert {code: resource_class(code) for code in codes} == dict.fromkeys(codes, joshi)


@pytest.mark.parametrize("code", ["de", "deu", "deu-Latn", "deu_Latn", "DE", " deu "])
def test_every_code_form_names_the_same_language(code):
    assert resource_class(code) == 5 and has_class(code)


@pytest.mark.parametrize(
    ("individual", "macro"),
    [("cmn", "zho"), ("arb", "ara"), ("zsm", "msa"), ("swh", "swa"), ("pes", "fas"), ("npi", "nep"), ("lvs", "lav"), ("ekk", "est")],
)
def test_a_macrolanguage_and_its_standard_form_share_a_class(individual, macro):
    assert resource_class(individual) == resource_class(macro)


def test_every_language_of_the_evaluated_datasets_has_a_class():
    assert [code for code in {*XQUAD_R, *MLQA_R, *MIRACL} if not has_class(code)] == []
    mteb = pytest.importorskip("mteb")
    belebele = mteb.get_task("BelebeleRetrieval").metadata.hf_subsets_to_langscripts  # flores-style, 122 language variants
    langscripts = {code for codes in belebele.values() for code in codes}
    assert len(langscripts) == 122 and [code for code in sorted(langscripts) if not has_class(code)] == []


def test_the_table_is_one_row_per_code_with_a_class_from_0_to_5(rows):
    assert len(rows) > 800 and list(rows[0]) == ["iso639_1", "iso639_3", "name", "joshi_class", "joshi_name"]
    for column in ("iso639_1", "iso639_3"):
        codes = [row[column] for row in rows if row[column]]
        assert len(codes) == len(set(codes)), column
    assert all(re.fullmatch(r"[a-z]{3}", row["iso639_3"]) and re.fullmatch(r"[a-z]{2}|", row["iso639_1"]) for row in rows)
    assert {row["joshi_class"] for row in rows} == {"0", "1", "2", "3", "4", "5"}


@pytest.mark.parametrize("code", ["xx", "qqq", "python-Code", ""])
def test_a_language_without_a_class_fails_with_one_line_naming_it(code):
    assert not has_class(code)
    with pytest.raises(PipelineError, match=re.escape(f"no Joshi et al. resource class for language '{code}'")) as err:
        resource_class(code)
    assert "\n" not in str(err.value)


def test_mean_by_class_weighs_each_language_once_in_class_order():
    assert mean_by_class({"th": 0.2, "en": 0.9, "de": 0.7, "el": 0.4, "sw": 0.1}) == pytest.approx({2: 0.1, 3: 0.3, 5: 0.8})
    assert list(mean_by_class({"en": 1.0, "sw": 0.0, "th": 0.5})) == [2, 3, 5]
    assert mean_by_class({}) == {}
    with pytest.raises(PipelineError, match="'xx'"):
        mean_by_class({"en": 1.0, "xx": 0.5})
