"""Stage 0b: pretrain the ViT of `shapes_frozen_lm` on its own to recognise scenes, then it is frozen.

    python -m lavis_free.pretraining.vision --cfg-path projects/free/shapes_stage1_frozen_lm.yaml \\
        --out output/frozen_lm/vision.pth [--steps 3000]

Why: BLIP-2's image encoder (EVA-CLIP) was trained long before BLIP-2, for another objective, and
stays frozen. Here the project's ViT (`model.vision`, LAVIS's EVA `VisionTransformer`) and
`ln_vision` learn a supervised scene-recognition task, the shapes analogue of ImageNet
pretraining: for each of the 3x3 grid cells, the colour, shape and size of what it holds (or
"empty"), read by a linear probe over all output tokens that is thrown away afterwards. Images are
fresh scenes drawn per step (split name "pretrain", never the train/val/test images), rendered and
processed as the dataset's `vis_processor` does (LAVIS's `blip_image_eval`).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from torch import nn
from tqdm import tqdm

from lavis_free.common.config import FreeConfig
from lavis_free.datasets.shapes_scene import COLOURS, POSITIONS, SHAPES, SIZES, Scene, render_scene, sample_scene, scene_rng
from lavis_free.models.blip2_components import OfflineBlip2, plain
from lavis_free.pretraining.components import save_component, warmup_cosine, write_summary

CELLS: Tuple[Tuple[int, int], ...] = tuple(sorted(POSITIONS))
# Per cell, one classification per attribute; class 0 is "empty".
ATTRIBUTES: Dict[str, Tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}


def scene_targets(scene: Scene) -> torch.Tensor:
    """[cells, attributes] class indices (0 = empty cell)."""
    targets = torch.zeros(len(CELLS), len(ATTRIBUTES), dtype=torch.long)
    for obj in scene.objects:
        for a, (name, values) in enumerate(ATTRIBUTES.items()):
            targets[CELLS.index(obj.cell), a] = values.index(getattr(obj, name)) + 1
    return targets


class SceneProbe(nn.Module):
    """A linear read-out of every cell's attributes from all the encoder's output tokens."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.sizes = [len(v) + 1 for v in ATTRIBUTES.values()]
        self.linear = nn.Linear(tokens * width, len(CELLS) * sum(self.sizes))

    def forward(self, features: torch.Tensor) -> List[torch.Tensor]:
        """Per attribute: logits [B, cells, classes]."""
        logits = self.linear(features.flatten(1)).view(len(features), len(CELLS), -1)
        return list(logits.split(self.sizes, dim=-1))


def scene_batch(start: int, size: int, processor, seed: int, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    scenes = [sample_scene(scene_rng(seed, split, start + i)) for i in range(size)]
    images = torch.stack([processor(render_scene(s)) for s in scenes])
    return images, torch.stack([scene_targets(s) for s in scenes])


def probe_loss(logits: List[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(l.flatten(0, 1), targets[..., a].flatten()) for a, l in enumerate(logits))


def probe_accuracy(logits: List[torch.Tensor], targets: torch.Tensor) -> Dict[str, float]:
    """Per attribute, the share of occupied cells read right (and of empty cells seen empty)."""
    occupied = targets[..., 0] > 0
    out = {name: (logits[a].argmax(-1) == targets[..., a])[occupied].float().mean().item() for a, name in enumerate(ATTRIBUTES)}
    out["empty"] = (logits[0].argmax(-1) == 0)[~occupied].float().mean().item()
    return out


def train_vision(cfg_path: str, out: str, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                 progress: bool = True) -> Dict[str, object]:
    config = FreeConfig(SimpleNamespace(cfg_path=cfg_path, options=[]))
    model_cfg = config.model_cfg
    torch.manual_seed(seed)
    encoder, ln = OfflineBlip2.init_vision_encoder(model_cfg.vit_model, model_cfg.image_size, 0.0, False, "fp32",
                                                   vision=plain(model_cfg.vision))
    processor = registry.get_processor_class("blip_image_eval").from_config(
        {"image_size": model_cfg.image_size})
    tokens = (model_cfg.image_size // model_cfg.vision.patch_size) ** 2 + 1
    probe = SceneProbe(tokens, encoder.num_features)
    params = [*encoder.parameters(), *ln.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, steps, warmup_fraction=1 / 30)
    val_images, val_targets = scene_batch(0, 512, processor, seed, "pretrain_val")
    start, history = time.time(), []
    encoder.train()
    for step in tqdm(range(steps), desc="vision", disable=not progress):
        images, targets = scene_batch(step * batch_size, batch_size, processor, seed, "pretrain")
        loss = probe_loss(probe(ln(encoder(images))), targets)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            encoder.eval()
            with torch.no_grad():
                accuracy = probe_accuracy(probe(ln(encoder(val_images))), val_targets)
            history.append({"step": step + 1, "loss": loss.item(), **accuracy})
            encoder.train()
            logging.info("vision step %d: %s", step + 1, history[-1])
    save_component({"visual_encoder": encoder, "ln_vision": ln}, out)
    summary = {"steps": steps, "images": steps * batch_size, "seconds": time.time() - start, "val": history[-1], "history": history}
    write_summary(out, summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.pretraining.vision", description=__doc__.split("\n")[0])
    parser.add_argument("--cfg-path", required=True, help="the stage-1 project YAML (its model.vision and image_size)")
    parser.add_argument("--out", required=True, help="where the ViT's component file goes (.pth; a .json summary beside it)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    summary = train_vision(args.cfg_path, args.out, args.steps, args.batch_size, args.lr, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
