"""Exit figures beside the usual metrics: average exit layer, layer-count and wall-clock speedup.

Why one module: the three free_* tasks, the threshold sweep and the calibration must report the
same figures computed the same way, and in distributed evaluation the figures must come from
counts summed over every rank (a mean of per-rank ratios would be wrong).

Definitions (per decoded token t, up to and including EOS, as `generate(return_exit_stats=True)`
reports them; L = the LM's depth, h = one head application in decoder-layer units):
  - average exit layer = mean of `exit_layers[t]` (L for a token that did not exit);
  - layer-count speedup = sum_t (L + h) / sum_t (exit_layers[t] + exit_blocks_run[t] + h * heads_run[t]),
    i.e. what full-depth decoding computes over what the early-exit decoding computed, exit
    transformers and head applications included;
  - wall-clock speedup (with `run.compare_full_depth: true`): every batch is also decoded at full
    depth (`early_exit=False`), both timed with `time.perf_counter`; the ratio of the summed
    times. Tokens/s of each decoding are reported too (tokens and seconds summed over ranks, so
    the figure is per process).
  - time split (`time_<part>_s`, `full_depth_time_<part>_s`, parts `TIME_PARTS`): seconds of each
    decoding spent on the image side (vision encoder, Q-Former, tokenizing and embedding the
    prompt and any answer options), the prefill (prompt columns through every layer), copying
    the prefilled cache for each candidate (answer options, samples, beams) and the token loop,
    summed over batches and ranks; they show how much of a task's time exits can act on (the
    token loop only).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
import torch.distributed as dist

from lavis_free.hosts import AttachedExits


TIME_PARTS = ("image", "prefill", "copy", "decode")  # the time split's parts (module docstring)


@dataclass
class ExitTally:
    """Additive sums over decoded tokens and timings: batches and ranks merge by addition."""

    num_layers: int = 0
    tokens: int = 0
    layers_sum: float = 0.0
    full_cost: float = 0.0
    run_cost: float = 0.0
    seconds: float = 0.0
    full_tokens: int = 0
    full_seconds: float = 0.0
    time_image: float = 0.0
    time_prefill: float = 0.0
    time_copy: float = 0.0
    time_decode: float = 0.0
    full_time_image: float = 0.0
    full_time_prefill: float = 0.0
    full_time_copy: float = 0.0
    full_time_decode: float = 0.0
    histogram: List[int] = field(default_factory=list)  # tokens by layers run, index 0..L

    def add_stats(self, stats: Mapping[str, Any], seconds: float = 0.0) -> None:
        """Adds one `generate(..., return_exit_stats=True)` stats dict (and its decode time)."""
        num_layers = int(stats["num_layers"])
        self._set_depth(num_layers)
        head_cost = float(stats.get("head_cost", 0.0))
        rows = zip(stats["exit_layers"], stats["exit_blocks_run"], stats["heads_run"])
        for layers, blocks, heads in rows:
            if not len(layers) == len(blocks) == len(heads):
                raise ValueError(
                    f"exit stats rows differ in length: exit_layers {len(layers)}, "
                    f"exit_blocks_run {len(blocks)}, heads_run {len(heads)}"
                )
            for run, block, head in zip(layers, blocks, heads):
                if not 0 < run <= num_layers:
                    raise ValueError(f"exit_layers entry {run} is outside [1, num_layers={num_layers}]")
                self.tokens += 1
                self.layers_sum += run
                self.full_cost += num_layers + head_cost
                self.run_cost += run + block + head_cost * head
                self.histogram[run] += 1
        self.seconds += seconds
        self._add_split(stats, "time_")

    def add_full_depth(self, stats: Mapping[str, Any], seconds: float) -> None:
        """Adds the timing of the same batch decoded at full depth."""
        self.full_tokens += sum(len(row) for row in stats["exit_layers"])
        self.full_seconds += seconds
        self._add_split(stats, "full_time_")

    def _add_split(self, stats: Mapping[str, Any], prefix: str) -> None:
        """The decoding's time split (`stats["seconds"]`; absent for LAVIS's own full-depth path)."""
        for part, seconds in stats.get("seconds", {}).items():
            name = prefix + part
            setattr(self, name, getattr(self, name) + float(seconds))

    def merge(self, other: "ExitTally") -> "ExitTally":
        if other.num_layers:
            self._set_depth(other.num_layers)
            self.histogram = [a + b for a, b in zip(self.histogram, other.histogram)]
        for name in self._SCALARS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def _set_depth(self, num_layers: int) -> None:
        if self.num_layers and self.num_layers != num_layers:
            raise ValueError(f"exit stats of models of different depths ({self.num_layers} and {num_layers}) cannot be summed")
        self.num_layers = num_layers
        if not self.histogram:
            self.histogram = [0] * (num_layers + 1)

    # -- distributed ------------------------------------------------------------------------
    _SPLIT = tuple(f"{prefix}time_{part}" for prefix in ("", "full_") for part in TIME_PARTS)
    _SCALARS = ("tokens", "layers_sum", "full_cost", "run_cost", "seconds", "full_tokens", "full_seconds") + _SPLIT

    def all_reduce(self) -> "ExitTally":
        """Sums the tally over ranks (collective: every rank must call it); a no-op when
        torch.distributed is not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        depth = torch.tensor([self.num_layers], dtype=torch.float64)
        dist.all_reduce(depth, op=dist.ReduceOp.MAX)
        self._set_depth(int(depth.item()))
        values = torch.tensor([float(getattr(self, n)) for n in self._SCALARS] + self.histogram, dtype=torch.float64)
        dist.all_reduce(values)
        for i, name in enumerate(self._SCALARS):
            kind = type(getattr(self, name))
            setattr(self, name, kind(round(values[i].item())) if kind is int else values[i].item())
        self.histogram = [int(round(v)) for v in values[len(self._SCALARS):].tolist()]
        return self

    # -- figures ----------------------------------------------------------------------------
    def summary(self) -> Dict[str, Any]:
        """The reported figures; wall-clock ones only when a full-depth decoding was timed."""
        if not self.tokens:
            return {}
        out: Dict[str, Any] = {
            "num_tokens": self.tokens,
            "num_layers": self.num_layers,
            "avg_exit_layer": self.layers_sum / self.tokens,
            "layer_speedup": self.full_cost / self.run_cost,
        }
        if self.seconds > 0:
            out["tokens_per_s"] = self.tokens / self.seconds
        if self.full_seconds > 0 and self.seconds > 0:
            out["full_depth_tokens_per_s"] = self.full_tokens / self.full_seconds
            out["wallclock_speedup"] = self.full_seconds / self.seconds
        for name in self._SPLIT:
            if getattr(self, name) > 0:
                out[f"{name.replace('full_', 'full_depth_')}_s"] = getattr(self, name)
        return out


def _supports_exit_stats(decode: Callable[..., Any]) -> bool:
    """Decoding through attached exits (`model.generate` after `attach_exits`) reports stats."""
    return isinstance(getattr(decode, "__self__", None), AttachedExits)


class ExitEvaluator:
    """Decodes eval batches through a model method, keeping an `ExitTally` of what it did.

    A task calls `decode(model.generate, samples, ...)` (or `model.predict_answers`) where it
    would call the method directly; models without exits are called unchanged and add nothing.
    With `compare_full_depth` each batch is decoded a second time at full depth (order
    alternating between batches, so neither decoding always runs on warm caches) and only the
    early-exit outputs are returned.
    """

    def __init__(self, compare_full_depth: bool = False):
        self.compare_full_depth = bool(compare_full_depth)
        self.reset()

    def reset(self) -> None:
        self.tally = ExitTally()
        self._batches = 0

    def decode(self, decode: Callable[..., Any], *args: Any, **kwargs: Any) -> List[str]:
        if not _supports_exit_stats(decode):
            return decode(*args, **kwargs)
        kwargs["return_exit_stats"] = True
        full_first = self.compare_full_depth and self._batches % 2 == 1
        self._batches += 1
        if full_first:
            self._full_depth(decode, args, kwargs)
        outputs, stats, seconds = _timed(decode, args, kwargs)
        self.tally.add_stats(stats, seconds)
        if self.compare_full_depth and not full_first:
            self._full_depth(decode, args, kwargs)
        return outputs

    def _full_depth(self, decode: Callable[..., Any], args: Tuple, kwargs: Dict[str, Any]) -> None:
        _, stats, seconds = _timed(decode, args, {**kwargs, "early_exit": False})
        self.tally.add_full_depth(stats, seconds)

    def summary(self) -> Dict[str, Any]:
        """The figures over every rank (collective in distributed runs: call it on every rank)."""
        return ExitTally().merge(self.tally).all_reduce().summary()


def _timed(decode: Callable[..., Any], args: Tuple, kwargs: Dict[str, Any]) -> Tuple[List[str], Mapping[str, Any], float]:
    start = time.perf_counter()
    outputs, stats = decode(*args, **kwargs)
    return outputs, stats, time.perf_counter() - start


class ExitEvalTaskMixin:
    """Gives a LAVIS task exit figures. Hooks in the task: list the mixin among its bases, end
    `setup_task` with `.with_exit_eval(run_cfg)` (reads `run.compare_full_depth`), decode in
    `valid_step` through `self.exit_eval.decode(model.generate, ...)`, and add
    `self.exit_metrics` to the metrics it reports. `evaluation` (LAVIS's loop, on every rank)
    resets the tallies first and sums them over ranks at the end.

    A task that times several kinds of decoding per sample (VisDial: generating an answer and
    ranking the options) names them in `exit_decodings`, each the prefix of its figures ("" for
    generation), and decodes the others through `self.exit_evals[prefix]`."""

    exit_decodings: Tuple[str, ...] = ("",)
    headline_decoding = ""  # the decoding `headline_metric` judges (sweeps and calibration report its figures)
    exit_metrics: Dict[str, Any] = {}

    @property
    def exit_evals(self) -> Dict[str, ExitEvaluator]:
        if "_exit_evals" not in self.__dict__:
            self.reset_exit_evals(compare_full_depth=False)
        return self._exit_evals

    @property
    def exit_eval(self) -> ExitEvaluator:
        return self.exit_evals[""]

    def reset_exit_evals(self, compare_full_depth: bool) -> None:
        """Fresh tallies for every decoding, each also timed at full depth when asked."""
        self._exit_evals = {name: ExitEvaluator(compare_full_depth) for name in self.exit_decodings}

    def with_exit_eval(self, run_cfg: Mapping[str, Any]):
        compare = run_cfg.get("compare_full_depth", False)
        if not isinstance(compare, bool):
            raise ValueError(f"run.compare_full_depth must be true or false, got {compare!r}")
        self.reset_exit_evals(compare)
        return self

    def evaluation(self, model, data_loader, cuda_enabled: bool = True):
        for evaluator in self.exit_evals.values():
            evaluator.reset()
        results = super().evaluation(model, data_loader, cuda_enabled=cuda_enabled)
        self.exit_metrics = {f"{name}{key}": value for name, evaluator in self.exit_evals.items()
                             for key, value in evaluator.summary().items()}
        if self.exit_metrics:
            logging.info("exit figures: %s", json.dumps(self.exit_metrics))
        return results
