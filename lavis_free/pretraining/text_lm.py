"""Stage 0a: pretrain the OPT LM of `shapes_frozen_lm` as a plain text LM, then it is frozen.

    python -m lavis_free.pretraining.text_lm --cfg-path projects/free/shapes_stage1_frozen_lm.yaml \\
        --out output/frozen_lm/lm.pth [--images 6000 --epochs 3]

Why: BLIP-2's LM learnt its language long before it saw an image, and it stays frozen; the
Q-Former only learns to prompt it. Here the LM reads the shapes language (captions, VQA and
dialogue rounds of train-split scenes that need not be rendered) in exactly the text format
stage 1 will feed it: LAVIS's text processors, the project's `run.instructions`, and the OPT
binding's prompt-target joining (`hosts.blip2.opt_training_text`). Each text starts with the
tokenizer's BOS, as stage 1 starts its text after the image queries. A *document* is all the text
of one scene in random order, and documents are packed into blocks: so the LM sees texts at every
position offset, and what came before a BOS is another account of the same scene, which it learns
to read (a colour named earlier is the colour now). Stage 1's queries sit in that place. Packing
unrelated texts instead taught the LM that nothing before a BOS matters: stage 1 against that LM
named colours and shapes at chance after an epoch. Within one text, colour, shape, size and
position words cannot be predicted: they are where the context (the image), and depth, must help.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from types import SimpleNamespace
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from tqdm import tqdm

from lavis_free.common.config import FreeConfig
from lavis_free.datasets.shapes import iter_items
from lavis_free.datasets.shapes_language import ImageText, dialogue_context
from lavis_free.hosts.blip2 import opt_training_text
from lavis_free.models import tiny
from lavis_free.models.blip2_components import plain
from lavis_free.pretraining.components import save_component, warmup_cosine
from lavis_free.tasks.instruct import check_instructions


def task_texts(text: ImageText, instructions: Mapping[str, str]) -> List[str]:
    """An image's captions, VQA questions and dialogue rounds as stage 1 writes them for OPT."""
    caption = registry.get_processor_class("blip_caption")()
    question = registry.get_processor_class("blip_question")()
    texts = [opt_training_text(instructions["caption"], caption(c)) for c in text.captions]
    for qa in text.questions:
        answer = max(set(qa.answers), key=qa.answers.count)  # the most weighted answer, as stage 1 trains on
        texts.append(opt_training_text(instructions["vqa"].format(question(qa.question)), answer))
    history: List[tuple] = []
    for q, a in text.dialog:
        texts.append(opt_training_text(instructions["dialogue"].format(question(dialogue_context(history, q))), a))
        history.append((q, a))
    return texts


def corpus(split: str, images: int, instructions: Mapping[str, str], seed: int = 0) -> List[List[str]]:
    """One document per scene: its texts."""
    return [task_texts(item.text, instructions) for item in iter_items(seed, split, images)]


def packed_blocks(documents: Sequence[Sequence[List[int]]], block: int, rng: random.Random) -> torch.Tensor:
    """Shuffle the documents and the texts within each, concatenate and cut into [N, block] rows."""
    stream: List[int] = []
    for d in rng.sample(range(len(documents)), len(documents)):
        for t in rng.sample(range(len(documents[d])), len(documents[d])):
            stream.extend(documents[d][t])
    rows = len(stream) // block
    return torch.tensor(stream[: rows * block]).view(rows, block)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [lm_loss(model, blocks[i:i + batch_size]).item() * len(blocks[i:i + batch_size])
              for i in range(0, len(blocks), batch_size)]
    model.train()
    return sum(losses) / len(blocks)


def batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(blocks) - batch_size + 1, batch_size):
        yield blocks[i:i + batch_size]


def train_text_lm(cfg_path: str, out: str, images: int = 6000, epochs: int = 3, batch_size: int = 32,
                  block: int = 96, lr: float = 1e-3, seed: int = 0, progress: bool = True) -> Dict[str, float]:
    """Train the project's `model.opt_config` LM from random weights; write it as a component file."""
    config = FreeConfig(SimpleNamespace(cfg_path=cfg_path, options=[]))
    instructions = check_instructions(config.run_cfg.get("instructions"))
    tokenizer = tiny.load_opt_tokenizer()
    torch.manual_seed(seed)
    model = tiny.build_opt(plain(config.model_cfg.opt_config), tokenizer)

    def encode(documents: List[List[str]]) -> List[List[List[int]]]:
        return [[tokenizer(t).input_ids for t in texts] for texts in documents]  # BOS first, as in stage 1

    train = encode(corpus("train", images, instructions, seed))
    val_blocks = packed_blocks(encode(corpus("val", 200, instructions, seed)), block, random.Random(seed))
    rng = random.Random(seed)
    tokens = sum(len(t) for texts in train for t in texts)
    steps = epochs * (tokens // block // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, warmup_fraction=1 / 50)
    history = []
    start = time.time()
    model.train()
    with tqdm(total=steps, desc="text LM", disable=not progress) as bar:
        for epoch in range(epochs):
            for ids in batches(packed_blocks(train, block, rng), batch_size):
                loss = lm_loss(model, ids)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            history.append({"epoch": epoch, "val_loss": evaluate(model, val_blocks, batch_size)})
            logging.info("text LM epoch %d: val loss %.4f", epoch, history[-1]["val_loss"])
    save_component({"opt_model": model}, out)
    summary = {"documents": len(train), "texts": sum(map(len, train)), "tokens": tokens, "steps": steps, "seconds": time.time() - start,
               "val_loss": history[-1]["val_loss"], "history": history}
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.pretraining.text_lm", description=__doc__.split("\n")[0])
    parser.add_argument("--cfg-path", required=True, help="the stage-1 project YAML (its model.opt_config and run.instructions)")
    parser.add_argument("--out", required=True, help="where the LM's component file goes (.pth; a .json summary beside it)")
    parser.add_argument("--images", type=int, default=6000, help="train-split scenes whose text is read (not rendered)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block", type=int, default=96, help="tokens per packed row")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    summary = train_text_lm(args.cfg_path, args.out, args.images, args.epochs, args.batch_size, args.block, args.lr,
                            progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
