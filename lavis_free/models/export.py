"""Export a stage-1 runner checkpoint as shippable model weights (model only, fp16).

    python -m lavis_free.models.export --checkpoint output/shapes_stage1/JOB/checkpoint_best.pth \\
        --out lavis_free/models/assets/shapes_tiny/blip2_opt_free_shapes_tiny.pth

Why: a runner checkpoint also holds optimizer state and config (about 3x the weights); the
package ships only `{"model": state_dict}` in float16 (half the size; LAVIS's `load_checkpoint`
copies it back into the float32 parameters). The checkpoint must cover every tensor of the
model type's architecture, so a partial export is an error. A stage 1 that froze components
(BLIP-2's recipe: `shapes_frozen_lm`) saves only what trained; ``--base`` names the file(s) the
frozen components came from (the stage's `model.pretrained`), and the checkpoint's tensors are
laid over them.
"""
import argparse
import logging
import os
from typing import Dict, Optional, Sequence, Set

import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_free  # noqa: F401  (registers blip2_opt_free)
from lavis_free.common.safe_load import load_torch_file


def _tied_aliases(state: Dict[str, torch.Tensor]) -> Set[str]:
    """Keys whose tensor is the same storage as an earlier key's (e.g. OPT's lm_head, tied to
    the input embeddings): runner checkpoints hold each parameter once, under its first name."""
    seen: Set[int] = set()
    aliases = set()
    for key, value in state.items():
        if value.data_ptr() in seen:
            aliases.add(key)
        seen.add(value.data_ptr())
    return aliases


def export_weights(
    checkpoint: str, out: str, name: str = "blip2_opt_free", model_type: str = "tiny", base: Sequence[str] = ()
) -> Dict[str, int]:
    """Write `{"model": fp16 state dict}` of `base` files overlaid by `checkpoint` to `out`;
    returns tensor/byte counts."""
    state: Dict[str, torch.Tensor] = {}
    for path, origin in [*((b, "--base") for b in base), (checkpoint, "--checkpoint")]:
        loaded = load_torch_file(path, origin)
        state.update(loaded.get("model", loaded))
    model_cls = registry.get_model_class(name)
    # the type's architecture only: none of its weights (they may be what is being exported) nor exits
    cfg = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(model_type)).model,
                          {"load_finetuned": False, "pretrained": "", "exits": None, "exits_checkpoint": ""})
    model = model_cls.from_config(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - _tied_aliases(expected))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not match {name}/{model_type}: missing {missing[:8]} "
            f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})"
        )
    model.load_state_dict(state, strict=False)
    weights = {
        key: value.half() if value.is_floating_point() else value
        for key, value in model.state_dict().items()
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save({"model": weights}, out)
    return {"tensors": len(weights), "bytes": os.path.getsize(out)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_free.models.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="runner checkpoint (.pth)")
    parser.add_argument("--out", required=True, help="where the model-only fp16 weights go")
    parser.add_argument("--model", default="blip2_opt_free", help="registered LAVIS model name")
    parser.add_argument("--model-type", default="tiny", help="type whose architecture the weights fit")
    parser.add_argument("--base", nargs="*", default=[], help="weights of components the checkpoint lacks because "
                        "stage 1 froze them (its model.pretrained); the checkpoint's tensors win")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    info = export_weights(args.checkpoint, args.out, args.model, args.model_type, args.base)
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['bytes'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
