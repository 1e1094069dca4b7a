"""What the exits core needs from a decoder LM, and nothing more.

An adapter exposes one decoder layer as a function of (hidden window, positions, mask, KV store),
so the same code runs a layer at training time (whole sequence, no cache), at prefill, and
during early-exit decoding (a window of pending columns against a preallocated cache). Adding
an LM to lavis-free means writing one adapter.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, List, Tuple

import torch
from torch import nn

from lavis_free.exits.attention import full_sequence_mask

KVStore = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def no_cache(keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """KV store for a whole-sequence pass: attend to exactly the keys just computed."""
    return keys, values


class DecoderAdapter(ABC):
    """Uniform access to a decoder-only LM's embedding, layers, final norm and head."""

    def __init__(self, lm: nn.Module):
        self.lm = lm

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList: ...

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abstractmethod
    def num_heads(self) -> int: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, before position information (what BLIP-2 concatenates queries to)."""

    @abstractmethod
    def embed(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first decoder layer's input for these embeddings at these positions."""

    @staticmethod
    def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """0-based position of each column among its row's non-padding columns (-1 for padding)."""
        mask = attention_mask.long()
        return torch.cumsum(mask, dim=1) * mask - 1

    @abstractmethod
    def forward_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_store: KVStore,
    ) -> torch.Tensor:
        """Runs `layer` on hidden [B, Q, D]; `kv_store` receives the new keys/values
        [B, H, Q, Dh] and returns the keys/values to attend over."""

    @abstractmethod
    def kv_projection(
        self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys/values `layer` would compute from input `hidden` (state propagation)."""

    @abstractmethod
    def final_norm_module(self) -> nn.Module:
        """The LM's final norm (nn.Identity when it has none)."""

    @abstractmethod
    def head_modules(self) -> List[nn.Module]:
        """Modules that map final-normed features to vocabulary logits, in order."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's final norm: its output is what the head reads (our exit 'features')."""
        return self.final_norm_module()(hidden)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from final-normed features."""
        for module in self.head_modules():
            features = module(features)
        return features

    @abstractmethod
    def new_layer(self) -> nn.Module:
        """A freshly initialised decoder layer of the LM's own type."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(hidden))

    def head_cost_in_layers(self) -> float:
        """Cost of one head application in units of one decoder layer (by parameter count,
        which is proportional to FLOPs per token)."""
        head_params = sum(p.numel() for m in self.head_modules() for p in m.parameters())
        layer_params = sum(p.numel() for p in self.layers[0].parameters())
        return head_params / layer_params

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> List[torch.Tensor]:
        """Teacher-forced pass over whole sequences; returns every decoder layer's output
        (pre final norm), so exits can read layer k's output and the final features."""
        positions = self.positions_from_mask(attention_mask)
        mask = full_sequence_mask(attention_mask)
        hidden = self.embed(inputs_embeds, positions)
        outputs = []
        for layer in self.layers:
            hidden = self.forward_layer(layer, hidden, positions, mask, no_cache)
            outputs.append(hidden)
        return outputs
