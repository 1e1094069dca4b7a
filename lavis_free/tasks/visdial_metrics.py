"""VisDial v1.0 retrieval metrics: R@1/5/10, mean rank and MRR of the ground-truth answer, and NDCG.

Each is a pure function of a ``[rounds, options]`` tensor of ranks (:func:`scores_to_ranks`
makes them from a model's scores; rank 1 is the best) and the ground truth: ``gt_index`` per
round for the sparse metrics, ``relevance`` (one value in [0, 1] per option) per round for NDCG.
NDCG is the official one (visdial-challenge-starter-pytorch): for each round, with k the number
of options of relevance > 0, the DCG@k of the options in ranked order (relevance /
log2(rank + 1)) over the DCG@k of the ideal order; averaged over rounds. Values are fractions in
[0, 1] (mean rank in 1..options), as the official code reports them.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

RECALL_AT = (1, 5, 10)


def _check_matrix(name: str, values: torch.Tensor) -> None:
    if values.dim() != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"{name} must be a [rounds, options] tensor with at least one round, "
                         f"got shape {tuple(values.shape)}")


def scores_to_ranks(scores: torch.Tensor) -> torch.Tensor:
    """``[rounds, options]`` scores -> the 1-based rank of each option (highest score = rank 1).

    Ties go to the lower option index (a stable sort), so equal scores give reproducible ranks;
    the official code's unstable sort leaves them arbitrary.
    """
    _check_matrix("scores", scores)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def gt_ranks(ranks: torch.Tensor, gt_index: torch.Tensor) -> torch.Tensor:
    """The rank of each round's ground-truth option, as floats: ``[rounds]``."""
    _check_matrix("ranks", ranks)
    gt_index = torch.as_tensor(gt_index, dtype=torch.long, device=ranks.device)
    if gt_index.shape != (ranks.shape[0],):
        raise ValueError(f"gt_index must hold one index per round ({ranks.shape[0]}), "
                         f"got shape {tuple(gt_index.shape)}")
    if bool(((gt_index < 0) | (gt_index >= ranks.shape[1])).any()):
        raise ValueError(f"gt_index values must be option indices in 0..{ranks.shape[1] - 1}, got {gt_index.tolist()}")
    return ranks.gather(1, gt_index[:, None]).squeeze(1).float()


def recall_at(ranks: torch.Tensor, gt_index: torch.Tensor, k: int) -> float:
    """R@k: the fraction of rounds whose ground-truth option ranks k or better."""
    return (gt_ranks(ranks, gt_index) <= k).float().mean().item()


def mean_rank(ranks: torch.Tensor, gt_index: torch.Tensor) -> float:
    return gt_ranks(ranks, gt_index).mean().item()


def mean_reciprocal_rank(ranks: torch.Tensor, gt_index: torch.Tensor) -> float:
    return gt_ranks(ranks, gt_index).reciprocal().mean().item()


def _dcg(relevance_in_order: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """DCG@k per round of relevance already in ranked order: sum over the first k of rel / log2(rank + 1)."""
    rank = torch.arange(1, relevance_in_order.shape[1] + 1, device=relevance_in_order.device, dtype=torch.float)
    gains = relevance_in_order / torch.log2(rank + 1)
    return torch.where(rank[None, :] <= k[:, None], gains, torch.zeros_like(gains)).sum(dim=1)


def ndcg(ranks: torch.Tensor, relevance: torch.Tensor) -> float:
    """The official VisDial NDCG, averaged over rounds; ``relevance`` is ``[rounds, options]`` in [0, 1]."""
    _check_matrix("ranks", ranks)
    relevance = torch.as_tensor(relevance, dtype=torch.float, device=ranks.device)
    if relevance.shape != ranks.shape:
        raise ValueError(f"relevance must have the shape of ranks {tuple(ranks.shape)}, got {tuple(relevance.shape)}")
    k = (relevance > 0).sum(dim=1)
    if bool((k == 0).any()):
        rounds = torch.nonzero(k == 0).flatten().tolist()
        raise ValueError(f"NDCG is undefined for rounds with no option of relevance > 0: rounds {rounds}")
    ranked = relevance.gather(1, torch.argsort(ranks, dim=1))
    ideal = torch.sort(relevance, dim=1, descending=True).values
    return (_dcg(ranked, k) / _dcg(ideal, k)).mean().item()


def retrieval_metrics(scores: torch.Tensor, gt_index: Sequence[Optional[int]],
                      relevance: Sequence[Optional[Sequence[float]]]) -> Dict[str, float]:
    """All VisDial metrics of ``[rounds, options]`` scores: the sparse ones over rounds with a
    ``gt_index`` (None: none, as in VisDial test), NDCG over rounds with a ``relevance`` (None:
    no dense annotation). Keys: r@1, r@5, r@10, mean_rank, mrr, num_rounds (rounds with
    gt_index), ndcg, num_dense_rounds; a metric without any such round is left out."""
    ranks = scores_to_ranks(scores)
    if len(gt_index) != ranks.shape[0] or len(relevance) != ranks.shape[0]:
        raise ValueError(f"gt_index ({len(gt_index)}) and relevance ({len(relevance)}) need one entry per round "
                         f"of scores ({ranks.shape[0]})")
    metrics: Dict[str, float] = {}
    sparse = [i for i, g in enumerate(gt_index) if g is not None]
    if sparse:
        sparse_ranks, targets = ranks[sparse], torch.tensor([gt_index[i] for i in sparse])
        metrics.update({f"r@{k}": recall_at(sparse_ranks, targets, k) for k in RECALL_AT})
        metrics["mean_rank"] = mean_rank(sparse_ranks, targets)
        metrics["mrr"] = mean_reciprocal_rank(sparse_ranks, targets)
        metrics["num_rounds"] = len(sparse)
    dense = [i for i, r in enumerate(relevance) if r is not None]
    if dense:
        dense_relevance = torch.stack([torch.as_tensor(relevance[i], dtype=torch.float) for i in dense])
        metrics["ndcg"] = ndcg(ranks[dense], dense_relevance.to(ranks.device))
        metrics["num_dense_rounds"] = len(dense)
    return metrics
