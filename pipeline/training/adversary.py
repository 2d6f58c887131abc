"""The language adversary (`train.adversarial_weight`): a classifier of each embedding's language
behind a gradient-reversal layer, so the encoder learns to make languages hard to tell apart."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.common import PipelineError
from pipeline.params import TrainParams
from pipeline.scoring.encoding import embedding_dim
from pipeline.training.distributed import World
from pipeline.training.planned import PlannedBatch


class GradientReversal(torch.autograd.Function):
    """Identity on the way forward; on the way back the gradient is multiplied by -weight
    (Ganin & Lempitsky 2015): what helps the classifier, the encoder is pushed against."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


class LanguageAdversary(torch.nn.Module):
    """A linear classifier of an embedding's language behind a gradient-reversal layer: it learns
    to tell the languages apart while the encoder learns to make that hard."""

    def __init__(self, dim: int, langs: Sequence[str], weight: float):
        super().__init__()
        self.langs, self.weight = list(langs), weight
        self.classifier = torch.nn.Linear(dim, len(self.langs))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.classifier(GradientReversal.apply(embeddings, self.weight))


def adversary_grads(
    adversary: LanguageAdversary, embeddings: list[torch.Tensor], langs: list[str], texts_in_batch: int, world: World
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Accumulate the classifier's gradient; returns its loss and accuracy over the whole planned
    batch, and the reversed gradient w.r.t. each of this rank's embeddings.

    Each rank's cross-entropy sum is scaled by size / texts_in_batch, so that averaging
    gradients over ranks gives the mean over every text of the batch, as one process would.
    """
    leaves = [e.detach().requires_grad_() for e in embeddings]
    index = {lang: i for i, lang in enumerate(adversary.langs)}
    target = torch.tensor([index[lang] for lang in langs], device=leaves[0].device)
    logits = adversary(torch.cat(leaves))
    total = F.cross_entropy(logits, target, reduction="sum")
    (total * world.size / texts_in_batch).backward()
    sums = world.sum_(torch.stack([total.detach(), (logits.argmax(-1) == target).sum().float()]))
    figures = {"adversary_loss": sums[0] / texts_in_batch, "adversary_accuracy": sums[1] / texts_in_batch}
    return figures, [leaf.grad for leaf in leaves]


def make_adversary(model, batches: list[PlannedBatch], config: TrainParams) -> LanguageAdversary | None:
    """The language adversary over every language the plan trains on, or None when it is off."""
    if config.adversarial_weight == 0:
        return None
    langs = sorted({lang for batch in batches for lang in batch.languages()})
    if len(langs) < 2:
        raise PipelineError(f"params.yaml: train.adversarial_weight: the plan has one language ({', '.join(langs)}): nothing to tell apart")
    return LanguageAdversary(embedding_dim(model), langs, config.adversarial_weight).to(model.device)
