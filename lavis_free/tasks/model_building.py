"""The YAML path to exits on LAVIS's own models: `model.arch: blip2_opt` (or `blip2_t5`, or any
class with a host binding) plus a `model.exits` section.

LAVIS's tasks build the model from `model.arch` (`BaseTask.build_model`); the plugin's tasks do
the same, then attach the exits the section describes and load `model.exits_checkpoint` onto
them. The plugin's own models (`blip2_opt_free`, `blip2_t5_free`) attach their exits in
`__init__`, so they pass through unchanged. LAVIS's loading of `model.pretrained` /
`model.finetuned` runs with `weights_only=True` forced, as the plugin's own does.
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from torch import nn

from lavis_free.common.safe_load import forced_weights_only
from lavis_free.hosts import attach_exits, exits_of
from lavis_free.models.blip2_components import resolve_checkpoint


class AttachExitsMixin:
    """First base of a plugin task: `build_model` attaches `model.exits` to LAVIS's models."""

    def build_model(self, cfg: Any) -> nn.Module:
        with forced_weights_only():
            model = super().build_model(cfg)
        if exits_of(model) is not None:
            return model
        model_cfg = cfg.model_cfg
        exits = model_cfg.get("exits")
        if exits is None:  # a LAVIS model and no exits asked for: LAVIS's model, untouched
            if model_cfg.get("exits_checkpoint"):
                raise ValueError(
                    f"model.exits_checkpoint={model_cfg.get('exits_checkpoint')!r} is set but model.exits is not: "
                    f"add the model.exits section the checkpoint's exits were trained with (arch {model_cfg.arch})"
                )
            return model
        attach_exits(model, OmegaConf.to_container(exits, resolve=True) if OmegaConf.is_config(exits) else exits)
        path = model_cfg.get("exits_checkpoint")
        if path:
            model.load_checkpoint(resolve_checkpoint(path, "exits_checkpoint"), origin="model.exits_checkpoint")
        return model
