"""Early-exit greedy decoding that skips layers for real.

The prefix (image queries + prompt) runs at full depth, filling every backbone layer's and every
exit transformer's cache. Then, token by token, decoder layers run one at a time; after an exit
layer its exit transformer and the frozen head give logits, and `_decide_exits` (THE place where
the exit decision is made) lets rows whose confidence reaches the threshold emit their token and
stop. Keys/values those rows skipped are filled by the cache's policy (see kv_cache.py).

Batch semantics: every row decides for itself. A slot runs only on the rows still going at that
depth (the others are gathered out), so rows that exited do not pay for deeper layers; rows that
finished (EOS) stop computing once they are more than half the batch (before that, gathering the
others costs more than computing them; their tokens are padding either way). With `recompute`, a row's window also carries its pending columns; rows with shorter
windows are masked within the batched call.

With exits off (`early_exit=False`, options.py) the engine is plain full-depth greedy decoding and
gives the same tokens as Hugging Face `generate(num_beams=1)` on the same weights.

Scoring (`DecodeOptions.forced_tokens`): the same loop, but each row emits its given token
instead of the argmax, and records that token's log-probability under the logits it is emitted
from. The exit rule is unchanged, so a token's log-probability comes from the exit the decoding
rule would take for it at that point (its confidence is the rule's, whatever token is forced),
and layers it skips are skipped for real: ranking answer options costs what decoding them would.
Several candidates per prefix row (VisDial's 100 options) share one prefill: the cache is
repeated after it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from lavis_free.exits.adapters.base import DecoderAdapter, EncoderContext, Rows
from lavis_free.exits.attention import decode_mask
from lavis_free.exits.confidence import get_confidence
from lavis_free.exits.early_exits import EarlyExits
from lavis_free.exits.kv_cache import DecodeCache, Window
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.options import FULL_DEPTH, ExitOptions


@dataclass
class DecodeOptions:
    """One greedy decode: lengths and special ids (the host's), and the early-exit options."""

    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    min_length: int = 0  # Hugging Face semantics: counts the prefix's `prompt_length` + generated tokens
    exits: ExitOptions = FULL_DEPTH
    suppressed_ids: Tuple[int, ...] = ()  # never generated (e.g. Vicuna's added [PAD]), at every exit too
    # Scoring: [B * n, max_new_tokens] ids each row emits (EOS, then pad), n candidates per prefix
    # row, grouped by row (candidates of prefix row i are rows i*n .. i*n+n-1). None = decode.
    forced_tokens: Optional[torch.Tensor] = None

    def validate(self, num_layers: int) -> "DecodeOptions":
        self.exits.validate(num_layers)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is invalid: expected an integer >= 1")
        return self

    def copies_per_row(self, batch: int) -> int:
        """Rows decoded per prefix row: 1, or the forced candidates per prefix row."""
        if self.forced_tokens is None:
            return 1
        rows, length = self.forced_tokens.shape
        if rows % batch or rows == 0 or length != self.max_new_tokens:
            raise ValueError(f"forced_tokens of shape {tuple(self.forced_tokens.shape)} must be [{batch} prefix rows x "
                             f"candidates per row, max_new_tokens={self.max_new_tokens}]")
        return rows // batch


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [B, T] generated ids, pad after EOS
    layers_run: List[List[int]]  # decoder layers run per step the row took part in (EOS trims it)
    exit_blocks_run: List[List[int]]  # exit transformers run per emitted token
    heads_run: List[List[int]]  # head applications (exit checks + final) per emitted token
    num_layers: int
    head_cost: float = 0.0  # one head in decoder-layer units
    token_logprobs: Optional[torch.Tensor] = None  # scoring: [B, T] log-prob of each forced token, 0 after EOS
    seconds: Dict[str, float] = field(default_factory=dict)  # "prefill", "copy" (of the prefilled rows), "decode"
    extra: dict = field(default_factory=dict)


def synced_clock(device: torch.device) -> float:
    """`time.perf_counter` after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class EarlyExitDecoder:
    def __init__(self, adapter: DecoderAdapter, early_exits: Optional[EarlyExits] = None):
        self.adapter = adapter
        self.exits = list(early_exits.exits) if early_exits is not None else []
        self.exit_layers = list(early_exits.config.layers) if early_exits is not None else []
        num_layers = adapter.num_layers
        # Slots: 0..L-1 backbone layers, then one per exit that carries a cache.
        self.exit_slot = {}
        for k, module in enumerate(self.exits):
            if module.uses_cache:
                self.exit_slot[k] = num_layers + len(self.exit_slot)
        self.exit_after = {layer: k for k, layer in enumerate(self.exit_layers)}
        # The decoder layer that fills each slot's keys/values (backbone layers, then exit layers).
        self.slot_layers = list(adapter.layers) + [self.exits[k].layer for k in self.exit_slot]
        self.cache: Optional[DecodeCache] = None
        self.encoder: Optional[EncoderContext] = None

    def _encoder_rows(self, rows: Rows) -> Optional[EncoderContext]:
        return self.encoder.select(rows) if self.encoder is not None else None

    # -- running one slot -------------------------------------------------------------------
    def _run_layer(self, layer: int, row_ids: np.ndarray, last: int) -> None:
        """Backbone layer `layer` over the unfilled columns (up to `last`) of these rows."""
        cache = self.cache
        win = cache.window(layer, row_ids, last)
        if win is None:
            return
        hidden = self.adapter.forward_layer(
            self.adapter.layers[layer],
            cache.read_states(win),
            cache.positions[win.rows, win.first : last + 1],
            self._mask(win),
            cache.kv_store(layer, win),
            self._encoder_rows(win.rows),
        )
        cache.write_states(win, hidden)
        cache.commit(layer, win)

    def _run_exit(self, k: int, row_ids: np.ndarray, last: int) -> Optional[torch.Tensor]:
        """Exit k's features for column `last` of these rows (filling its own cache on the way)."""
        cache, module = self.cache, self.exits[k]
        if not module.uses_cache:
            return module.features(self.adapter, cache.states[cache.rows(row_ids), last], None, None)
        slot = self.exit_slot[k]
        win = cache.window(slot, row_ids, last)
        if win is None:
            return None
        features = module.features(
            self.adapter,
            cache.read_states(win),
            cache.positions[win.rows, win.first : last + 1],
            self._mask(win),
            cache.kv_store(slot, win),
            self._encoder_rows(win.rows),
        )
        cache.commit(slot, win)
        return features[:, -1]

    def _mask(self, win: Window) -> Optional[torch.Tensor]:
        key_valid = self.cache.key_valid
        if key_valid is None and win.first == win.last:
            return None
        if key_valid is None:
            key_valid = torch.ones(len(win.row_ids), win.last + 1, dtype=torch.bool, device=self.cache.states.device)
        else:
            key_valid = key_valid[win.rows]
        return decode_mask(key_valid, win.first, win.last)

    def _project(self, slot: int, hidden: torch.Tensor, positions: torch.Tensor):
        return self.adapter.kv_projection(self.slot_layers[slot], hidden, positions)

    # -- decisions ----------------------------------------------------------------------------
    def _decide_exits(
        self, logits: torch.Tensor, opts: DecodeOptions, exit_index: int, rows: np.ndarray, step: int
    ) -> np.ndarray:
        """THE exit decision: which `rows` (still going, at exit `exit_index`, generating token
        `step`) are confident enough to emit now. Subclasses may replace the rule."""
        confidence = get_confidence(opts.exits.confidence)(logits)
        return (confidence >= opts.exits.exit_threshold).cpu().numpy()

    def _constrain(self, logits: torch.Tensor, step: int, opts: DecodeOptions) -> torch.Tensor:
        """Logits as the rule and the argmax see them, at every exit and at the final head alike:
        suppressed ids never win, nor EOS before `min_length`."""
        banned = list(opts.suppressed_ids)
        if self.prompt_length + step < opts.min_length:
            banned.append(opts.eos_token_id)
        if banned:
            logits = logits.clone()
            logits[:, banned] = -float("inf")
        return logits

    # -- public API ---------------------------------------------------------------------------
    def _layers_with_exits(self, use_exits: bool):
        """Slots in depth order: each backbone layer, then the exit that reads its output."""
        for layer in range(self.adapter.num_layers):
            yield layer, (self.exit_after.get(layer) if use_exits else None)

    @torch.no_grad()
    def prefill(self, lm_batch: LMBatch, max_new_tokens: int, use_exits: bool) -> torch.Tensor:
        """Runs the decoder prefix at full depth (exit caches too when exits are used); returns
        the last column's final features."""
        adapter = self.adapter
        inputs_embeds, attention_mask = lm_batch.inputs_embeds, lm_batch.attention_mask
        self.encoder = lm_batch.encoder.memoized() if lm_batch.encoder is not None else None
        batch, prefix = attention_mask.shape
        self.cache = cache = DecodeCache(
            adapter.num_layers + len(self.exit_slot),
            batch,
            prefix + max_new_tokens,
            adapter.num_kv_heads,
            adapter.head_dim,
            adapter.hidden_size,
            inputs_embeds.dtype,
            inputs_embeds.device,
        )
        cache.set_padding(attention_mask)
        positions = adapter.positions_from_mask(attention_mask)
        cache.positions[:, :prefix] = positions
        cache.states[:, :prefix] = adapter.embed(inputs_embeds, positions)
        all_rows = np.arange(batch)
        for layer, k in self._layers_with_exits(use_exits):
            self._run_layer(layer, all_rows, prefix - 1)
            if k is not None and self.exits[k].uses_cache:
                self._run_exit(k, all_rows, prefix - 1)
        return adapter.final_norm(cache.states[:, prefix - 1])

    @torch.no_grad()
    def generate(self, lm_batch: LMBatch, opts: DecodeOptions) -> DecodeResult:
        """Greedy decoding with early exits. `lm_batch.inputs_embeds` are token-level embeddings
        of the decoder prefix (before position information), left-padded as its mask says."""
        adapter = self.adapter
        num_layers = adapter.num_layers
        opts.validate(num_layers)
        use_exits = opts.exits.enabled and bool(self.exits)
        self.prompt_length = lm_batch.prompt_length
        batch, prefix = lm_batch.attention_mask.shape
        copies = opts.copies_per_row(batch)
        device = lm_batch.inputs_embeds.device
        started = synced_clock(device)
        features = self.prefill(lm_batch, opts.max_new_tokens, use_exits)
        prefilled = synced_clock(device)
        if copies > 1:
            self.cache.repeat_rows(copies)
            self.encoder = self.encoder.repeat_rows(copies) if self.encoder is not None else None
            features = features.repeat_interleave(copies, dim=0)
            batch *= copies
        cache = self.cache
        copied = synced_clock(device) if copies > 1 else prefilled

        tokens = torch.full((batch, opts.max_new_tokens), opts.pad_token_id, dtype=torch.long, device=device)
        logprobs = None if opts.forced_tokens is None else torch.zeros(tokens.shape, dtype=torch.float, device=device)
        layers_run = [[] for _ in range(batch)]
        exit_blocks_run = [[] for _ in range(batch)]
        heads_run = [[] for _ in range(batch)]
        self._emit(self._constrain(adapter.head(features), 0, opts), slice(None), 0, opts, tokens, logprobs)
        finished = (tokens[:, 0] == opts.eos_token_id).cpu().numpy()
        for row in range(batch):
            layers_run[row].append(num_layers)
            exit_blocks_run[row].append(0)
            heads_run[row].append(1)

        exit_layers_allowed = {
            layer: k for layer, k in self.exit_after.items() if layer + 1 >= opts.exits.min_exit_layer
        } if use_exits else {}
        for step in range(1, opts.max_new_tokens):
            unfinished = np.flatnonzero(~finished)
            if len(unfinished) == 0:
                break
            # Finished rows keep computing (their tokens become padding) while they are at most
            # half the batch: gathering the others out of the cache would cost more.
            active = unfinished if 2 * len(unfinished) <= batch else np.arange(batch)
            col = prefix + step - 1
            rows_t = cache.rows(active)
            cache.positions[rows_t, col] = cache.positions[rows_t, col - 1] + 1
            embeds = adapter.embed_tokens(tokens[rows_t, step - 1 : step])
            cache.states[rows_t, col : col + 1] = adapter.embed(embeds, cache.positions[rows_t, col : col + 1])

            going = active
            blocks = np.zeros(batch, dtype=np.int64)
            for layer, k in self._layers_with_exits(use_exits):
                self._run_layer(layer, going, col)
                if layer not in exit_layers_allowed:
                    continue
                features = self._run_exit(k, going, col)
                blocks[going] += 1
                logits = self._constrain(self.exits[k].logits(adapter, features), step, opts)
                leave = self._decide_exits(logits, opts, k, going, step)
                if not leave.any():
                    continue
                leaving = going[leave]
                self._emit(logits[torch.as_tensor(leave)], torch.as_tensor(leaving, device=device), step, opts, tokens, logprobs)
                for row in leaving:
                    layers_run[row].append(layer + 1)
                if opts.exits.kv_policy == "propagate":
                    cache.propagate(leaving, col, self._skipped_slots(layer), self._project)
                going = going[~leave]
                if len(going) == 0:
                    break
            if len(going):
                rows_t = cache.rows(going)
                logits = self._constrain(adapter.logits(cache.states[rows_t, col]), step, opts)
                self._emit(logits, rows_t, step, opts, tokens, logprobs)
                for row in going:
                    layers_run[row].append(num_layers)
            reached_head = set(going.tolist())
            for row in active:
                exit_blocks_run[row].append(int(blocks[row]))
                heads_run[row].append(int(blocks[row]) + (row in reached_head))
            done_before = torch.as_tensor(finished, device=tokens.device)
            tokens[:, step].masked_fill_(done_before, opts.pad_token_id)
            if logprobs is not None:
                logprobs[:, step].masked_fill_(done_before, 0.0)
            finished |= (tokens[:, step] == opts.eos_token_id).cpu().numpy()

        return DecodeResult(
            tokens=tokens,
            layers_run=layers_run,
            exit_blocks_run=exit_blocks_run,
            heads_run=heads_run,
            num_layers=num_layers,
            head_cost=adapter.head_cost_in_layers(),
            token_logprobs=logprobs,
            seconds={"prefill": prefilled - started, "decode": synced_clock(device) - copied,
                     **({"copy": copied - prefilled} if copies > 1 else {})},
        )

    @staticmethod
    def _emit(logits: torch.Tensor, rows, step: int, opts: DecodeOptions, tokens: torch.Tensor,
              logprobs: Optional[torch.Tensor]) -> None:
        """Writes what `rows` emit at `step` from these (constrained) logits: the argmax, or when
        scoring the forced token, with its log-probability under these logits."""
        if opts.forced_tokens is None:
            tokens[rows, step] = logits.argmax(-1)
            return
        forced = opts.forced_tokens[rows, step]
        tokens[rows, step] = forced
        logprobs[rows, step] = torch.log_softmax(logits.float(), dim=-1).gather(1, forced[:, None])[:, 0]

    def _skipped_slots(self, exit_layer: int) -> List[int]:
        deeper_layers = list(range(exit_layer + 1, self.adapter.num_layers))
        deeper_exits = [slot for k, slot in self.exit_slot.items() if self.exit_layers[k] > exit_layer]
        return deeper_layers + deeper_exits

    @torch.no_grad()
    def flush(self, last_col: int) -> None:
        """Fills every pending column up to `last_col` in every slot (recompute). generate does
        not need it; call it to continue decoding from the cache or to inspect it."""
        rows = np.arange(self.cache.batch)
        for layer, k in self._layers_with_exits(True):
            self._run_layer(layer, rows, last_col)
            if k is not None and self.exits[k].uses_cache:
                self._run_exit(k, rows, last_col)
