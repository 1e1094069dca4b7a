"""LAVIS's own model classes, built offline from a plugin model's parts.

Why: LAVIS 1.0.2's `Blip2OPT.__init__` / `Blip2T5.__init__` download their components, so a
LAVIS instance cannot be built here. `as_lavis_model(model)` gives an instance of the plugin
model's LAVIS class (`Blip2OPT` for `blip2_opt_free`, `Blip2T5` for `blip2_t5_free`) holding
copies of its components, with the LM turned back into LAVIS's own class (`modeling_opt` /
`modeling_t5`, whose `generate` drops its KV cache, as shipped), and none of the plugin's
attachments. It is what a user who built `Blip2OPT` from the hub holds, so `attach_exits` and
"LAVIS as shipped" benchmarks can be run and tested on it offline:

    python -m lavis_free.models.lavis_parts --model blip2_opt_free --model-type shapes_tiny
"""
from __future__ import annotations

import argparse
import copy
from typing import Optional, Sequence

import torch
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from lavis.models.blip2_models.modeling_opt import OPTForCausalLM
from lavis.models.blip2_models.modeling_t5 import T5ForConditionalGeneration
from torch import nn

# plugin attributes that are not LAVIS's: left out of the LAVIS instance
PLUGIN_ATTRIBUTES = {"early_exits", "exit_layers", "free_exits", "generate", "predict_answers", "load_checkpoint",
                     "load_from_pretrained", "optimizer_groups"}
LAVIS_LMS = {Blip2OPT: ("opt_model", OPTForCausalLM), Blip2T5: ("t5_model", T5ForConditionalGeneration)}


def lavis_class(model: nn.Module) -> type:
    for cls in type(model).__mro__:
        if cls in LAVIS_LMS:
            return cls
    raise TypeError(f"{type(model).__name__} is not a subclass of one of {[c.__name__ for c in LAVIS_LMS]}")


def as_lavis_model(model: nn.Module) -> nn.Module:
    """A LAVIS `Blip2OPT` / `Blip2T5` with copies of `model`'s components and LAVIS's own LM class."""
    cls = lavis_class(model)
    lavis = cls.__new__(cls)
    nn.Module.__init__(lavis)
    for name, value in vars(model).items():
        if name in ("_modules", "_parameters", "_buffers"):
            continue
        if not name.startswith("_") and name not in PLUGIN_ATTRIBUTES:
            setattr(lavis, name, copy.deepcopy(value))
    for name, child in model.named_children():
        if name not in PLUGIN_ATTRIBUTES:
            setattr(lavis, name, copy.deepcopy(child))
    for name, param in model.named_parameters(recurse=False):
        setattr(lavis, name, copy.deepcopy(param))
    lm_name, lm_class = LAVIS_LMS[cls]
    getattr(lavis, lm_name).__class__ = lm_class
    if hasattr(model, "_apply_lemmatizer"):
        lavis._apply_lemmatizer, lavis._lemmatizer = model._apply_lemmatizer, None
    return lavis.eval()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Builds a plugin model, makes LAVIS's own class from its parts, attaches the plugin
    model's exits to it with `attach_exits`, and decodes a few shapes images both ways."""
    import lavis_free
    from lavis_free.hosts import attach_exits, exits_of

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="blip2_opt_free")
    parser.add_argument("--model-type", default=None)
    args = parser.parse_args(argv)
    model = lavis_free.load_model(args.model, args.model_type)
    lavis = as_lavis_model(model)
    print(f"LAVIS instance: {type(lavis).__module__}.{type(lavis).__name__}, LM {type(getattr(lavis, LAVIS_LMS[type(lavis)][0])).__module__}")
    attach_exits(lavis, exits_of(model).config)
    if model.early_exits is not None:
        lavis.early_exits.load_state_dict(model.early_exits.state_dict())
    images = torch.randn(2, 3, *model.visual_encoder.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    full = lavis.generate({"image": images}, num_beams=1, max_length=20, early_exit=False)
    own = type(lavis).generate(lavis, {"image": images}, num_beams=1, max_length=20)
    print("LAVIS's own generate:        ", own)
    print("attached, early_exit=False:  ", full)
    if model.early_exits is not None:
        texts, stats = lavis.generate({"image": images}, num_beams=1, max_length=20, return_exit_stats=True)
        layers = [sum(row) / len(row) for row in stats["exit_layers"]]
        print("attached, exits on:          ", texts, "layers run per token:", [round(x, 2) for x in layers])


if __name__ == "__main__":
    main()
