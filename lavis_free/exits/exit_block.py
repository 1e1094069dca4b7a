"""The exits themselves.

`ExitBlock` is FREE's exit: one extra decoder layer of the LM's own type (causal, with its own
KV cache at inference) whose output goes through the LM's frozen final norm and head, so an exit
adds one layer of parameters and no vocabulary projection. `VanillaExit` is the baseline the
paper compares against: a trainable norm + vocabulary projection of its own, reading the layer's
hidden state directly (no attention, no cache).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from lavis_free.exits.adapters.base import DecoderAdapter, EncoderContext, KVStore, no_cache
from lavis_free.exits.config import ExitConfig


class ExitBlock(nn.Module):
    uses_cache = True
    reads_lm_head = True  # its logits are the LM's frozen head on its features (the decoder may batch that call)

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def features(
        self,
        adapter: DecoderAdapter,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_store: KVStore = no_cache,
        encoder: Optional[EncoderContext] = None,
    ) -> torch.Tensor:
        """Final-normed exit features: what the frozen head and the discriminator read. An exit
        layer is a layer of the LM's own type, so it cross-attends to `encoder` like the others."""
        return adapter.final_norm(adapter.forward_layer(self.layer, hidden, positions, attn_mask, kv_store, encoder))

    def logits(self, adapter: DecoderAdapter, features: torch.Tensor) -> torch.Tensor:
        return adapter.head(features)


class VanillaExit(nn.Module):
    """Independent classifier per exit; its projection starts as a copy of the LM head."""

    uses_cache = False
    reads_lm_head = False  # a trained projection of its own

    def __init__(self, adapter: DecoderAdapter):
        super().__init__()
        self.norm = copy.deepcopy(adapter.final_norm_module())
        self.head = nn.Sequential(*[copy.deepcopy(m) for m in adapter.head_modules()])
        for param in self.parameters():
            param.requires_grad_(True)

    def features(self, adapter, hidden, positions, attn_mask, kv_store=no_cache, encoder=None) -> torch.Tensor:
        return self.norm(hidden)

    def logits(self, adapter: DecoderAdapter, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def build_exit(adapter: DecoderAdapter, config: ExitConfig, exit_layer: int) -> nn.Module:
    """One exit after decoder layer `exit_layer`, initialised as `config.init` says."""
    if config.layout == "vanilla":
        return VanillaExit(adapter)
    if config.init == "random":
        layer = adapter.new_layer()
    else:
        source = adapter.num_layers - 1 if config.init == "last" else exit_layer + 1
        layer = copy.deepcopy(adapter.layers[source])
    for param in layer.parameters():
        param.requires_grad_(True)
    return ExitBlock(layer)
