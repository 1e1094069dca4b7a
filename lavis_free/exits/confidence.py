"""Confidence at an exit, each in [0, 1] (higher = surer).

CALM compares these signals; the FREE paper uses max softmax probability. The softmax ones map
an exit's logits [batch, vocab] to a confidence [batch], so every check pays the full-vocabulary
head, whether or not the token leaves. `ConfidenceHead` (`confidence: learned`) reads the exit's
features instead: a check that does not fire costs the exit transformer and a d x 64 projection,
and only a token that leaves pays the head, once (fitted by `lavis_free.evaluation.fit_confidence`).
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import nn

from lavis_free.exits.options import LEARNED, SOFTMAX_CONFIDENCES, ExitConfigError

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
assert tuple(_CONFIDENCE_FNS) == SOFTMAX_CONFIDENCES


def get_confidence(name: str) -> ConfidenceFn:
    """The softmax confidence `name` (the learned one is not a function of logits)."""
    if name not in _CONFIDENCE_FNS:
        learned = f"; {LEARNED!r} reads features, not logits" if name == LEARNED else ""
        raise ExitConfigError(f"confidence={name!r} is invalid here: allowed values are {', '.join(SOFTMAX_CONFIDENCES)}{learned}")
    return _CONFIDENCE_FNS[name]


class ConfidenceHead(nn.Module):
    """The learned exit check (CALM's classifier-style confidence): the probability that this
    exit's token equals the final layer's, from the exit's final-normed features [..., d].
    Fitted on frozen exits, with labels from the frozen final head (no captions needed)."""

    def __init__(self, hidden_size: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))

    def agreement_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of P(exit token == final token), [...]: what fitting's BCE reads."""
        return self.net(features.to(self.net[0].weight.dtype)).squeeze(-1).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.agreement_logits(features))
