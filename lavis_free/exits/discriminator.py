"""FREE's feature classifier: tells an exit's features from the final layer's, token by token.

It is the discriminator of the adversarial game; the exit transformer (the generator) learns to
make its features indistinguishable from the final layer's. Used in training only.
"""
from __future__ import annotations

import torch
from torch import nn


class FeatureClassifier(nn.Module):
    def __init__(self, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logit that each token's features come from the final layer: [..., D] -> [...]."""
        return self.net(features).squeeze(-1)
