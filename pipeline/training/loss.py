"""InfoNCE over a planned batch, and its cached-gradient path (GradCache, Gao et al. 2021).

Each query is scored against every passage of its planned batch (and the batch's hard
negatives), so what a batch holds (monolingual or cross-lingual pairs) is exactly what the
model learns to separate. Under `sampler.schedule: multitask` each task's rows are scored
against their own task's passages only. With `train.chunk_size`, embeddings are computed
chunk by chunk without a graph, the loss's gradient w.r.t. them is taken, and each chunk is
re-embedded with its gradient, so a batch of 4096 pairs needs the memory of `chunk_size` pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.scoring.encoding import autocast, embed, embedding_dim
from pipeline.training.adversary import LanguageAdversary, adversary_grads
from pipeline.training.checkpoint import rng_state, set_rng_state
from pipeline.training.distributed import World
from pipeline.training.planned import PlannedBatch


def info_nce_loss(
    queries: torch.Tensor, passages: torch.Tensor, temperature: float, offset: int = 0, same_task: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of each query over all passages of the batch; its own passage is the target.

    `queries` may be one rank's slice of the batch, starting at row `offset` of `passages`;
    rows of `passages` past the positives are hard negatives. With `same_task` (queries x
    passages), a query is scored against its own task's passages only, so the mean is the
    sum of each task's InfoNCE weighted by its share of the rows.
    """
    queries = F.normalize(queries, dim=-1)
    passages = F.normalize(passages, dim=-1)
    logits = queries @ passages.T / temperature
    if same_task is not None:
        logits = logits.masked_fill(~same_task, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device) + offset)


def same_task_mask(batch: PlannedBatch, world: World, device) -> torch.Tensor | None:
    """Which passages (all ranks' positives, then all hard negatives) each of this rank's queries is scored against."""
    columns = batch.column_tasks()
    if columns is None:
        return None
    code = {task: i for i, task in enumerate(sorted(set(columns)))}
    rows = torch.tensor([code[task] for task in world.share(batch.tasks)], device=device)
    return rows[:, None] == torch.tensor([code[task] for task in columns], device=device)[None, :]


def loss_and_embedding_grads(
    queries: torch.Tensor, passages: torch.Tensor, negatives: torch.Tensor, batch: PlannedBatch, temperature: float, world: World
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The planned batch's loss and its gradient w.r.t. this rank's query, passage and negative embeddings.

    Passages and hard negatives of all ranks are gathered; each rank's loss is its queries'
    mean over the gathered ones, and their gradients from all ranks' losses are summed,
    so after averaging weight gradients over ranks the step equals one process on the
    whole batch.
    """
    queries = queries.detach().requires_grad_()
    per_rank = batch.negatives_per_rank(world)
    gathered_negatives = world.gather(negatives, per_rank) if sum(per_rank) else negatives.detach()
    columns = torch.cat([world.gather(passages), gathered_negatives]).requires_grad_()
    offset = world.rank * len(queries)
    loss = info_nce_loss(queries, columns, temperature, offset, same_task_mask(batch, world, queries.device))
    loss.backward()
    grad = world.sum_(columns.grad)
    first_negative = len(batch.queries) + sum(per_rank[: world.rank])
    return loss.detach(), [
        queries.grad,
        grad[offset : offset + len(passages)],
        grad[first_negative : first_negative + len(negatives)],
    ]


def contrastive_step(
    model,
    batch: PlannedBatch,
    temperature: float,
    world: World,
    chunk_size: int | None,
    bf16: bool,
    adversary: LanguageAdversary | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the gradient of one planned batch (this rank's share) into the model and the
    adversary; returns this rank's loss and the adversary's figures.

    With `chunk_size`, embeddings are first computed chunk by chunk without a graph and
    each chunk is then re-embedded, replaying its random state (dropout), with the
    gradient the whole-batch loss gives it.
    """
    dim = embedding_dim(model)

    def forward(texts: list[str]) -> torch.Tensor:
        if not texts:  # a rank whose rows have no hard negative
            return torch.zeros(0, dim, device=model.device)
        with autocast(model.device.type, bf16):
            return embed(model, texts).float()

    mine = batch.share(world)
    texts = [mine.queries, mine.passages, mine.negative_texts()]
    if chunk_size is None:
        outputs = [forward(part) for part in texts]
        embeddings = [output.detach() for output in outputs]
    else:
        chunks = [(i, part[j : j + chunk_size]) for i, part in enumerate(texts) for j in range(0, len(part), chunk_size)]
        rng_states, chunk_embeddings = [], []
        with torch.no_grad():
            for _, chunk in chunks:
                rng_states.append(rng_state())
                chunk_embeddings.append(forward(chunk))
        after = rng_state()
        embeddings = [
            torch.cat([e for (i, _), e in zip(chunks, chunk_embeddings) if i == part] or [forward([])]) for part in range(len(texts))
        ]
    loss, grads = loss_and_embedding_grads(*embeddings, batch, temperature, world)
    figures: dict[str, torch.Tensor] = {}
    if adversary is not None:
        texts_in_batch = 2 * len(batch.queries) + len(batch.negative_texts())
        figures, reversed_grads = adversary_grads(adversary, embeddings, mine.languages(), texts_in_batch, world)
        grads = [grad + extra for grad, extra in zip(grads, reversed_grads)]
    if chunk_size is None:
        used = [(output, grad) for output, grad in zip(outputs, grads) if output.requires_grad]
        torch.autograd.backward([output for output, _ in used], [grad for _, grad in used])
        return loss, figures
    chunk_grads = [chunk_grad for part, grad in enumerate(grads) if texts[part] for chunk_grad in grad.split(chunk_size)]
    for (_, chunk), state, grad in zip(chunks, rng_states, chunk_grads):
        set_rng_state(state)
        forward(chunk).backward(grad)
    set_rng_state(after)
    return loss, figures
