"""Attention masks for running decoder layers on a window of query columns.

All masks are boolean (True = may attend) of shape [batch, 1, queries, keys], the layout
`torch.nn.functional.scaled_dot_product_attention` broadcasts over heads. A query may always
see itself, so rows that are pure padding stay finite (a fully masked row would give NaN, and
NaN values in the cache poison every later query even where masked).
"""
from __future__ import annotations

from typing import Optional

import torch


def window_mask(key_valid: torch.Tensor, first_query_col: int) -> torch.Tensor:
    """Causal mask for queries at columns [first_query_col, K) over keys [0, K).

    key_valid: [batch, K] bool, False for padding columns.
    """
    num_keys = key_valid.shape[1]
    key_cols = torch.arange(num_keys, device=key_valid.device)
    query_cols = key_cols[first_query_col:, None]
    causal = key_cols[None, :] <= query_cols
    mask = causal[None] & key_valid[:, None, :]
    mask |= key_cols[None, None, :] == query_cols[None]
    return mask[:, None]


def full_sequence_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal + padding mask for teacher-forced training over a whole sequence."""
    return window_mask(attention_mask.bool(), 0)


def decode_mask(key_valid: Optional[torch.Tensor], first_query_col: int, last_col: int) -> Optional[torch.Tensor]:
    """Mask for a decode window ending at `last_col`; None when no mask is needed (one query, no padding)."""
    if key_valid is None and first_query_col == last_col:
        return None
    if key_valid is None:
        raise ValueError("key_valid is required for a window of several queries")
    return window_mask(key_valid[:, : last_col + 1], first_query_col)
