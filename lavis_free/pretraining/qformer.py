"""Stage 0c: BLIP-2's representation stage in miniature: the Q-Former learns to write the scene
where the frozen LM reads it.

    python -m lavis_free.pretraining.qformer --cfg-path projects/free/shapes_stage1_frozen_lm.yaml \\
        --pretrained output/frozen_lm/vision_lm.pth --out output/frozen_lm/qformer.pth [--steps 2000]

Why: BLIP-2 trains its Q-Former in two stages, first against the frozen image encoder alone
(image-text contrast, matching and image-grounded generation), then against the frozen LM;
without the first, the LM stage learns slowly and worse (BLIP-2, section 4.5). Measured here:
trained against the frozen 12-layer OPT from random weights, the Q-Former named the right colour
in 41% of val captions after two epochs, while the frozen ViT under it reads every cell's colour,
shape and size at 99.9-100% (`vision`). The text LM (`text_lm`) learnt to read a scene written in
words at the query positions; here the query outputs, projected into the LM's input space
(`opt_proj`), learn to match the LM's input embeddings of that scene prefix position by position
(mean squared error), from images alone. Stage 1 starts from the Q-Former, query tokens and
projection this writes. Images are fresh scenes (split "pretrain_qformer").
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from types import SimpleNamespace
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from omegaconf import OmegaConf
from tqdm import tqdm

from lavis_free.common.config import FreeConfig
from lavis_free.hosts.blip2 import image_queries
from lavis_free.datasets.shapes_scene import render_scene, sample_scene, scene_rng
from lavis_free.pretraining.components import save_state, warmup_cosine, write_summary
from lavis_free.pretraining.text_lm import prefix_ids, scene_prefix


def prefix_batch(start: int, size: int, processor, tokenizer, length: int, seed: int, split: str):
    """Rendered scenes and their prefix token ids [B, length]."""
    scenes = [sample_scene(scene_rng(seed, split, start + i)) for i in range(size)]
    images = torch.stack([processor(render_scene(s)) for s in scenes])
    return images, torch.tensor([prefix_ids(tokenizer, scene_prefix(s), length) for s in scenes])


def train_qformer(cfg_path: str, pretrained: str, out: str, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
                  seed: int = 0, progress: bool = True) -> Dict[str, object]:
    """Train the Q-Former, query tokens and projection over the frozen ViT and LM of `pretrained`."""
    config = FreeConfig(SimpleNamespace(cfg_path=cfg_path, options=[]))
    model_cfg = OmegaConf.merge(config.model_cfg, {"load_finetuned": False, "pretrained": pretrained, "exits": None})
    torch.manual_seed(seed)
    model = registry.get_model_class(model_cfg.arch).from_config(model_cfg)
    model.ln_vision.requires_grad_(False)
    processor = registry.get_processor_class("blip_image_eval").from_config({"image_size": model_cfg.image_size})
    length = model.query_tokens.shape[1]
    embeddings = model.opt_model.get_input_embeddings()
    params = [*model.Qformer.parameters(), model.query_tokens, *model.opt_proj.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, steps, warmup_fraction=1 / 30)

    def written(images):
        return image_queries(model, images, model.opt_proj)[0]

    def token_accuracy(queries, ids):
        """Share of prefix words (not padding) whose nearest input embedding (L2) is the word itself."""
        nearest = torch.cdist(queries, embeddings.weight[None].expand(len(queries), -1, -1)).argmin(-1)
        words = ids != model.opt_tokenizer.pad_token_id
        return (nearest == ids)[words].float().mean().item()

    val_images, val_ids = prefix_batch(0, 512, processor, model.opt_tokenizer, length, seed, "pretrain_qformer_val")
    start, history = time.time(), []
    model.Qformer.train()
    for step in tqdm(range(steps), desc="Q-Former", disable=not progress):
        images, ids = prefix_batch(step * batch_size, batch_size, processor, model.opt_tokenizer, length, seed, "pretrain_qformer")
        with torch.no_grad():
            target = embeddings(ids)
        loss = F.mse_loss(written(images), target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            model.Qformer.eval()
            with torch.no_grad():
                accuracy = token_accuracy(written(val_images), val_ids)
            model.Qformer.train()
            history.append({"step": step + 1, "loss": loss.item(), "prefix_word_accuracy": accuracy})
            logging.info("Q-Former step %d: %s", step + 1, history[-1])
    state = {f"{prefix}.{k}": v.detach().clone() for prefix, module in (("Qformer", model.Qformer), ("opt_proj", model.opt_proj))
             for k, v in module.state_dict().items()}
    state["query_tokens"] = model.query_tokens.detach().clone()
    save_state(state, out)
    summary = {"steps": steps, "images": steps * batch_size, "seconds": time.time() - start, "val": history[-1], "history": history}
    write_summary(out, summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.pretraining.qformer", description=__doc__.split("\n")[0])
    parser.add_argument("--cfg-path", required=True, help="the stage-1 project YAML (its model sections)")
    parser.add_argument("--pretrained", required=True, help="the merged ViT and LM component files (lavis_free.pretraining.components)")
    parser.add_argument("--out", required=True, help="where the Q-Former's component file goes (.pth; a .json summary beside it)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    summary = train_qformer(args.cfg_path, args.pretrained, args.out, args.steps, args.batch_size, args.lr, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
