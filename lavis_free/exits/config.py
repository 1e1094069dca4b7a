"""Exit configuration: where exits sit, how they are built and trained, how they decode.

Every field is validated when the config is built, so a typo in a project YAML fails at load
time with the key's full path and the allowed values, not deep inside training.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

EXIT_INITS = ("last", "next", "random")
EXIT_LAYOUTS = ("free", "no_adversarial", "vanilla")
LOSS_MODES = ("supervised", "distill", "pseudo")
KV_POLICIES = ("recompute", "propagate")
CONFIDENCES = ("max_prob", "margin", "entropy")


class ExitConfigError(ValueError):
    """A bad `exits.*` setting; the message names the key and what is allowed."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ExitConfigError(f"exits.{key}={value!r} is invalid: {allowed}")


def _choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        _fail(key, value, f"allowed values are {', '.join(allowed)}")
    return value


def _number(key: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        _fail(key, value, f"expected a number in [{low}, {high}]")
    return float(value)


def validate_exit_threshold(value: Any, key: str = "inference.exit_threshold") -> float:
    """A threshold is a confidence in [0, 1]; any value above 1 disables exits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        _fail(key, value, "expected a number >= 0 (confidences lie in [0, 1]; above 1 disables exits)")
    return float(value)


def validate_min_exit_layer(value: Any, num_layers: int, key: str = "inference.min_exit_layer") -> int:
    """The fewest decoder layers a token must run before it may leave at an exit."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= num_layers:
        _fail(key, value, f"expected an integer in [0, {num_layers}] (decoder layers run before an exit)")
    return value


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
class InferenceConfig:
    """Defaults of the early-exit decoder; every field can be overridden per `generate` call."""

    exit_threshold: float = 2.0
    kv_policy: str = "recompute"
    confidence: str = "max_prob"
    min_exit_layer: int = 0

    def validate(self, num_layers: int) -> "InferenceConfig":
        validate_exit_threshold(self.exit_threshold)
        _choice("inference.kv_policy", self.kv_policy, KV_POLICIES)
        _choice("inference.confidence", self.confidence, CONFIDENCES)
        validate_min_exit_layer(self.min_exit_layer, num_layers)
        return self


@dataclass(frozen=True)
class ExitConfig:
    """Exit k sits after decoder layer `layers[k]` (0-based) and reads that layer's output."""

    layers: tuple = ()
    init: str = "last"
    layout: str = "free"
    disc_hidden: int = 256
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

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
        inference = dict(cfg.pop("inference", None) or {})
        for section, fields in (("loss", LossConfig), ("inference", InferenceConfig)):
            names = set(fields.__dataclass_fields__)
            extra = sorted(set(loss if section == "loss" else inference) - names)
            if extra:
                _fail(f"{section}.{extra[0]}", "?", f"unknown key; known keys are {', '.join(sorted(names))}")
        layers = cfg.pop("layers", ())
        config = cls(
            layers=tuple(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else layers,
            loss=LossConfig(**loss),
            inference=InferenceConfig(**inference),
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
        self.inference.validate(num_layers)
        return self

    def layout_signature(self) -> dict:
        """What a checkpoint must agree on to load onto this model."""
        return {"layers": list(self.layers), "layout": self.layout}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = list(self.layers)
        return out
