"""The decode cache, and THE place where keys/values of skipped layers are filled.

One generate call owns one `DecodeCache`: preallocated keys/values for every backbone layer and
every exit transformer ("slots"), the latest hidden state of every column still in flight, and
per row and slot how many leading columns hold their keys/values (`filled`).

A token that exits after layer e leaves the deeper slots unfilled at its column. Two policies
fill them (chosen per call):

- `recompute` (exact): nothing happens at exit time. The next token of that row that reaches a
  slot runs it over the whole window of unfilled columns [filled, current] (`window`), so every
  deep entry equals what a full-depth pass over the same prefix holds. Columns still pending
  when decoding stops are filled only if someone calls `EarlyExitDecoder.flush` (generate does
  not: no later token will read them).
- `propagate` (approximate, CALM-style): the exited hidden state (the output of layer e, which
  is exactly layer e+1's input) is projected into the keys/values of every skipped slot
  (`project_pending`). Exact for layer e+1, approximate deeper. The projection is lazy: it runs
  when the slot next runs for that row, just before the slot's own call, over all of the row's
  pending columns at once; then the projection's weights are the ones that call loads anyway
  (measured on OPT-350m dimensions, CPU: 0.03 ms extra at batch 8 against 0.65 ms done at exit
  time), and tokens that leave early several times in a row cost one projection, not several.
  Until then the exited state waits in `states` (no deeper layer runs on its column). `flush`
  projects what is still pending when decoding stops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from lavis_free.exits.adapters.base import KVStore

Rows = Union[slice, torch.Tensor]


@dataclass
class Window:
    """Columns [first, last] of `rows` that a slot must run; `valid` is None when every row
    needs every column, else [rows, columns] bool (False = already filled for that row)."""

    rows: Rows
    row_ids: np.ndarray
    first: int
    last: int
    valid: Optional[torch.Tensor]


class DecodeCache:
    def __init__(
        self,
        num_slots: int,
        batch: int,
        max_cols: int,
        num_heads: int,
        head_dim: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_slots, batch, num_heads, max_cols, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.states = torch.zeros(batch, max_cols, hidden_size, dtype=dtype, device=device)
        self.positions = torch.zeros(batch, max_cols, dtype=torch.long, device=device)
        self.key_valid: Optional[torch.Tensor] = None
        self.filled = np.zeros((batch, num_slots), dtype=np.int64)
        self.batch = batch
        self.policy = "recompute"  # how pending columns are filled (the decode's kv_policy)

    def repeat_rows(self, copies: int) -> None:
        """Each row becomes `copies` consecutive rows with the same contents (candidates that
        share one prefix, prefilled once)."""
        self.keys = self.keys.repeat_interleave(copies, dim=1)
        self.values = self.values.repeat_interleave(copies, dim=1)
        self.states = self.states.repeat_interleave(copies, dim=0)
        self.positions = self.positions.repeat_interleave(copies, dim=0)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.repeat_interleave(copies, dim=0)
        self.filled = np.repeat(self.filled, copies, axis=0)
        self.batch *= copies

    def reorder_rows(self, order: torch.Tensor) -> None:
        """Row i becomes what row `order[i]` was (beam search keeping some beams, copying
        others), with its filled counts and states, so pending columns (`recompute`'s windows,
        `propagate`'s unprojected exited states) move with their row."""
        if torch.equal(order, torch.arange(len(order), device=order.device)):
            return  # every beam kept its own row: nothing to copy
        self.keys = self.keys.index_select(1, order)
        self.values = self.values.index_select(1, order)
        self.states = self.states.index_select(0, order)
        self.positions = self.positions.index_select(0, order)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, order)
        self.filled = self.filled[order.cpu().numpy()]

    def set_padding(self, prefix_mask: torch.Tensor) -> None:
        """Padding columns of the prefix are never attended to (None = no padding anywhere)."""
        if bool(prefix_mask.all()):
            return
        self.key_valid = torch.ones(self.states.shape[:2], dtype=torch.bool, device=self.states.device)
        self.key_valid[:, : prefix_mask.shape[1]] = prefix_mask.bool()

    def window(self, slot: int, row_ids: np.ndarray, last: int) -> Optional[Window]:
        """The unfilled columns up to `last` of `slot` for these rows; None if all are filled."""
        filled = self.filled[row_ids, slot]
        first = int(filled.min())
        if first > last:
            return None
        rows = self.rows(row_ids)
        valid = None
        if (filled != first).any():
            cols = np.arange(first, last + 1)
            valid = torch.as_tensor(cols[None, :] >= filled[:, None], device=self.keys.device)
        return Window(rows, row_ids, first, last, valid)

    def rows(self, row_ids: np.ndarray) -> Rows:
        """An index for these rows: a plain slice when they are all rows (no gather, no copy)."""
        return slice(None) if len(row_ids) == self.batch else torch.as_tensor(row_ids, device=self.keys.device)

    def kv_store(self, slot: int, win: Window) -> KVStore:
        """Writes the window's new keys/values (only where needed) and returns the slot's cache
        up to the window's last column, for the layer to attend over."""

        def store(keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            self.write_kv(slot, win, keys, values)
            upto = slice(0, win.last + 1)
            return self.keys[slot, win.rows, :, upto], self.values[slot, win.rows, :, upto]

        return store

    def write_kv(self, slot: int, win: Window, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The window's keys/values [rows, heads, columns, head_dim], where `win.valid` allows."""
        span = slice(win.first, win.last + 1)
        for cache, new in ((self.keys, keys), (self.values, values)):
            if win.valid is not None:
                new = torch.where(win.valid[:, None, :, None], new, cache[slot, win.rows, :, span])
            cache[slot, win.rows, :, span] = new

    def commit(self, slot: int, win: Window) -> None:
        self.filled[win.row_ids, slot] = win.last + 1

    def read_states(self, win: Window) -> torch.Tensor:
        return self.states[win.rows, win.first : win.last + 1]

    def write_states(self, win: Window, hidden: torch.Tensor) -> None:
        span = slice(win.first, win.last + 1)
        if win.valid is not None:
            hidden = torch.where(win.valid[..., None], hidden, self.states[win.rows, span])
        self.states[win.rows, span] = hidden

    def project_pending(
        self,
        slot: int,
        row_ids: np.ndarray,
        last: int,
        project: Callable[[int, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """`propagate` policy: fills these rows' pending columns of `slot` before column `last`
        from their exited states; `project(slot, hidden, positions)` gives that slot's
        keys/values. Rows with different pending runs share one call (masked writes)."""
        pending = row_ids[self.filled[row_ids, slot] < last]
        if len(pending) == 0:
            return
        win = self.window(slot, pending, last - 1)
        keys, values = project(slot, self.read_states(win), self.positions[win.rows, win.first : last])
        self.write_kv(slot, win, keys, values)
        self.commit(slot, win)
