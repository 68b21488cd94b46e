"""Classification metrics: top-1, top-5 and mean cross-entropy over a split (PAPER.md section 10).

Statistics are kept as sums in one tensor so that ranks of a distributed run can add them with one all-reduce before
the ratios are taken; a mean of per-rank means would weight ranks with fewer images wrongly.
"""

from __future__ import annotations

import torch
from torch import nn

STATS = ("loss_sum", "top1", "top5", "count")


def classification_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy, top-1 hits, top-5 hits, images] of one batch (float64 to sum exactly)."""
    k = min(5, logits.shape[1])
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
    top = logits.topk(k, dim=1).indices
    hits = top.eq(labels[:, None])
    return torch.stack([loss.detach().double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                        torch.tensor(float(labels.numel()), dtype=torch.float64)])


def summarize_classification(stats: torch.Tensor) -> dict[str, float]:
    loss_sum, top1, top5, count = stats.tolist()
    if count == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "images": 0}
    return {"loss": loss_sum / count, "top1": top1 / count, "top5": top5 / count, "images": int(count)}

