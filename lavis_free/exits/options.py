"""`ExitOptions`: THE early-exit decode options, one dataclass for every place that takes them.

A model YAML's `model.exits.inference` section, the keywords of every host's `generate` and
`predict_answers`, the evaluation settings (sweep, calibrate, oracle, `run.exit_settings`) and
the benches all read these fields, so a name is spelt once (here) and an unknown one is an error
everywhere (`check_names`).

Exits on or off is one switch, `early_exit`: False = every token runs every layer (the output
equals the host's own full-depth decoding with the same settings). Left unset it is on exactly
when an `exit_threshold` is known; per call, passing any other exit option turns it on.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional

KV_POLICIES = ("recompute", "propagate")
SOFTMAX_CONFIDENCES = ("max_prob", "margin", "entropy")  # read the exit's logits (the full head)
LEARNED = "learned"  # a confidence head on the exit's features (no head unless it fires)
CONFIDENCES = SOFTMAX_CONFIDENCES + (LEARNED,)


class ExitConfigError(ValueError):
    """A bad `exits.*` setting or early-exit option; the message names it and what is allowed."""


def fail(key: str, value: Any, allowed: str) -> None:
    raise ExitConfigError(f"{key}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class ExitOptions:
    early_exit: Optional[bool] = None  # the switch; None = on iff exit_threshold is set
    exit_threshold: Optional[float] = None  # confidence in [0, 1] a token needs to leave at an exit
    kv_policy: str = "recompute"  # how skipped layers' keys/values are filled (kv_cache.py)
    confidence: str = "max_prob"  # max_prob | margin | entropy | learned (confidence.py)
    min_exit_layer: int = 0  # decoder layers a token runs before it may leave

    @property
    def enabled(self) -> bool:
        return self.early_exit if self.early_exit is not None else self.exit_threshold is not None

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def check_names(cls, given: Mapping[str, Any], where: str, also: tuple = ()) -> None:
        """A TypeError naming the first key of `given` that is neither an exit option nor in `also`."""
        known = cls.names() + tuple(also)
        for name in given:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"{where} got an unexpected keyword argument {name!r}{hint}; early-exit options are {list(cls.names())}")

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]], num_layers: int, prefix: str = "exits.inference.") -> "ExitOptions":
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            fail(prefix + unknown[0], values[unknown[0]], f"unknown key; known keys are {', '.join(cls.names())}")
        return cls(**values).validate(num_layers, prefix)

    def override(self, **given: Any) -> "ExitOptions":
        """Per-call options over these defaults; None means "not given". Any option given other
        than `early_exit` asks for exits, so it turns them on unless `early_exit=False` is given."""
        ExitOptions.check_names(given, "early-exit options")
        given = {name: value for name, value in given.items() if value is not None}
        if given and "early_exit" not in given:
            given["early_exit"] = True
        return replace(self, **given)

    def validate(self, num_layers: int, prefix: str = "") -> "ExitOptions":
        if self.early_exit is not None and not isinstance(self.early_exit, bool):
            fail(prefix + "early_exit", self.early_exit, "expected true or false")
        threshold = self.exit_threshold
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold)
            or not 0 <= threshold <= 1
        ):
            fail(prefix + "exit_threshold", threshold, "expected a confidence in [0, 1] (early_exit=False for full depth)")
        if self.enabled and threshold is None:
            fail(prefix + "early_exit", True, "exits are on but no exit_threshold is set: pass exit_threshold= "
                 "(a confidence in [0, 1]; python -m lavis_free.evaluation.calibrate chooses one) or early_exit=False")
        if self.kv_policy not in KV_POLICIES:
            fail(prefix + "kv_policy", self.kv_policy, f"allowed values are {', '.join(KV_POLICIES)}")
        if self.confidence not in CONFIDENCES:
            fail(prefix + "confidence", self.confidence, f"allowed values are {', '.join(CONFIDENCES)}")
        layer = self.min_exit_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers:
            fail(prefix + "min_exit_layer", layer, f"expected an integer in [0, {num_layers}] (decoder layers run before an exit)")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


FULL_DEPTH = ExitOptions(early_exit=False)
