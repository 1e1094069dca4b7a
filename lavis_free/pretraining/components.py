"""Component weight files of stage 0, their merge into one `model.pretrained` checkpoint, and the
learning-rate schedule the stage-0 trainers share.

A component file is ``{"model": state dict}`` whose keys carry the host's attribute prefix
(``opt_model.``, ``visual_encoder.``, ``ln_vision.``), so LAVIS's `load_checkpoint` (strict=False)
puts each tensor where BLIP-2 keeps it and the stage-1 model needs no special loading.

    python -m lavis_free.pretraining.components --out PRETRAINED.pth LM.pth VISION.pth
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from lavis_free.common.safe_load import load_torch_file


def save_state(state: Dict[str, torch.Tensor], path: str) -> None:
    """Write a component file: ``{"model": state}``, creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": state}, path)


def save_component(modules: Dict[str, nn.Module], path: str) -> None:
    """Write the modules' float32 state dicts under their attribute names as key prefixes."""
    save_state({f"{prefix}.{key}": value.detach().float().clone() if value.is_floating_point() else value
                for prefix, module in modules.items() for key, value in module.state_dict().items()}, path)


def write_summary(path: str, summary: Dict[str, object]) -> None:
    """The stage's figures (timing, validation history) as JSON beside its component file."""
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=1)


def merge_components(paths: Sequence[str], out: str) -> int:
    """One checkpoint holding every component; a key in two files is an error. Returns the key count."""
    merged: Dict[str, torch.Tensor] = {}
    for path in paths:
        state = load_torch_file(path, "component file")
        state = state.get("model", state)
        clash = sorted(set(merged) & set(state))
        if clash:
            raise ValueError(f"{path}: keys already given by an earlier component file: {clash[:5]}")
        merged.update(state)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save({"model": merged}, out)
    return len(merged)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage-0 schedule: linear warm-up over `warmup_fraction` of the steps, then cosine decay to zero."""
    warmup = max(1, int(steps * warmup_fraction))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.pretraining.components", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the merged checkpoint (model.pretrained of stage 1)")
    parser.add_argument("components", nargs="+", help="component files written by text_lm / vision")
    args = parser.parse_args(argv)
    print(f"wrote {args.out}: {merge_components(args.components, args.out)} tensors")


if __name__ == "__main__":
    main()
