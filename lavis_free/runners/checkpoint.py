"""What a plugin checkpoint holds of the model, and how it is verified when loaded.

LAVIS's runner saves only trainable parameters but resumes with a strict ``load_state_dict``,
so resuming any partly frozen model (BLIP-2's frozen ViT and LM, FREE's frozen backbone) fails.
Here a checkpoint holds the trainable parameters plus the buffers of trainable modules (a
module that owns a trainable parameter, or a sub-tree whose parameters all train), and loading
checks that exactly the frozen part is missing: a trainable key absent from the checkpoint, or a
key the model does not have, is an error that lists the keys.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _trainable_buffer_names(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        params = list(module.parameters())
        whole_subtree = bool(params) and all(p.requires_grad for p in params)
        owns_trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if whole_subtree or owns_trainable:
            for name, _ in module.named_buffers(recurse=whole_subtree):
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def trainable_keys(model: nn.Module) -> set[str]:
    """State-dict keys a checkpoint of ``model`` holds: trainable params + their modules' buffers."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    return (keys | _trainable_buffer_names(model)) & set(model.state_dict())


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that training changes."""
    keys = trainable_keys(model)
    return {k: v for k, v in model.state_dict().items() if k in keys}


def _listing(keys: set[str], limit: int = 10) -> str:
    ordered = sorted(keys)
    return ", ".join(ordered[:limit]) + (f" ... ({len(ordered)} in all)" if len(ordered) > limit else "")


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint's model state onto ``model``, verifying it matches the trainable part.

    Frozen keys may be present (then they are loaded too) or absent; trainable keys must be
    present; keys the model lacks are an error. ``source`` names the file in error messages.
    """
    model_keys = set(model.state_dict())
    unexpected = set(state) - model_keys
    if unexpected:
        raise ValueError(
            f"{source}: checkpoint has keys this model does not have (another architecture or "
            f"configuration?): {_listing(unexpected)}"
        )
    missing_trainable = trainable_keys(model) - set(state)
    if missing_trainable:
        raise ValueError(f"{source}: checkpoint lacks trainable keys of this model: {_listing(missing_trainable)}")
    result = model.load_state_dict(dict(state), strict=False)
    frozen_loaded = len(state) - len(trainable_keys(model) & set(state))
    logger.info(
        "Loaded %d tensors from %s (%d frozen keys left as they are%s)",
        len(state),
        source,
        len(result.missing_keys),
        f", {frozen_loaded} frozen keys overwritten" if frozen_loaded else "",
    )
