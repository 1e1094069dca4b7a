"""Stage 0a: pretrain the OPT LM of `shapes_frozen_lm` as a plain text LM, then it is frozen.

    python -m lavis_free.pretraining.text_lm --cfg-path projects/free/shapes_stage1_frozen_lm.yaml \\
        --out output/frozen_lm/lm.pth [--images 6000 --epochs 2]

Why: BLIP-2's LM learnt its language long before it saw an image, and it stays frozen; the
Q-Former only learns to prompt it. Here the LM reads the shapes language (captions, VQA and
dialogue rounds of train-split scenes that need not be rendered) in exactly the text format
stage 1 will feed it: LAVIS's text processors, the project's `run.instructions`, and the OPT
binding's prompt-target joining (`hosts.blip2.opt_training_text`).

Rows are laid out as stage 1 lays out its LM input: first `num_query_token` positions of *scene
prefix*, where stage 1 puts the image queries, then texts, each from the tokenizer's BOS. The
prefix is the scene written out in words ("small red circle top left large blue star right"),
padded with the pad token; it is context, never a target. What follows is texts of that same
scene in random order (a scene's texts fill as many rows as they need, each with the prefix).
So the frozen LM has learnt to read a scene from those positions, and stage 0c
(`lavis_free.pretraining.qformer`) teaches the Q-Former to write the scene there; at inference
only the image is given. Two simpler LMs failed stage 1 (captions named colours and shapes at
chance after an epoch): packing unrelated texts taught it that nothing before a BOS matters, and
packing texts of one scene without the prefix left the queries too hard to learn to fill.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from types import SimpleNamespace
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from tqdm import tqdm

from lavis_free.common.config import FreeConfig
from lavis_free.datasets.shapes import iter_items
from lavis_free.datasets.shapes_language import ImageText, dialogue_context
from lavis_free.datasets.shapes_scene import Scene
from lavis_free.exits.lm_batch import IGNORE_INDEX
from lavis_free.hosts.blip2 import opt_training_text
from lavis_free.models import tiny
from lavis_free.models.blip2_components import plain
from lavis_free.pretraining.components import save_component, warmup_cosine, write_summary
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


def scene_prefix(scene: Scene) -> str:
    """The scene in words, object by object in reading order: "size colour shape position"."""
    return " ".join(f"{o.size} {o.colour} {o.shape} {o.position}" for o in scene.objects)


def corpus(split: str, images: int, instructions: Mapping[str, str], seed: int = 0) -> List[Tuple[str, List[str]]]:
    """One document per scene: its prefix and its texts."""
    return [(scene_prefix(item.scene), task_texts(item.text, instructions)) for item in iter_items(seed, split, images)]


def prefix_ids(tokenizer, prefix: str, length: int) -> List[int]:
    """The prefix's tokens right-padded with the pad token to `length` (the query count)."""
    ids = tokenizer(prefix, add_special_tokens=False).input_ids
    if len(ids) > length:
        raise ValueError(f"scene prefix {prefix!r} has {len(ids)} tokens, more than the {length} query positions")
    return ids + [tokenizer.pad_token_id] * (length - len(ids))


def document_rows(documents: Sequence[Tuple[List[int], List[List[int]]]], block: int, pad_id: int,
                  rng: random.Random) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels) [N, block]: each row a document's prefix, then as many of its
    texts (shuffled) as fit; the documents shuffled. Prefix and end padding are not targets; the
    end padding is masked out."""
    rows = []
    for d in rng.sample(range(len(documents)), len(documents)):
        prefix, texts = documents[d]
        row: List[int] = []
        for t in rng.sample(range(len(texts)), len(texts)):
            if len(prefix) + len(texts[t]) > block:
                raise ValueError(f"--block {block} cannot hold a {len(prefix)}-token prefix and a {len(texts[t])}-token text")
            if len(prefix) + len(row) + len(texts[t]) > block:
                rows.append((prefix, row))
                row = []
            row = row + texts[t]
        rows.append((prefix, row))
    ids = torch.full((len(rows), block), pad_id)
    mask = torch.zeros(len(rows), block, dtype=torch.long)
    labels = torch.full((len(rows), block), IGNORE_INDEX)
    for i, (prefix, row) in enumerate(rows):
        n, end = len(prefix), len(prefix) + len(row)
        ids[i, :n], ids[i, n:end] = torch.tensor(prefix), torch.tensor(row)
        mask[i, :end] = 1
        labels[i, n:end] = torch.tensor(row)
    return ids, mask, labels


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: Tuple[torch.Tensor, ...], batch_size: int) -> float:
    model.eval()
    losses = [lm_loss(model, *batch).item() * len(batch[0]) for batch in batches(rows, batch_size, keep_last=True)]
    model.train()
    return sum(losses) / len(rows[0])


def batches(rows: Tuple[torch.Tensor, ...], batch_size: int, keep_last: bool = False) -> Iterator[Tuple[torch.Tensor, ...]]:
    end = len(rows[0]) if keep_last else len(rows[0]) - batch_size + 1
    for i in range(0, end, batch_size):
        yield tuple(r[i:i + batch_size] for r in rows)


def train_text_lm(cfg_path: str, out: str, images: int = 6000, epochs: int = 2, batch_size: int = 32,
                  block: int = 96, lr: float = 1e-3, seed: int = 0, progress: bool = True) -> Dict[str, float]:
    """Train the project's `model.opt_config` LM from random weights; write it as a component file."""
    config = FreeConfig(SimpleNamespace(cfg_path=cfg_path, options=[]))
    instructions = check_instructions(config.run_cfg.get("instructions"))
    tokenizer = tiny.load_opt_tokenizer()
    torch.manual_seed(seed)
    model = tiny.build_opt(plain(config.model_cfg.opt_config), tokenizer)

    length = config.model_cfg.num_query_token

    def encode(documents: List[Tuple[str, List[str]]]) -> List[Tuple[List[int], List[List[int]]]]:
        # texts start with BOS, as stage 1's text after the queries
        return [(prefix_ids(tokenizer, p, length), [tokenizer(t).input_ids for t in texts]) for p, texts in documents]

    train = encode(corpus("train", images, instructions, seed))
    val_rows = document_rows(encode(corpus("val", 200, instructions, seed)), block, tokenizer.pad_token_id, random.Random(seed))
    rng = random.Random(seed)
    tokens = sum(len(t) for _, texts in train for t in texts)
    # rows per epoch vary a little with the shuffle; the schedule holds its last value past `steps`
    steps = epochs * (len(document_rows(train, block, tokenizer.pad_token_id, random.Random(seed))[0]) // batch_size)
    if steps == 0:
        raise ValueError(f"--images {images} make fewer rows than one batch of --batch-size {batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, warmup_fraction=1 / 50)
    history = []
    start = time.time()
    model.train()
    with tqdm(total=steps, desc="text LM", disable=not progress) as bar:
        for epoch in range(epochs):
            for batch in batches(document_rows(train, block, tokenizer.pad_token_id, rng), batch_size):
                loss = lm_loss(model, *batch)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            history.append({"epoch": epoch, "val_loss": evaluate(model, val_rows, batch_size)})
            logging.info("text LM epoch %d: val loss %.4f", epoch, history[-1]["val_loss"])
    save_component({"opt_model": model}, out)
    summary = {"documents": len(train), "texts": sum(len(texts) for _, texts in train), "tokens": tokens, "steps": steps, "seconds": time.time() - start,
               "val_loss": history[-1]["val_loss"], "history": history}
    write_summary(out, summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.pretraining.text_lm", description=__doc__.split("\n")[0])
    parser.add_argument("--cfg-path", required=True, help="the stage-1 project YAML (its model.opt_config and run.instructions)")
    parser.add_argument("--out", required=True, help="where the LM's component file goes (.pth; a .json summary beside it)")
    parser.add_argument("--images", type=int, default=6000, help="train-split scenes whose text is read (not rendered)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block", type=int, default=96, help="tokens per row (scene prefix included)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    summary = train_text_lm(args.cfg_path, args.out, args.images, args.epochs, args.batch_size, args.block, args.lr,
                            progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
