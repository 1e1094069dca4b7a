"""Early-exit decoding that skips layers for real: greedy, sampling, scoring and beam search.

The prefix (image queries + prompt) runs at full depth, filling every backbone layer's and every
exit transformer's cache. Then, token by token, decoder layers run one at a time; after an exit
layer its exit transformer and the frozen head give logits, and `_decide_exits` (THE place where
the exit decision is made) lets rows whose confidence reaches the threshold emit their token and
stop. With `confidence: learned` the rule reads a small confidence head on the exit's features
instead, and only the rows that leave pay the head. Keys/values those rows skipped are filled by
the cache's policy (see kv_cache.py).

Batch semantics: every row decides for itself. A slot runs only on the rows still going at that
depth (the others are gathered out), so rows that exited do not pay for deeper layers; rows that
finished (EOS) stop computing once they are more than half the batch (before that, gathering the
others costs more than computing them; their tokens are padding either way). With `recompute`, a row's window also carries its pending columns; rows with shorter
windows are masked within the batched call.

With exits off (`early_exit=False`, options.py) the engine is plain full-depth decoding and gives
the same tokens as Hugging Face `generate` with the same settings on the same weights: greedy,
sampling (same seed), beam search, with the same logits processors (`DecodeOptions.choice`).
In beam search the exit rule reads the processed log-probabilities Hugging Face's beam search
ranks (a repetition penalty scales log-probs there, logits in greedy decoding), so a threshold
calibrated for greedy decoding is not the same confidence under beams with a penalty.

Scoring (`DecodeOptions.forced_tokens`): the same loop, but each row emits its given token
instead of the argmax, and records that token's log-probability under the logits it is emitted
from. The exit rule is unchanged, so a token's log-probability comes from the exit the decoding
rule would take for it at that point (its confidence is the rule's, whatever token is forced),
and layers it skips are skipped for real: ranking answer options costs what decoding them would.
Several candidates per prefix row (VisDial's 100 options) share one prefill: the cache is
repeated after it.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from transformers.generation.beam_search import BeamSearchScorer

from lavis_free.exits.adapters.base import DecoderAdapter, EncoderContext, Rows
from lavis_free.exits.attention import decode_mask
from lavis_free.exits.confidence import get_confidence
from lavis_free.exits.early_exits import EarlyExits
from lavis_free.exits.kv_cache import DecodeCache, Window
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.options import FULL_DEPTH, LEARNED, ExitConfigError, ExitOptions
from lavis_free.exits.processors import GREEDY, TokenChoice


@dataclass
class DecodeOptions:
    """One greedy decode: lengths and special ids (the host's), and the early-exit options."""

    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    min_length: int = 0  # Hugging Face semantics: counts the prefix's `prompt_length` + generated tokens
    exits: ExitOptions = FULL_DEPTH
    suppressed_ids: Tuple[int, ...] = ()  # never generated (e.g. Vicuna's added [PAD]), at every exit too
    # Rows decoded per prefix row (n candidates to score, or n samples of one prompt), grouped by
    # row: those of prefix row i are rows i*n .. i*n+n-1; the prefix is run once and repeated.
    copies: int = 1
    # Scoring: [B * copies, max_new_tokens] ids each row emits (EOS, then pad). None = decode.
    forced_tokens: Optional[torch.Tensor] = None
    # Hugging Face's logits processors (and warpers when sampling), applied at every exit and at
    # the final head on each row's ids so far (`LMBatch.input_ids`, then the generated tokens)
    choice: TokenChoice = GREEDY
    beams: Optional["BeamSettings"] = None  # beam search (None: greedy or sampling, per `choice`)

    def validate(self, num_layers: int) -> "DecodeOptions":
        self.exits.validate(num_layers)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is invalid: expected an integer >= 1")
        return self

    def copies_per_row(self, batch: int) -> int:
        """`copies`, checked against the forced tokens' shape."""
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 1:
            raise ValueError(f"copies={self.copies!r} is invalid: expected an integer >= 1")
        want = (batch * self.copies, self.max_new_tokens)
        if self.forced_tokens is not None and tuple(self.forced_tokens.shape) != want:
            raise ValueError(f"forced_tokens of shape {tuple(self.forced_tokens.shape)} must be [{batch} prefix rows x "
                             f"copies={self.copies}, max_new_tokens={self.max_new_tokens}] = {list(want)}")
        return self.copies


@dataclass
class BeamSettings:
    """Beam search as Hugging Face's `generate` runs it (`BeamSearchScorer` with these settings)."""

    num_beams: int
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False  # as the LM's generation_config says ("never" on 4.33)
    num_return_sequences: int = 1


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [B, T] generated ids, pad after EOS
    layers_run: List[List[int]]  # decoder layers run per step the row took part in (EOS trims it)
    exit_blocks_run: List[List[int]]  # exit transformers run per emitted token
    heads_run: List[List[int]]  # head applications per emitted token (softmax exit checks, and the head it leaves through)
    num_layers: int
    head_cost: float = 0.0  # one head in decoder-layer units
    token_logprobs: Optional[torch.Tensor] = None  # scoring: [B, T] log-prob of each forced token, 0 after EOS
    # Beam search: the cost lists are per beam slot and step (every beam's every step counts),
    # not per returned sequence, so they are not trimmed at the EOS of `tokens`
    per_beam_slot: bool = False
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
        fitted = early_exits is not None and bool(early_exits.confidence_fitted)
        self.confidence_heads = early_exits.confidence_heads if fitted else None
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
        self._fill_pending(layer, row_ids, last)
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
        self._fill_pending(slot, row_ids, last)
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

    def _fill_pending(self, slot: int, row_ids: np.ndarray, last: int) -> None:
        """`propagate`: these rows' exited columns before `last` get this slot's projection now,
        just before the slot's own call (kv_cache.py); `recompute` runs them in that call."""
        if self.cache.policy == "propagate":
            self.cache.project_pending(slot, row_ids, last, self._project)

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
        self, confidence: torch.Tensor, opts: DecodeOptions, exit_index: int, rows: np.ndarray, step: int
    ) -> np.ndarray:
        """THE exit decision: which `rows` (still going, at exit `exit_index`, generating token
        `step`) are confident enough to emit now. Subclasses may replace the rule."""
        return (confidence >= opts.exits.exit_threshold).cpu().numpy()

    def _exit_check(self, k: int, features: torch.Tensor, rows: np.ndarray, step: int, opts: DecodeOptions,
                    scores: bool) -> Tuple[np.ndarray, Optional[torch.Tensor]]:
        """Exit k's check for these rows: which leave (`_decide_exits` on the configured
        confidence) and the logits they leave with (see `_scores`). A softmax confidence needs
        every row's logits. The learned one needs none: the leaving rows' logits come later, from
        the step's one call of the LM's head (None here) when the exit reads that head, as FREE's
        exits do, else from the exit's own head now."""
        exit_module = self.exits[k]
        if opts.exits.confidence == LEARNED:
            leave = self._decide_exits(self.confidence_heads[k](features), opts, k, rows, step)
            if not leave.any() or exit_module.reads_lm_head:
                return leave, None
            leaving = features[torch.as_tensor(leave, device=features.device)]
            return leave, self._scores(exit_module.logits(self.adapter, leaving), step, opts, self.cache.rows(rows[leave]), scores)
        logits = self._scores(exit_module.logits(self.adapter, features), step, opts, self.cache.rows(rows), scores)
        leave = self._decide_exits(get_confidence(opts.exits.confidence)(logits), opts, k, rows, step)
        return leave, logits[torch.as_tensor(leave, device=logits.device)]

    def _constrain(self, logits: torch.Tensor, step: int, opts: DecodeOptions, rows: Rows) -> torch.Tensor:
        """Logits as the rule and the token choice see them, at every exit and at the final head
        alike: suppressed ids never win, nor EOS before `min_length`; then the Hugging Face
        processors of `opts.choice` on these rows' ids so far."""
        banned = list(opts.suppressed_ids)
        if self.prompt_length + step < opts.min_length:
            banned.append(opts.eos_token_id)
        if banned:
            logits = logits.clone()
            logits[:, banned] = -float("inf")
        if opts.choice.processors is not None:
            logits = opts.choice.process(self._ids_so_far(rows, step), logits)
        return logits

    def _ids_so_far(self, rows: Rows, step: int) -> torch.Tensor:
        """What `generate` holds as `input_ids` for these rows before choosing token `step`."""
        return torch.cat([self.start_ids[rows], self.tokens[rows, :step]], dim=1)

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
        """Decoding with early exits: greedy or sampling (`opts.choice`), scoring
        (`opts.forced_tokens`), or beam search (`opts.beams`). `lm_batch.inputs_embeds` are
        token-level embeddings of the decoder prefix (before position information), left-padded
        as its mask says."""
        if opts.beams is not None and opts.beams.num_beams > 1:
            return self._beam_search(lm_batch, opts)
        adapter = self.adapter
        num_layers = adapter.num_layers
        opts.validate(num_layers)
        use_exits = self._use_exits(opts)
        self.prompt_length = lm_batch.prompt_length
        batch, prefix = lm_batch.attention_mask.shape
        copies = opts.copies_per_row(batch)
        device = lm_batch.inputs_embeds.device
        features, seconds, prefilled = self._prefill_copies(lm_batch, opts, use_exits, copies)
        batch *= copies
        cache = self.cache

        self.tokens = tokens = torch.full((batch, opts.max_new_tokens), opts.pad_token_id, dtype=torch.long, device=device)
        self.start_ids = self._start_ids(lm_batch, opts, copies)
        logprobs = None if opts.forced_tokens is None else torch.zeros(tokens.shape, dtype=torch.float, device=device)
        layers_run = [[] for _ in range(batch)]
        exit_blocks_run = [[] for _ in range(batch)]
        heads_run = [[] for _ in range(batch)]
        self._emit(self._constrain(adapter.head(features), 0, opts, slice(None)), slice(None), 0, opts, tokens, logprobs)
        finished = (tokens[:, 0] == opts.eos_token_id).cpu().numpy()
        for row in range(batch):
            layers_run[row].append(num_layers)
            exit_blocks_run[row].append(0)
            heads_run[row].append(1)

        allowed = self._allowed_exits(opts, use_exits)
        for step in range(1, opts.max_new_tokens):
            unfinished = np.flatnonzero(~finished)
            if len(unfinished) == 0:
                break
            # Finished rows keep computing (their tokens become padding) while they are at most
            # half the batch: gathering the others out of the cache would cost more. Sampling
            # keeps every row, so that each step draws for the whole batch as `generate` does.
            keep_all = opts.choice.sampling or 2 * len(unfinished) > batch
            active = np.arange(batch) if keep_all else unfinished
            logits, layers, blocks, heads = self._step(active, prefix + step - 1, step, opts, allowed)
            self._emit(logits, cache.rows(active), step, opts, tokens, logprobs)
            for i, row in enumerate(active):
                layers_run[row].append(int(layers[i]))
                exit_blocks_run[row].append(int(blocks[i]))
                heads_run[row].append(int(heads[i]))
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
            seconds={**seconds, "decode": synced_clock(device) - prefilled},
        )

    def _prefill_copies(self, lm_batch: LMBatch, opts: DecodeOptions, use_exits: bool,
                        copies: int) -> Tuple[torch.Tensor, Dict[str, float], float]:
        """The prefill, then each row as `copies` consecutive rows (cache, encoder context, last
        features: candidates, samples or beams of one prompt), and the cache told the decode's
        `kv_policy`. Returns the features, the seconds of "prefill" (and "copy"), and the clock
        reading the token loop starts from."""
        device = lm_batch.inputs_embeds.device
        started = synced_clock(device)
        features = self.prefill(lm_batch, opts.max_new_tokens, use_exits)
        self.cache.policy = opts.exits.kv_policy
        prefilled = synced_clock(device)
        seconds = {"prefill": prefilled - started}
        if copies == 1:
            return features, seconds, prefilled
        self.cache.repeat_rows(copies)
        self.encoder = self.encoder.repeat_rows(copies) if self.encoder is not None else None
        features = features.repeat_interleave(copies, dim=0)
        copied = synced_clock(device)
        seconds["copy"] = copied - prefilled
        return features, seconds, copied

    def _use_exits(self, opts: DecodeOptions) -> bool:
        """Whether this decode takes exits; refuses the learned confidence without fitted heads."""
        use_exits = opts.exits.enabled and bool(self.exits)
        if use_exits and opts.exits.confidence == LEARNED and self.confidence_heads is None:
            raise ExitConfigError(
                "confidence='learned' needs confidence heads fitted to these exits, and they have none: run "
                "python -m lavis_free.evaluation.fit_confidence --cfg-path <project.yaml> --out DIR, then load "
                "DIR/exits_confidence.pth (model.exits_checkpoint=...), or choose max_prob, margin or entropy")
        return use_exits

    def _allowed_exits(self, opts: DecodeOptions, use_exits: bool) -> Dict[int, int]:
        """Exit index by the decoder layer it follows, for the exits this decode may take."""
        if not use_exits:
            return {}
        return {layer: k for layer, k in self.exit_after.items() if layer + 1 >= opts.exits.min_exit_layer}

    def _step(self, active: np.ndarray, col: int, step: int, opts: DecodeOptions, allowed: Dict[int, int],
              scores: bool = False) -> Tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """Token `step` of the `active` rows (sorted), fed at column `col`: the previous token is
        embedded, then layers run one at a time on the rows still going; at each allowed exit,
        the rows the rule lets go leave with that exit's logits and run no deeper layer.
        One call of the LM's head, after the deepest layer, serves the rows at full depth and
        those that left through it without needing its logits to decide (the learned
        confidence): a few rows' call costs nearly what the whole batch's does.
        Returns, per active row: the constrained logits its token is chosen from ([n, V]; with
        `scores`, log-probabilities constrained after the log-softmax, as beam search scores
        them), the decoder layers it ran, the exit transformers it ran, and the head
        applications it paid (exit checks that read logits, and the head it leaves through)."""
        adapter, cache = self.adapter, self.cache
        rows_t = cache.rows(active)
        cache.positions[rows_t, col] = cache.positions[rows_t, col - 1] + 1
        embeds = adapter.embed_tokens(self.tokens[rows_t, step - 1 : step])
        cache.states[rows_t, col : col + 1] = adapter.embed(embeds, cache.positions[rows_t, col : col + 1])
        layers = np.full(len(active), adapter.num_layers, dtype=np.int64)
        blocks = np.zeros(len(active), dtype=np.int64)
        heads = np.zeros(len(active), dtype=np.int64)
        chosen: Optional[torch.Tensor] = None
        going = active
        to_head: List[Tuple[np.ndarray, torch.Tensor]] = []  # (rows, final-normed features) for the step's head call

        def keep(logits: torch.Tensor, rows: np.ndarray) -> None:
            nonlocal chosen
            if chosen is None:
                chosen = logits.new_empty(len(active), logits.shape[-1])
            chosen[torch.as_tensor(np.searchsorted(active, rows), device=logits.device)] = logits

        for layer, k in self._layers_with_exits(bool(allowed)):
            self._run_layer(layer, going, col)
            if layer not in allowed:
                continue
            features = self._run_exit(k, going, col)
            blocks[np.searchsorted(active, going)] += 1
            leave, logits = self._exit_check(k, features, going, step, opts, scores)
            if opts.exits.confidence != LEARNED:
                heads[np.searchsorted(active, going)] += 1
            if not leave.any():
                continue
            leaving = going[leave]
            if logits is None:
                to_head.append((leaving, features[torch.as_tensor(leave, device=features.device)]))
            else:
                keep(logits, leaving)
                if opts.exits.confidence == LEARNED:
                    heads[np.searchsorted(active, leaving)] += 1
            layers[np.searchsorted(active, leaving)] = layer + 1
            going = going[~leave]
            if len(going) == 0:
                break
        if len(going):
            to_head.append((going, adapter.final_norm(cache.states[cache.rows(going), col])))
        if to_head:
            rows, features = to_head[0]  # each entry's rows are sorted; several are merged in row order
            if len(to_head) > 1:
                rows = np.concatenate([r for r, _ in to_head])
                order = np.argsort(rows)
                features = torch.cat([f for _, f in to_head])[torch.as_tensor(order, device=cache.states.device)]
                rows = rows[order]
            logits = self._scores(adapter.head(features), step, opts, cache.rows(rows), scores)
            if chosen is None and len(rows) == len(active):
                chosen = logits  # every row reads this head: nothing to gather
            else:
                keep(logits, rows)
            heads[np.searchsorted(active, rows)] += 1
        return chosen, layers, blocks, heads

    def _scores(self, logits: torch.Tensor, step: int, opts: DecodeOptions, rows: Rows, log_softmax: bool) -> torch.Tensor:
        """`_constrain`d logits, or with `log_softmax` the constrained log-probabilities."""
        return self._constrain(logits.log_softmax(-1) if log_softmax else logits, step, opts, rows)

    def _beam_search(self, lm_batch: LMBatch, opts: DecodeOptions) -> DecodeResult:
        """Beam search with early exits: every beam is a row that decides for itself at each exit
        (its log-probabilities come from the exit it leaves at), then Hugging Face's
        `BeamSearchScorer` picks the beams of the next step from all rows' scores, as `generate`'s
        beam search does, and the cache (pending `recompute` windows included) follows the beams
        it keeps. With exits off the tokens are `generate(num_beams=...)`'s."""
        settings, adapter = opts.beams, self.adapter
        num_layers, num_beams = adapter.num_layers, opts.beams.num_beams
        opts.validate(num_layers)
        if opts.forced_tokens is not None or opts.choice.sampling or opts.copies != 1:
            raise ValueError("beam search takes no forced tokens, sampling or copies")
        if not 1 <= settings.num_return_sequences <= num_beams:
            raise ValueError(f"num_return_sequences={settings.num_return_sequences} must be in [1, num_beams={num_beams}]")
        use_exits = self._use_exits(opts)
        self.prompt_length = lm_batch.prompt_length
        samples, prefix = lm_batch.attention_mask.shape
        device = lm_batch.inputs_embeds.device
        if lm_batch.input_ids is None:
            raise ValueError("beam search needs LMBatch.input_ids (the ids generate starts from, that its length "
                             "penalty counts); the host binding's decode_batch must set them")
        features, seconds, prefilled = self._prefill_copies(lm_batch, opts, use_exits, num_beams)
        batch = samples * num_beams
        self.tokens = torch.full((batch, opts.max_new_tokens), opts.pad_token_id, dtype=torch.long, device=device)
        self.start_ids = lm_batch.input_ids.repeat_interleave(num_beams, dim=0)
        max_length = lm_batch.input_ids.shape[1] + opts.max_new_tokens
        scorer_args = {"max_length": max_length} if "max_length" in inspect.signature(BeamSearchScorer).parameters else {}
        scorer = BeamSearchScorer(batch_size=samples, num_beams=num_beams, device=device,
                                  length_penalty=settings.length_penalty, do_early_stopping=settings.early_stopping,
                                  num_beam_hyps_to_keep=settings.num_return_sequences, **scorer_args)
        beam_scores = torch.zeros(samples, num_beams, dtype=torch.float, device=device)
        beam_scores[:, 1:] = -1e9  # step 0: every beam of a sample is the same; only the first counts
        beam_scores = beam_scores.view(-1)
        layers_run = [[num_layers] for _ in range(batch)]
        exit_blocks_run = [[0] for _ in range(batch)]
        heads_run = [[1] for _ in range(batch)]
        scores = self._scores(adapter.head(features), 0, opts, slice(None), log_softmax=True)
        allowed = self._allowed_exits(opts, use_exits)
        rows = torch.arange(batch, device=device)
        fed = np.zeros(batch, dtype=np.int64)  # tokens each beam slot has fed into the cache
        step = 0
        while True:
            ids = self._ids_so_far(slice(None), step)
            vocab = scores.shape[-1]
            ranked = (scores + beam_scores[:, None]).view(samples, num_beams * vocab)
            top_scores, top = torch.topk(ranked, 2 * num_beams, dim=1, largest=True, sorted=True)
            next_indices, next_tokens = top // vocab, top % vocab
            done_before = scorer._done.clone().repeat_interleave(num_beams)
            picked = scorer.process(ids, top_scores, next_tokens, next_indices,
                                    pad_token_id=opts.pad_token_id, eos_token_id=opts.eos_token_id)
            beam_scores = picked["next_beam_scores"]
            # a finished sample's slots stay as they are (the scorer points them at row 0)
            beam_idx = torch.where(done_before, rows, picked["next_beam_indices"])
            self.cache.reorder_rows(beam_idx)
            self.tokens = self.tokens[beam_idx]
            fed = fed[beam_idx.cpu().numpy()]
            self.tokens[:, step] = torch.where(done_before, self.tokens[:, step], picked["next_beam_tokens"])
            step += 1
            if scorer.is_done or step == opts.max_new_tokens:
                break
            # the slots of samples whose hypotheses are complete compute nothing more
            active = np.flatnonzero(~scorer._done.repeat_interleave(num_beams).cpu().numpy())
            scores = torch.zeros(batch, vocab, dtype=scores.dtype, device=device)
            step_scores, layers, blocks, heads = self._step(active, prefix + step - 1, step, opts, allowed, scores=True)
            scores[torch.as_tensor(active, device=device)] = step_scores
            fed[active] += 1
            for i, row in enumerate(active):
                layers_run[row].append(int(layers[i]))
                exit_blocks_run[row].append(int(blocks[i]))
                heads_run[row].append(int(heads[i]))
        finals = scorer.finalize(self._ids_so_far(slice(None), step), beam_scores, next_tokens, next_indices,
                                 pad_token_id=opts.pad_token_id, eos_token_id=opts.eos_token_id,
                                 max_length=max_length)["sequences"]
        generated = finals[:, self.start_ids.shape[1]:]
        tokens = torch.full((len(generated), opts.max_new_tokens), opts.pad_token_id, dtype=torch.long, device=device)
        tokens[:, : generated.shape[1]] = generated
        return DecodeResult(
            tokens=tokens, layers_run=layers_run, exit_blocks_run=exit_blocks_run, heads_run=heads_run,
            num_layers=num_layers, head_cost=adapter.head_cost_in_layers(), per_beam_slot=True,
            seconds={**seconds, "decode": synced_clock(device) - prefilled},
            extra={"fed": fed},  # per beam slot at the end, its tokens (self.tokens) fed into the cache
        )

    def _start_ids(self, lm_batch: LMBatch, opts: DecodeOptions, copies: int) -> Optional[torch.Tensor]:
        """The ids the processors see before the generated ones (`LMBatch.input_ids`), per row."""
        if opts.choice.processors is None and not opts.choice.sampling:
            return None
        if lm_batch.input_ids is None:
            raise ValueError("logits processors and sampling need LMBatch.input_ids (the ids generate starts from); "
                             "the host binding's decode_batch must set them")
        return lm_batch.input_ids.repeat_interleave(copies, dim=0)

    def _emit(self, logits: torch.Tensor, rows, step: int, opts: DecodeOptions, tokens: torch.Tensor,
              logprobs: Optional[torch.Tensor]) -> None:
        """Writes what `rows` emit at `step` from these (constrained) logits: the token choice's
        (argmax or a sample), or when scoring the forced token, with its log-probability."""
        if opts.forced_tokens is None:
            ids = self._ids_so_far(rows, step) if opts.choice.sampling else None
            tokens[rows, step] = opts.choice.choose(ids, logits)
            return
        forced = opts.forced_tokens[rows, step]
        tokens[rows, step] = forced
        logprobs[rows, step] = torch.log_softmax(logits.float(), dim=-1).gather(1, forced[:, None])[:, 0]

    @torch.no_grad()
    def flush(self, last_col: int) -> None:
        """Fills every pending column up to `last_col` in every slot, as the decode's policy
        does (`recompute` runs them, `propagate` projects them). generate does not need it;
        call it to continue decoding from the cache or to inspect it."""
        rows = np.arange(self.cache.batch)
        if self.cache.policy == "propagate":
            for slot in range(len(self.slot_layers)):
                self.cache.project_pending(slot, rows, last_col + 1, self._project)
            return
        for layer, k in self._layers_with_exits(True):
            self._run_layer(layer, rows, last_col)
            if k is not None and self.exits[k].uses_cache:
                self._run_exit(k, rows, last_col)
