"""Adapter for OPT decoders: LAVIS's `modeling_opt` (with query embeddings) and HF's `OPTForCausalLM`."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lavis_free.exits.adapters.base import DecoderAdapter, EncoderContext, KVStore


class OPTAdapter(DecoderAdapter):
    """OPT layer math (pre- or post-LN, learned positions offset by 2, optional project_in/out),
    with OPT's dropout where OPT applies it (so only layers in training mode, the exits, drop)."""

    def __init__(self, lm: nn.Module):
        super().__init__(lm)
        self.decoder = lm.model.decoder
        self.config = lm.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def embed(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.decoder.project_in is not None:
            inputs_embeds = self.decoder.project_in(inputs_embeds)
        table = self.decoder.embed_positions
        return inputs_embeds + F.embedding(positions + table.offset, table.weight)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _attn_input(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden

    def forward_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_store: KVStore,
        encoder: Optional[EncoderContext] = None,
    ) -> torch.Tensor:
        if encoder is not None:
            raise ValueError("OPT is decoder-only: its layers take no encoder context")
        attn = layer.self_attn
        x = self._attn_input(layer, hidden)
        query = self._split_heads(attn.q_proj(x) * attn.scaling)
        keys, values = kv_store(self._split_heads(attn.k_proj(x)), self._split_heads(attn.v_proj(x)))
        attn_dropout = attn.dropout if attn.training else 0.0
        context = F.scaled_dot_product_attention(query, keys, values, attn_mask=attn_mask, dropout_p=attn_dropout, scale=1.0)
        context = context.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        hidden = hidden + F.dropout(attn.out_proj(context), p=layer.dropout, training=layer.training)
        if not layer.do_layer_norm_before:
            hidden = layer.self_attn_layer_norm(hidden)
        x = layer.final_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        hidden = hidden + F.dropout(layer.fc2(layer.activation_fn(layer.fc1(x))), p=layer.dropout, training=layer.training)
        if not layer.do_layer_norm_before:
            hidden = layer.final_layer_norm(hidden)
        return hidden

    def kv_projection(
        self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self._attn_input(layer, hidden)
        return self._split_heads(layer.self_attn.k_proj(x)), self._split_heads(layer.self_attn.v_proj(x))

    def final_norm_module(self) -> nn.Module:
        norm = self.decoder.final_layer_norm
        return norm if norm is not None else nn.Identity()

    def head_modules(self) -> List[nn.Module]:
        project_out = self.decoder.project_out
        return ([project_out] if project_out is not None else []) + [self.lm.lm_head]

    def new_layer(self) -> nn.Module:
        reference = self.layers[0]
        layer = type(reference)(self.config)
        return layer.to(device=reference.fc1.weight.device, dtype=reference.fc1.weight.dtype)
