"""What the exits core needs from an LM's decoder, and nothing more.

An adapter exposes one decoder layer as a function of (hidden window, positions, mask, KV store,
encoder context), so the same code runs a layer at training time (whole sequence, no cache), at
prefill, and during early-exit decoding (a window of pending columns against a preallocated
cache). Decoder-only LMs (OPT) get no encoder context; encoder-decoder LMs (T5) cross-attend to
the `EncoderContext` the host computed once. Adding an LM family to lavis-free means writing one
adapter (see README, "Adding an LM family").
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from lavis_free.exits.attention import full_sequence_mask

KVStore = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


Rows = Union[slice, torch.Tensor]
CrossProjection = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EncoderContext:
    """The encoder output a decoder layer cross-attends to, for the rows being run.

    Why one object: the engine runs layers on subsets of the batch (rows that have not exited),
    so the encoder states and mask must follow the same row selection; and cross-attention
    keys/values depend only on the encoder output, so during decoding each layer computes them
    once (`memoized`). Training never memoizes: exit layers' projections change every step."""

    states: torch.Tensor  # [B, S, D] encoder output (full batch)
    mask: torch.Tensor  # [B, S], 1 = real encoder position
    rows: Optional[Rows] = None  # None = every row
    memo: Optional[Dict[nn.Module, Tuple[torch.Tensor, torch.Tensor]]] = field(default=None, repr=False)

    def memoized(self) -> "EncoderContext":
        """A copy that computes each layer's cross-attention keys/values once (decoding)."""
        return replace(self, memo={})

    def select(self, rows: Rows) -> "EncoderContext":
        """The context of a subset of the batch (`rows` index the full batch), sharing the memo."""
        if self.rows is not None:
            raise ValueError("select rows from the whole batch's EncoderContext, not from a selection of it")
        return replace(self, rows=rows)

    def repeat_rows(self, copies: int) -> "EncoderContext":
        """Each row as `copies` consecutive rows (memoized keys/values too), as the decode cache
        repeats them."""
        if self.rows is not None:
            raise ValueError("repeat the whole batch's EncoderContext, not a selection of it")
        memo = None if self.memo is None else {
            layer: tuple(t.repeat_interleave(copies, dim=0) for t in kv) for layer, kv in self.memo.items()}
        return replace(self, states=self.states.repeat_interleave(copies, dim=0),
                       mask=self.mask.repeat_interleave(copies, dim=0), memo=memo)

    def cross_kv(self, layer: nn.Module, project: CrossProjection) -> Tuple[torch.Tensor, torch.Tensor]:
        """`project(encoder states)` for `layer`, for the selected rows."""
        rows = slice(None) if self.rows is None else self.rows
        if self.memo is None:
            return project(self.states[rows])
        if layer not in self.memo:
            self.memo[layer] = project(self.states)
        keys, values = self.memo[layer]
        return keys[rows], values[rows]

    def key_mask(self) -> torch.Tensor:
        """[b, 1, 1, S] bool: which encoder positions the selected rows attend to."""
        rows = slice(None) if self.rows is None else self.rows
        return self.mask[rows].bool()[:, None, None, :]


def no_cache(keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """KV store for a whole-sequence pass: attend to exactly the keys just computed."""
    return keys, values


class DecoderAdapter(ABC):
    """Uniform access to an LM decoder's embedding, layers, final norm and head."""

    is_encoder_decoder = False

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
    def num_kv_heads(self) -> int:
        """Key/value heads per layer (what the decode cache stores); fewer than `num_heads`
        under grouped-query attention."""
        return self.num_heads

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
        encoder: Optional[EncoderContext] = None,
    ) -> torch.Tensor:
        """Runs `layer` on hidden [B, Q, D] at `positions` [B, Q]; `kv_store` receives the new
        self-attention keys/values [B, H_kv, Q, Dh] and returns the keys/values to attend over:
        keys at columns 0..K-1, the Q queries being the last Q of those columns (a window always
        ends at the newest column). `encoder` is what encoder-decoder layers cross-attend to.
        Dropout is the LM's own, where the LM applies it: only layers in training mode (exits
        while they train; the frozen backbone stays in eval mode) drop anything."""

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
            features = _few_rows_linear(module, features) if _is_few_rows_vocab_projection(module, features) else module(features)
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

    def hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder: Optional[EncoderContext] = None,
    ) -> List[torch.Tensor]:
        """Teacher-forced pass over whole sequences; returns every decoder layer's output
        (pre final norm), so exits can read layer k's output and the final features."""
        positions = self.positions_from_mask(attention_mask)
        mask = full_sequence_mask(attention_mask)
        hidden = self.embed(inputs_embeds, positions)
        outputs = []
        for layer in self.layers:
            hidden = self.forward_layer(layer, hidden, positions, mask, no_cache, encoder)
            outputs.append(hidden)
        return outputs


def _is_few_rows_vocab_projection(module: nn.Module, features: torch.Tensor) -> bool:
    """A vocabulary-sized projection of 2 or 3 rows on CPU, in inference. Exit checks on the rows
    still going create such calls, and there MKL's `x @ W.T` is up to 3.4x slower than `W @ x.T`
    (OPT-350m's 50272 x 512 head: 12.5 / 18.4 ms at 2 / 3 rows against 3.8 / 5.4 ms; 1.4-1.7x
    for 2560- and 4096-wide heads; from 4 rows on `x @ W.T` is as fast or faster). The two orders
    round differently in the last bits, so where two tokens tie to float precision the argmax
    may differ from Hugging Face's `generate` (no tiny test model has a vocabulary this large)."""
    return (isinstance(module, nn.Linear) and features.device.type == "cpu" and not torch.is_grad_enabled()
            and module.out_features >= 8192 and 2 <= features.numel() // features.shape[-1] <= 3)


def _few_rows_linear(module: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    rows = features.reshape(-1, features.shape[-1]).T
    out = torch.mm(module.weight, rows) if module.bias is None else torch.addmm(module.bias[:, None], module.weight, rows)
    return out.T.reshape(*features.shape[:-1], module.out_features)
