"""LAVIS's `Config`, with `--options model.model_type=X` honoured.

LAVIS 1.0.2 looks the override up as a flat key ("model.model_type") in options it has already
nested ({"model": {"model_type": X}}), so it never matches: the project file's type keeps
choosing the default model YAML, and only the type's name changes. A user then evaluates the
architecture and weights of another type without any error.
"""
from __future__ import annotations

from typing import Any

from lavis.common.config import Config
from omegaconf import OmegaConf


class FreeConfig(Config):
    @staticmethod
    def build_model_config(config: Any, **kwargs: Any) -> Any:
        model_type = (kwargs.get("model") or {}).get("model_type")
        if model_type:
            config = OmegaConf.merge(config, {"model": {"model_type": model_type}})
        return Config.build_model_config(config, **kwargs)
