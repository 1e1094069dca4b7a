"""Adapter for T5 decoders: LAVIS's `modeling_t5` (BLIP-2 FlanT5) and HF's `T5ForConditionalGeneration`.

Exits sit on the *decoder* blocks (`lm.decoder.block`); the host runs the encoder once and
hands its output over as an `EncoderContext`. What differs from a decoder-only LM, each handled
here:

- Relative position bias. Only decoder block 0 owns `relative_attention_bias`; in T5's own
  forward it computes the bias once and passes it to every block. Here every layer that runs
  (backbone blocks, copied exit blocks, fresh `new_layer()` blocks, none of which own a table)
  gets the bias computed from block 0's table with T5's own bucket function (causal buckets).
  Relative positions are taken between columns, as T5's forward does: the queries of a call
  are the last Q of its K key columns (the kv_store contract: keys at columns 0..K-1, the
  window ending at the last one). Under left padding of the decoder this matches T5's forward
  and is padding-invariant (distances between real tokens do not depend on the pads);
  `positions` would not be (see `_self_attention_bias`).
- No 1/sqrt(d) scaling in attention; inner width `num_heads * d_kv`; softmax in float32 (as T5).
- Cross-attention keys/values depend only on the encoder output: they come from
  `EncoderContext.cross_kv`, so decoding computes them once per layer (exit layers too).
- Pre-norm blocks with RMS norms; the decoder's final norm is `final_layer_norm`, and the head
  is `lm_head`, preceded by `d_model ** -0.5` only when the embeddings are tied (a default
  T5Config; FlanT5 is untied), as the `_TiedHeadRescale` module of `head_modules()`.
- Dropout is applied where T5's own modules apply it (only layers in training mode have any:
  exit layers while they train; the frozen backbone stays in eval mode).
- float16 is refused (T5 overflows in fp16; LAVIS keeps it in bf16, on CPU in fp32).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lavis_free.exits.adapters.base import DecoderAdapter, EncoderContext, KVStore


class _TiedHeadRescale(nn.Module):
    """T5's `sequence_output * d_model ** -0.5` before a head tied to the input embeddings."""

    def __init__(self, d_model: int):
        super().__init__()
        self.scale = d_model ** -0.5

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _refuse_fp16(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        raise TypeError(
            "T5 early exits do not run in float16 (T5's activations overflow in fp16); "
            "use bfloat16 on GPU (what LAVIS's Blip2T5 uses) or float32"
        )


class T5Adapter(DecoderAdapter):
    """T5 decoder block math over windows of query columns, with cross-attention to the encoder."""

    is_encoder_decoder = True

    def __init__(self, lm: nn.Module):
        super().__init__(lm)
        self.decoder = lm.decoder
        self.config = self.decoder.config  # the decoder stack's config (is_decoder=True)
        _refuse_fp16(self.decoder.final_layer_norm.weight.dtype)
        self._bias_attention = self.layers[0].layer[0].SelfAttention
        if not self._bias_attention.has_relative_attention_bias:
            raise ValueError("T5 decoder block 0 has no relative_attention_bias table")
        # every layer of one call shape gets the same bias: computed once per (queries, keys)
        # while the table is frozen (an adapter lives for one decode or one training batch)
        self._bias_memo: dict = {}

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.block

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def head_dim(self) -> int:
        return self.config.d_kv

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def embed(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """T5 adds no position information to its inputs (positions enter as attention bias)."""
        return inputs_embeds

    # -- attention ------------------------------------------------------------------------------
    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _self_attention_bias(self, num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
        """[1, H, Q, K] relative position bias from block 0's table for queries at the last Q of
        K columns. Columns, not `positions`: T5's forward takes relative positions between
        columns (pads included), and with left padding `positions` of the queries (counted
        from the row's first real token) and columns of the keys would disagree by the pads."""
        attn = self._bias_attention
        memo_key = (num_queries, num_keys, device)
        frozen = not attn.relative_attention_bias.weight.requires_grad
        if frozen and memo_key in self._bias_memo:
            return self._bias_memo[memo_key]
        key_cols = torch.arange(num_keys, device=device)
        query_cols = key_cols[num_keys - num_queries :]
        buckets = attn._relative_position_bucket(
            key_cols[None, :] - query_cols[:, None],
            bidirectional=False,
            num_buckets=attn.relative_attention_num_buckets,
            max_distance=attn.relative_attention_max_distance,
        )
        bias = attn.relative_attention_bias(buckets).permute(2, 0, 1)[None]
        if frozen:
            self._bias_memo[memo_key] = bias
        return bias

    @staticmethod
    def _attend(
        attn: nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """T5Attention's math: unscaled scores + bias, masked, softmax in float32, dropout."""
        scores = torch.matmul(query, keys.transpose(-1, -2))
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        weights = F.dropout(weights, p=attn.dropout, training=attn.training)
        context = torch.matmul(weights, values)
        batch, _, length, _ = context.shape
        return attn.o(context.transpose(1, 2).reshape(batch, length, -1))

    def forward_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_store: KVStore,
        encoder: Optional[EncoderContext] = None,
    ) -> torch.Tensor:
        if encoder is None:
            raise ValueError(
                "T5 decoder layers cross-attend to the encoder output: forward_layer needs an "
                "EncoderContext (the host runs the encoder and passes it in LMBatch.encoder)"
            )
        _refuse_fp16(hidden.dtype)
        self_block, cross_block, ff_block = layer.layer[0], layer.layer[1], layer.layer[-1]

        # self-attention over the cache (keys at columns 0..K-1), relative bias from block 0
        attn = self_block.SelfAttention
        x = self_block.layer_norm(hidden)
        keys, values = kv_store(self._split_heads(attn.k(x)), self._split_heads(attn.v(x)))
        bias = self._self_attention_bias(hidden.shape[1], keys.shape[2], hidden.device)
        context = self._attend(attn, self._split_heads(attn.q(x)), keys, values, bias, attn_mask)
        hidden = hidden + self_block.dropout(context)

        # cross-attention to the encoder output (its keys/values computed once per layer)
        cross = cross_block.EncDecAttention
        x = cross_block.layer_norm(hidden)
        enc_keys, enc_values = encoder.cross_kv(
            layer, lambda states: (self._split_heads(cross.k(states)), self._split_heads(cross.v(states)))
        )
        context = self._attend(cross, self._split_heads(cross.q(x)), enc_keys, enc_values, None, encoder.key_mask())
        hidden = hidden + cross_block.dropout(context)

        # feed-forward: T5LayerFF itself (norm, plain or gated dense, residual)
        return ff_block(hidden)

    def kv_projection(
        self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        self_block = layer.layer[0]
        x = self_block.layer_norm(hidden)
        attn = self_block.SelfAttention
        return self._split_heads(attn.k(x)), self._split_heads(attn.v(x))

    # -- norm, head, new layers -----------------------------------------------------------------
    def final_norm_module(self) -> nn.Module:
        return self.decoder.final_layer_norm

    def head_modules(self) -> List[nn.Module]:
        rescale = [_TiedHeadRescale(self.config.d_model)] if self.lm.config.tie_word_embeddings else []
        return rescale + [self.lm.lm_head]

    def new_layer(self) -> nn.Module:
        """A fresh decoder T5Block without a bias table of its own (it gets block 0's here)."""
        reference = self.layers[0]
        layer = type(reference)(self.config, has_relative_attention_bias=False)
        weight = reference.layer[0].SelfAttention.q.weight
        return layer.to(device=weight.device, dtype=weight.dtype)
