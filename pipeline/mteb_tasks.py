"""MTEB retrieval tasks (XQuAD, MLQA, MIRACL, Belebele...) for the `evaluate` stage, through `mteb`.

Tasks are resolved and their data loaded before any model is, so a misspelt name or an
offline machine fails in seconds, not after the LAReQA evaluation. Results are never read
from or written to mteb's result cache (~/.cache/mteb): DVC already tracks them, and a
cached score of an older checkpoint under the same path would be silently reused.
"""

from __future__ import annotations

from pipeline.common import PipelineError, first_line

SCORES = ("ndcg_at_10", "recall_at_100")  # the main score of MTEB retrieval, and how much a reranker could recover


def resolve_tasks(names: list[str], langs: list[str] | None) -> list:
    """The MTEB retrieval tasks named in evaluate.mteb_tasks, restricted to `langs` (ISO 639-3), data loaded."""
    import mteb

    tasks = []
    for name in names:
        try:
            task = mteb.get_task(name, languages=langs or None)
        except KeyError:
            raise PipelineError(f"params.yaml: evaluate.mteb_tasks: unknown MTEB task '{name}'") from None
        except ValueError as err:  # an unknown language code, or no subset in these languages
            raise PipelineError(f"params.yaml: evaluate.mteb_langs: {name}: {first_line(err)}") from None
        tasks.append(task)
    for task in tasks:
        check_retrieval(task)
        load_task_data(task)
    return tasks


def check_retrieval(task) -> None:
    if task.metadata.type not in ("Retrieval", "Reranking"):
        raise PipelineError(
            f"params.yaml: evaluate.mteb_tasks: {task.metadata.name} is a {task.metadata.type} task; "
            "only retrieval tasks report nDCG@10 and Recall@100"
        )


def load_task_data(task) -> None:
    try:
        task.load_data()
    except Exception as err:  # the hub, the datasets library and the network fail in many ways
        raise PipelineError(f"MTEB task {task.metadata.name}: cannot load its data ({first_line(err)})") from None


def run_tasks(model, tasks: list, prefixes: tuple[str, str], batch_size: int) -> dict:
    """Evaluate a sentence-transformers model with the project's query/passage prefixes.

    Returns {task: {hf_subset: {split: {ndcg_at_10, recall_at_100}}}}, which DVC shows as
    `mteb.<task>.<subset>.<split>.ndcg_at_10`.
    """
    import mteb
    from mteb.models import SentenceTransformerEncoderWrapper

    query_prefix, passage_prefix = prefixes
    encoder = SentenceTransformerEncoderWrapper(model, model_prompts={"query": query_prefix, "document": passage_prefix})
    result = mteb.evaluate(
        encoder,
        tasks,
        cache=None,
        overwrite_strategy="always",
        co2_tracker=False,
        encode_kwargs={"batch_size": batch_size},
    )
    report: dict = {}
    for task_result in result.task_results:
        for split, subsets in task_result.scores.items():
            for scores in subsets:
                per_split = report.setdefault(task_result.task_name, {}).setdefault(scores["hf_subset"], {})
                per_split[split] = {key: round(float(scores[key]), 6) for key in SCORES}
    return report
