"""`lavis_free.load_model`: LAVIS's `load_model` with a sensible default model type.

Why: LAVIS requires a model type; a newcomer on an offline CPU machine should get a model that
works there (`shapes_frozen_lm` when its weights are shipped, else the random `tiny`) from
`lavis_free.load_model()` alone.
"""
from typing import Optional

import torch.nn as nn
from lavis.common.registry import registry
from lavis.models import load_model as lavis_load_model


def _model_class(name: str) -> type:
    model_cls = registry.get_model_class(name)
    if model_cls is None:
        raise ValueError(f"Unknown model {name!r}; registered models: {registry.list_models()}")
    return model_cls


def default_model_type(name: str) -> str:
    """The default type of model `name`: its `default_model_type()` if it has one."""
    model_cls = _model_class(name)
    if not hasattr(model_cls, "default_model_type"):
        raise ValueError(
            f"Model {name!r} has no default type; pass model_type, one of "
            f"{sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT)}"
        )
    return model_cls.default_model_type()


def load_model(
    name: str = "blip2_opt_free",
    model_type: Optional[str] = None,
    is_eval: bool = True,
    device: str = "cpu",
    checkpoint: Optional[str] = None,
) -> nn.Module:
    """`lavis.models.load_model` (weights per the type's YAML, then `checkpoint` if given);
    `model_type=None` picks `default_model_type(name)`. An unknown type lists the valid ones."""
    _model_class(name)
    model_type = model_type or default_model_type(name)
    return lavis_load_model(
        name, model_type, is_eval=is_eval, device=device, checkpoint=checkpoint
    )
