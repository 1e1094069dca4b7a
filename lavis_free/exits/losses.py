"""Losses of exit training.

Token losses make an exit predict each position's target (cross-entropy on aligned labels, see
`lm_batch`) or the final layer's distribution (KL, for unlabeled data). The adversarial pair is the non-saturating GAN
loss over per-token features: the discriminator labels final-layer features 1 and exit features
0; the generator (exit) is rewarded when its features are labelled 1.
All losses average over the positions selected by `mask` ([B, T] bool, True = a position whose
target is trained).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lavis_free.exits.lm_batch import IGNORE_INDEX


def scored_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose aligned target labels[:, t] is a real token (LAVIS marks ignored ones -100)."""
    return labels != IGNORE_INDEX


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[mask].float(), labels[mask])


def distill_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || exit) at temperature T, scaled by T^2 so gradients keep their size."""
    student = F.log_softmax(logits[mask].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    real = F.binary_cross_entropy_with_logits(real_logits[mask], torch.ones_like(real_logits[mask]))
    fake = F.binary_cross_entropy_with_logits(fake_logits[mask], torch.zeros_like(fake_logits[mask]))
    return real + fake


def generator_adversarial_loss(fake_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(fake_logits[mask], torch.ones_like(fake_logits[mask]))
