"""Adapter for LLaMA decoders: Hugging Face's `LlamaForCausalLM` (transformers >= 4.28; the
second stack's 4.33.2), the LM of LAVIS main's Vicuna models (InstructBLIP `vicuna7b/13b`).

What differs from OPT, each handled here with the LM's own modules and functions:

- Pre-norm blocks with RMS norms: a layer's attention reads `input_layernorm(h)`, its MLP
  `post_attention_layernorm(h)`; the final norm is `model.norm`, the head `lm_head` (no project_out).
- No position table: positions enter as rotary embeddings applied to queries and keys inside
  attention, at the given `positions` (the LM's own `rotary_emb` module and transformers'
  `apply_rotary_pos_emb`). Positions, not columns: with LAVIS main's Vicuna layout
  [image queries | left padding | prompt], `positions = cumsum(mask) - 1` (what HF's
  `prepare_inputs_for_generation` computes) and columns disagree by the pads between the queries
  and the prompt. Padding columns (position -1) are rotated as position 0; nothing attends to them.
- The cache stores keys already rotated (as HF's `past_key_values` does), so `kv_projection`
  (state propagation) rotates them at the given positions too.
- Grouped-query attention: `num_kv_heads = num_key_value_heads` (< `num_heads` for LLaMA-2 70B
  and other GQA models). The cache stores the un-repeated K/V heads; they are repeated
  (transformers' `repeat_kv`) only for the attention math.
- Scores scaled by 1/sqrt(head_dim); softmax over the masked scores (SDPA, boolean mask).
- `pretraining_tp > 1` splits HF's projections into slices whose results are concatenated: the
  same products, computed here as one linear each (the MLP runs as the layer's own `mlp` module).
- Dropout: LLaMA (4.33) has none; an `attention_dropout` attribute, where a transformers
  version defines one, is applied to the attention weights of layers in training mode only.
- Dynamic-NTK rotary scaling is refused: its tables depend on each call's sequence length.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama import modeling_llama

from lavis_free.exits.adapters.base import DecoderAdapter, EncoderContext, KVStore

apply_rotary_pos_emb = modeling_llama.apply_rotary_pos_emb
# transformers' own K/V head repetition (4.31 on, with grouped-query attention); before 4.31
# LLaMA has no key/value heads of its own (num_kv_heads == num_heads) and nothing is repeated.
repeat_kv = getattr(modeling_llama, "repeat_kv", None)


class LlamaAdapter(DecoderAdapter):
    """LLaMA layer math (RMSNorm pre-norm, rotary positions, GQA, SwiGLU MLP) over windows of columns."""

    def __init__(self, lm: nn.Module):
        super().__init__(lm)
        self.model = lm.model
        self.config = lm.config
        scaling = getattr(self.config, "rope_scaling", None)
        if scaling and scaling.get("type") == "dynamic":
            raise NotImplementedError(
                "LLaMA early exits do not support rope_scaling type 'dynamic' (its rotary tables depend on "
                "each call's sequence length); use no rope_scaling or type 'linear'"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def embed(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """LLaMA adds nothing to its input embeddings (positions are rotary, in attention); a
        position beyond the rotary tables is refused here, once per call rather than per layer."""
        rotary = self.layers[0].self_attn.rotary_emb
        if positions.numel() and int(positions.max()) >= rotary.max_seq_len_cached:
            raise ValueError(
                f"position {int(positions.max())} is beyond the LLaMA's {rotary.max_seq_len_cached} rotary positions "
                f"(max_position_embeddings={self.config.max_position_embeddings}): shorten the prompt or max_length"
            )
        return inputs_embeds

    # -- attention ------------------------------------------------------------------------------
    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _rotate(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor):
        """(query, key) [B, H, Q, Dh] rotated at `positions` [B, Q] by the layer's own rotary
        module (its whole table: no recomputation, and no device sync for the length)."""
        rotary = attn.rotary_emb
        cos, sin = rotary(key, seq_len=rotary.max_seq_len_cached)
        return apply_rotary_pos_emb(query, key, cos, sin, positions.clamp(min=0))

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.num_heads // self.num_kv_heads
        return x if groups == 1 else repeat_kv(x, groups)

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
            raise ValueError("LLaMA is decoder-only: its layers take no encoder context")
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        query = self._split_heads(attn.q_proj(x), self.num_heads)
        key = self._split_heads(attn.k_proj(x), self.num_kv_heads)
        value = self._split_heads(attn.v_proj(x), self.num_kv_heads)
        query, key = self._rotate(attn, query, key, positions)
        keys, values = kv_store(key, value)  # un-repeated K/V heads, keys rotated: what the cache holds
        dropout = getattr(attn, "attention_dropout", 0.0) if attn.training else 0.0
        context = F.scaled_dot_product_attention(
            query, self._repeat(keys), self._repeat(values), attn_mask=attn_mask, dropout_p=dropout,
            scale=self.head_dim ** -0.5,
        )
        context = context.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        hidden = hidden + attn.o_proj(context)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def kv_projection(
        self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated at `positions`, as the cache stores them) and values `layer` computes
        from its input `hidden`, num_kv_heads heads."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        key = self._split_heads(attn.k_proj(x), self.num_kv_heads)
        _, key = self._rotate(attn, key, key, positions)
        return key, self._split_heads(attn.v_proj(x), self.num_kv_heads)

    # -- norm, head, new layers -----------------------------------------------------------------
    def final_norm_module(self) -> nn.Module:
        return self.model.norm

    def head_modules(self) -> List[nn.Module]:
        return [self.lm.lm_head]

    def new_layer(self) -> nn.Module:
        """A fresh decoder layer of the LM's own class, dtype and device."""
        reference = self.layers[0]
        cls = type(reference)
        if "layer_idx" in inspect.signature(cls.__init__).parameters:  # transformers >= 4.36
            layer = cls(self.config, layer_idx=self.num_layers)
        else:
            layer = cls(self.config)
        weight = reference.self_attn.q_proj.weight
        return layer.to(device=weight.device, dtype=weight.dtype)
