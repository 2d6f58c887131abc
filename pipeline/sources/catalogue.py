"""The QA sources the pipeline knows: where each is published, pinned by sha256, and its licence;
and how `data.train` names data of the user's own instead (docs/own-data.md).

`fetch` downloads (or reads from the mirror) and validates them into the tables of
`pipeline/contracts.py`; `evaluate` and the params schema check dataset names here; the
model card (`pipeline/card.py`) names the training source and its licence, which a model
trained on it inherits.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.contracts import OWN_SOURCE


@dataclass(frozen=True)
class LareqaSource:
    """A LAReQA-format dataset: one SQuAD-style JSON file per language, pinned by sha256."""

    name: str
    title: str  # as its paper writes it
    license: str  # the Hugging Face hub's licence id; a model trained on it inherits it (the model card says so)
    url_template: str  # formatted with lang=...
    mirror_dir: str  # relative path under the mirror root
    sha256: dict[str, str]

    @property
    def langs(self) -> list[str]:
        return sorted(self.sha256)


XQUAD_R = LareqaSource(
    name="xquad_r",
    title="XQuAD-R",
    license="cc-by-sa-4.0",
    url_template=(
        "https://raw.githubusercontent.com/google-research-datasets/lareqa/9bc8c7fb6dd8d01d72a05a93c2cb96882b0d299c/xquad-r/{lang}.json"
    ),
    mirror_dir="lareqa/xquad-r",
    sha256={
        "ar": "c52922d3b8ac1ae03ed5ac38647ad59870dca3dda2beefe18ecdc30729acb69d",
        "de": "16fb0f4bf4916154b585a20c24c66074591c9718a1affe764ff4697572328949",
        "el": "163fd43ee785a30eb534ae2061e9eaa766a7ee4e8ffce5e4b422480c150f64b6",
        "en": "7b0954f39297c27a31fef610f0883337dd2907fa8699151dc922afdd0fa12ffe",
        "es": "f8e836b2d91009c4363e04315f7ede363eedbbb49c67dda60de6c4aa782f58de",
        "hi": "ea45ba8ae4513d1533b222bebdc02a90bc319c055d3aeea68584a053d2e92872",
        "ru": "7f4dff853538b9a5fcc28c070b8bb983a5c5d190ac747b8e005a1ada9cab18f1",
        "th": "c3a041864c3a9fb0b4dd91cfdf99cf36b411b3e704c58a303c97bc6dc786cfe4",
        "tr": "f3e8c13002bbce154a4578f535f7533cb70f3da08840e6b62735935baec7bd94",
        "vi": "e35926bf5cc6fc6ecbdfca49467aabeb454f08d152d7818143a906bd31dde995",
        "zh": "80c2cde7b9c2fb134c303cbb52f2ba396ead9eb0014aec43993543d2ba9e93ed",
    },
)

MLQA_R = LareqaSource(
    name="mlqa_r",
    title="MLQA-R",
    license="cc-by-nc-4.0",  # non-commercial: so is a model trained on it
    url_template=(
        "https://raw.githubusercontent.com/google-research-datasets/lareqa/354d67d1cd066854cdfbf5ad0e6105528976141d/mlqa-r/{lang}.json"
    ),
    mirror_dir="lareqa/mlqa-r",
    sha256={
        "ar": "2132fbc03208535c0fe01f2e2c5121d06f9c2aa799af93b0a719dbc105bdf137",
        "de": "ce9454dc5aa6f2d85c23cd6e49cb367fbb7c4c6e62d7f71e355c6b5dae4d0886",
        "en": "fedd9a5cc0848dda80caf84aa36f482adaae230526a3f6e9e86926a93ef3b1e4",
        "es": "70ecba276b8c96a692b120693a595d076ce94ad21d4b28311538a9fcbfe0f9d7",
        "hi": "4dd0fb3c06f737a5481d705bc1dcac7876712a5815c9265908fbb3a0696cb654",
        "vi": "9d3baff6ba03e6793b25594217265ea59a136b9733833dca8a9582a84a78ff85",
        "zh": "57f01d2fff50cf3392805635b01445339f225ad5bf28ba8443b12f8dbd1e69dc",
    },
)

LAREQA_SOURCES = {s.name: s for s in (XQUAD_R, MLQA_R)}
# English SQuAD-format sources (translated by the `translate` stage); read with `datasets`.
SQUAD_SOURCES = {"squad"}
SQUAD_LICENSE = "cc-by-sa-4.0"  # SQuAD v1.1 (rajpurkar/squad, data.squad's default)

# Data of the user's own: `data.train` names a local file by its suffix, a `save_to_disk` folder or a
# hub dataset id (docs/own-data.md); `fetch` writes its tables as the source contracts.OWN_SOURCE.
OWN_FILE_LOADERS = {".parquet": "parquet", ".jsonl": "json", ".csv": "csv"}  # suffix -> the `datasets` builder that reads it
OWN_DATA_DIR = "data/own"  # a dependency of `fetch` in dvc.yaml: a file here reruns fetch when it changes


def known_sources() -> list[str]:
    return sorted(set(LAREQA_SOURCES) | SQUAD_SOURCES)


def is_own_data(train: str) -> bool:
    """Whether `data.train` names data of the user's own rather than a known source."""
    return train not in LAREQA_SOURCES and train not in SQUAD_SOURCES


def raw_source(train: str) -> str:
    """The source whose fetched tables `data.train` trains on (the folder under data/raw/)."""
    return OWN_SOURCE if is_own_data(train) else train


def source_license(train: str) -> str | None:
    """A known source's licence; None for data of the user's own (only its owner can declare it)."""
    if train in LAREQA_SOURCES:
        return LAREQA_SOURCES[train].license
    return SQUAD_LICENSE if train in SQUAD_SOURCES else None
