"""Optimizers and LR schedulers of the plugin runner, one per parameter group.

LAVIS's runner builds one AdamW over every trainable parameter. FREE's adversarial training
needs two (exits and discriminators, stepped alternately with their own schedules), so a model
may define ``optimizer_groups() -> dict[str, list[nn.Parameter]]``; without it there is one
group, ``main``, over all trainable parameters. Every group gets an AdamW with LAVIS's
weight-decay split and a LAVIS LR scheduler. Settings come from ``run.<key>`` with per-group
overrides under ``run.optim.<group>.<key>``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from lavis.common.registry import registry
from torch import nn

logger = logging.getLogger(__name__)

MAIN_GROUP = "main"

# key -> (type, default); a default of None means the key is required.
_SETTINGS: dict[str, tuple[type, Any]] = {
    "init_lr": (float, None),
    "min_lr": (float, None),
    "weight_decay": (float, None),
    "lr_sched": (str, None),
    "warmup_lr": (float, -1.0),
    "warmup_steps": (int, 0),
    "beta2": (float, 0.999),
    "lr_decay_rate": (float, 1.0),
}
OPTIM_KEYS = tuple(_SETTINGS)


@dataclass(frozen=True)
class GroupSettings:
    """Optimizer and schedule settings of one parameter group (see ``run.optim``)."""

    init_lr: float
    min_lr: float
    weight_decay: float
    lr_sched: str
    warmup_lr: float
    warmup_steps: int
    beta2: float
    lr_decay_rate: float


def _convert(key: str, value: Any, where: str) -> Any:
    kind = _SETTINGS[key][0]
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {value!r} is not a valid {kind.__name__}") from err


def group_settings(run_cfg: Mapping, group_names: list[str]) -> dict[str, GroupSettings]:
    """Resolve the settings of every group; errors name the offending ``run.*`` key."""
    overrides = run_cfg.get("optim", None) or {}
    unknown_groups = sorted(set(overrides) - set(group_names))
    if unknown_groups:
        raise ValueError(
            f"run.optim.{unknown_groups[0]}: no optimizer group of that name; "
            f"the model's groups are {sorted(group_names)}"
        )
    resolved = {}
    for group in group_names:
        group_overrides = overrides.get(group, None) or {}
        bad_keys = sorted(set(group_overrides) - set(_SETTINGS))
        if bad_keys:
            raise ValueError(f"run.optim.{group}.{bad_keys[0]}: unknown key; allowed keys: {list(OPTIM_KEYS)}")
        values = {}
        for key, (_, default) in _SETTINGS.items():
            if key in group_overrides:
                values[key] = _convert(key, group_overrides[key], f"run.optim.{group}.{key}")
            elif run_cfg.get(key, None) is not None:
                values[key] = _convert(key, run_cfg.get(key), f"run.{key}")
            elif default is not None:
                values[key] = default
            else:
                raise ValueError(f"run.{key} is required (or run.optim.{group}.{key})")
        if registry.get_lr_scheduler_class(values["lr_sched"]) is None:
            where = f"run.optim.{group}.lr_sched" if "lr_sched" in group_overrides else "run.lr_sched"
            raise ValueError(
                f"{where}: {values['lr_sched']!r} is not a registered LR scheduler; "
                f"choose one of {registry.list_lr_schedulers()}"
            )
        resolved[group] = GroupSettings(**values)
    return resolved


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{group: [(name, param)]}`` from ``model.optimizer_groups()`` or one ``main`` group.

    Every trainable parameter must be in exactly one group, and groups hold only trainable
    parameters of ``model``; anything else is an error naming the parameter.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not hasattr(model, "optimizer_groups"):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
        return {MAIN_GROUP: named}

    declared = model.optimizer_groups()
    if not isinstance(declared, Mapping) or not declared:
        raise ValueError(f"{type(model).__name__}.optimizer_groups() must return a non-empty dict of parameter lists")
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    owner: dict[int, str] = {}
    for group, params in declared.items():
        params = list(params)
        if not params:
            raise ValueError(f"optimizer group {group!r} of {type(model).__name__} is empty")
        for p in params:
            if id(p) not in names:
                raise ValueError(f"optimizer group {group!r} holds a tensor that is not a parameter of the model")
            name = names[id(p)]
            if not p.requires_grad:
                raise ValueError(f"optimizer group {group!r} holds frozen parameter {name!r} (requires_grad=False)")
            if id(p) in owner:
                raise ValueError(f"parameter {name!r} is in optimizer groups {owner[id(p)]!r} and {group!r}")
            owner[id(p)] = group
        groups[str(group)] = [(names[id(p)], p) for p in params]
    left_out = sorted(names[i] for i in trainable - set(owner))
    if left_out:
        raise ValueError(f"trainable parameters in no optimizer group: {left_out[:10]}{' ...' if len(left_out) > 10 else ''}")
    return groups


def _decays(name: str, param: nn.Parameter) -> bool:
    """LAVIS's rule: no weight decay on biases, norms and other 1-d parameters."""
    return not (param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name)


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], settings: GroupSettings) -> torch.optim.AdamW:
    """AdamW over one group, weight decay only where LAVIS applies it."""
    decay = [p for n, p in named_params if _decays(n, p)]
    no_decay = [p for n, p in named_params if not _decays(n, p)]
    param_groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, settings.weight_decay), (no_decay, 0.0))
        if params
    ]
    return torch.optim.AdamW(
        param_groups, lr=settings.init_lr, weight_decay=settings.weight_decay, betas=(0.9, settings.beta2)
    )


def build_scheduler(optimizer: torch.optim.Optimizer, settings: GroupSettings, max_epoch: int) -> Any:
    """The registered LAVIS scheduler ``settings.lr_sched`` driving ``optimizer``."""
    scheduler_cls = registry.get_lr_scheduler_class(settings.lr_sched)
    return scheduler_cls(
        optimizer=optimizer,
        max_epoch=max_epoch,
        min_lr=settings.min_lr,
        init_lr=settings.init_lr,
        decay_rate=settings.lr_decay_rate,
        warmup_start_lr=settings.warmup_lr,
        warmup_steps=settings.warmup_steps,
    )


def scheduler_state(scheduler: Any) -> dict:
    """A scheduler's state: ``state_dict()`` if it has one, else its attributes but the optimizer.

    LAVIS's schedulers compute the LR from (epoch, step) and keep only their settings.
    """
    if hasattr(scheduler, "state_dict"):
        return scheduler.state_dict()
    return {k: v for k, v in vars(scheduler).items() if k != "optimizer"}


def load_scheduler_state(scheduler: Any, state: Optional[dict]) -> dict[str, tuple[Any, Any]]:
    """Restore what :func:`scheduler_state` saved; returns settings that differ, for a warning.

    A scheduler with ``load_state_dict`` gets its state back. LAVIS's schedulers hold nothing
    but settings from the config; there the current config wins (a resumed run may extend
    ``max_epoch``), and the differences ``{name: (saved, current)}`` are returned.
    """
    if not state:
        return {}
    if hasattr(scheduler, "load_state_dict"):
        scheduler.load_state_dict(state)
        return {}
    return {k: (v, getattr(scheduler, k, None)) for k, v in state.items() if getattr(scheduler, k, None) != v}
