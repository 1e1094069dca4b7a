"""Exit configuration: where exits sit, how they are built and trained, how they decode.

Every field is validated when the config is built, so a typo in a project YAML fails at load
time with the key's full path and the allowed values, not deep inside training.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

from lavis_free.exits.options import CONFIDENCES, KV_POLICIES, ExitConfigError, ExitOptions, fail

EXIT_INITS = ("last", "next", "random")
EXIT_LAYOUTS = ("free", "no_adversarial", "vanilla")
LOSS_MODES = ("supervised", "distill", "pseudo")
__all__ = ["CONFIDENCES", "KV_POLICIES", "ExitConfig", "ExitConfigError", "LossConfig"]


def _fail(key: str, value: Any, allowed: str) -> None:
    fail(f"exits.{key}", value, allowed)


def _choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        _fail(key, value, f"allowed values are {', '.join(allowed)}")
    return value


def _number(key: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        _fail(key, value, f"expected a number in [{low}, {high}]")
    return float(value)


@dataclass(frozen=True)
class LossConfig:
    """How exits are trained (FREE: token loss + adversarial loss against a feature classifier)."""

    mode: str = "supervised"
    token_weight: float = 1.0
    adv_weight: float = 0.1
    kd_temperature: float = 1.0
    disc_steps: int = 1

    def validate(self) -> "LossConfig":
        _choice("loss.mode", self.mode, LOSS_MODES)
        _number("loss.token_weight", self.token_weight, 0.0)
        _number("loss.adv_weight", self.adv_weight, 0.0)
        _number("loss.kd_temperature", self.kd_temperature, 1e-3)
        if isinstance(self.disc_steps, bool) or not isinstance(self.disc_steps, int) or self.disc_steps < 1:
            _fail("loss.disc_steps", self.disc_steps, "expected an integer >= 1")
        return self


@dataclass(frozen=True)
class ExitConfig:
    """Exit k sits after decoder layer `layers[k]` (0-based) and reads that layer's output."""

    layers: tuple = ()
    init: str = "last"
    layout: str = "free"
    disc_hidden: int = 256
    loss: LossConfig = field(default_factory=LossConfig)
    inference: ExitOptions = field(default_factory=ExitOptions)  # decode defaults (options.py)

    @property
    def enabled(self) -> bool:
        return len(self.layers) > 0

    @property
    def adversarial(self) -> bool:
        return self.layout == "free" and self.loss.adv_weight > 0

    @classmethod
    def from_dict(cls, cfg: Optional[Mapping[str, Any]], num_layers: int) -> "ExitConfig":
        """Builds and validates from a YAML mapping (`model.exits`); None means no exits."""
        cfg = dict(cfg or {})
        known = {"layers", "init", "layout", "disc_hidden", "loss", "inference"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            _fail(unknown[0], cfg[unknown[0]], f"unknown key; known keys are {', '.join(sorted(known))}")
        loss = dict(cfg.pop("loss", None) or {})
        names = set(LossConfig.__dataclass_fields__)
        extra = sorted(set(loss) - names)
        if extra:
            _fail(f"loss.{extra[0]}", "?", f"unknown key; known keys are {', '.join(sorted(names))}")
        inference = ExitOptions.from_dict(cfg.pop("inference", None), num_layers)
        layers = cfg.pop("layers", ())
        config = cls(
            layers=tuple(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else layers,
            loss=LossConfig(**loss),
            inference=inference,
            **cfg,
        )
        return config.validate(num_layers)

    def validate(self, num_layers: int) -> "ExitConfig":
        if not isinstance(self.layers, tuple) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in self.layers
        ):
            _fail("layers", self.layers, "expected a list of decoder layer indices (integers)")
        last = num_layers - 1
        for layer in self.layers:
            if not 0 <= layer < last:
                _fail(
                    "layers",
                    list(self.layers),
                    f"each exit layer must be in [0, {last - 1}] (0-based; the last layer {last} "
                    f"is the model's own output)",
                )
        if list(self.layers) != sorted(set(self.layers)):
            _fail("layers", list(self.layers), "exit layers must be sorted and unique")
        _choice("init", self.init, EXIT_INITS)
        _choice("layout", self.layout, EXIT_LAYOUTS)
        if isinstance(self.disc_hidden, bool) or not isinstance(self.disc_hidden, int) or self.disc_hidden < 1:
            _fail("disc_hidden", self.disc_hidden, "expected a positive integer")
        self.loss.validate()
        self.inference.validate(num_layers, "exits.inference.")
        return self

    def layout_signature(self) -> dict:
        """What a checkpoint must agree on to load onto this model."""
        return {"layers": list(self.layers), "layout": self.layout}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = list(self.layers)
        return out
