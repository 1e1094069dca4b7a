"""Confidence of an exit's next-token distribution, each in [0, 1] (higher = surer).

CALM compares these signals; the FREE paper uses max softmax probability. Each one maps
logits of shape [batch, vocab] to a confidence of shape [batch].
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

from lavis_free.exits.options import CONFIDENCES, ExitConfigError

ConfidenceFn = Callable[[torch.Tensor], torch.Tensor]


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Probability of the argmax token."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability: small when two tokens compete."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """One minus the entropy normalised by log(vocab): 1 for a one-hot distribution.

    `xlogy` makes 0 * log 0 = 0, so tokens masked to -inf (EOS while `min_length` holds) do not
    turn the confidence into NaN; the clamp keeps float rounding of a uniform distribution's
    entropy from leaving [0, 1] (a row at threshold 0 must always be able to leave)."""
    p = torch.softmax(logits.float(), dim=-1)
    ent = -torch.special.xlogy(p, p).sum(dim=-1)
    return (1.0 - ent / math.log(logits.shape[-1])).clamp(0.0, 1.0)


_CONFIDENCE_FNS: Dict[str, ConfidenceFn] = {"max_prob": max_prob, "margin": margin, "entropy": entropy}
assert tuple(_CONFIDENCE_FNS) == CONFIDENCES


def get_confidence(name: str) -> ConfidenceFn:
    if name not in _CONFIDENCE_FNS:
        raise ExitConfigError(f"confidence={name!r} is invalid: allowed values are {', '.join(CONFIDENCES)}")
    return _CONFIDENCE_FNS[name]
