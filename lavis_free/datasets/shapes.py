"""Generate the synthetic "shapes" vision-language dataset on disk, in LAVIS's formats.

    python -m lavis_free.datasets.shapes --out data/shapes --seed 0 [--train 2000 --val 200 --test 200] [--shards N]

The layout and annotation formats are those of docs/DESIGN.md ("Data formats"): LAVIS's COCO
caption and VQAv2 shapes, so the same dataset classes read real data. The same seed and sizes
give byte-identical files. Each image is generated from its own RNG (seed, split, index), so the
val/test images do not depend on the train size. Image ids are ``ID_BASE[split] + index + 1``;
question ids are ``image_id * 10 + k``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

from tqdm import tqdm

from lavis_free.datasets.shapes_language import ImageText, describe, dialogue_context
from lavis_free.datasets.shapes_scene import IMAGE_SIZE, Scene, render_scene, sample_scene, scene_rng

GENERATOR_VERSION = "1.2"  # 1.2: each image's scene in the caption ground truth
SPLITS = ("train", "val", "test")
DEFAULT_SIZES: Dict[str, int] = {"train": 2000, "val": 200, "test": 200}
ID_BASE: Dict[str, int] = {"train": 0, "val": 800_000, "test": 900_000}
MAX_SIZE: Dict[str, int] = {"train": 800_000, "val": 100_000, "test": 99_999}
GENERATE_HINT = "python -m lavis_free.datasets.shapes --out {out} --seed 0"


@dataclass(frozen=True)
class ShapesItem:
    """One generated image: where it goes, what it shows and all its text."""

    image_id: int
    image: str
    scene: Scene
    text: ImageText


def generate_item(seed: int, split: str, index: int) -> ShapesItem:
    rng = scene_rng(seed, split, index)
    scene = sample_scene(rng)
    image_id = ID_BASE[split] + index + 1
    return ShapesItem(image_id, f"images/{split}/{image_id:06d}.png", scene, describe(scene, rng))


def iter_items(seed: int, split: str, size: int) -> Iterator[ShapesItem]:
    for index in range(size):
        yield generate_item(seed, split, index)


def caption_rows(items: Sequence[ShapesItem], split: str) -> List[dict]:
    """Train: one row per caption (what LAVIS trains on); val/test: one row per image."""
    if split == "train":
        return [{"image": it.image, "caption": c, "image_id": it.image_id} for it in items for c in it.text.captions]
    return [{"image": it.image, "caption": list(it.text.captions), "image_id": it.image_id} for it in items]


def scene_record(scene: Scene) -> List[dict]:
    """What an image shows, object by object in reading order, as the annotations store it."""
    return [{"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position} for o in scene.objects]


def caption_gt(items: Sequence[ShapesItem]) -> dict:
    """COCO-format ground truth, as pycocotools' ``COCO`` and pycocoevalcap expect it; each image
    entry also holds its ``scene`` (COCO allows extra fields), so captions can be scored per
    attribute (`lavis_free.tasks.scene_metrics`)."""
    annotations = []
    for it in items:
        for caption in it.text.captions:
            annotations.append({"image_id": it.image_id, "caption": caption, "id": len(annotations) + 1})
    return {
        "info": {"description": "lavis-free synthetic shapes captions"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": it.image_id, "file_name": it.image, "scene": scene_record(it.scene)} for it in items],
        "annotations": annotations,
    }


def vqa_rows(items: Sequence[ShapesItem]) -> List[dict]:
    return [
        {
            "question_id": it.image_id * 10 + k,
            "image": it.image,
            "question": qa.question,
            "answer": list(qa.answers),
            "question_type": qa.question_type,
        }
        for it in items
        for k, qa in enumerate(it.text.questions)
    ]


def dialogue_rows(items: Sequence[ShapesItem]) -> List[dict]:
    return [
        {
            "image": it.image,
            "image_id": it.image_id,
            "dialog": [{"question": q, "answer": a} for q, a in it.text.dialog],
        }
        for it in items
    ]


def _shard_sample(item: ShapesItem, png: bytes) -> dict:
    record = {
        "image_id": item.image_id,
        "image": item.image,
        "captions": list(item.text.captions),
        "vqa": vqa_rows([item]),
        "dialog": dialogue_rows([item])[0]["dialog"],
    }
    return {"__key__": f"{item.image_id:06d}", "png": png, "json": json.dumps(record).encode("utf-8")}


def _png_bytes(item: ShapesItem) -> bytes:
    buffer = io.BytesIO()
    render_scene(item.scene).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_json(path: str, obj: object) -> str:
    data = json.dumps(obj).encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def _validate_sizes(sizes: Mapping[str, int], shards: int) -> None:
    for split, size in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if not 0 <= size <= MAX_SIZE[split]:
            raise ValueError(f"--{split} must be between 0 and {MAX_SIZE[split]}, got {size}")
    if shards < 0 or (shards and shards > max(sizes.get("train", 0), 1)):
        raise ValueError(f"--shards must be between 0 and the train size, got {shards}")


def generate_dataset(
    out_dir: str, seed: int = 0, sizes: Optional[Mapping[str, int]] = None, shards: int = 0, progress: bool = True
) -> dict:
    """Write images, annotations, COCO ground truth, optional train shards and meta.json.

    Returns the meta dict (also written to ``out_dir/meta.json``).
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    _validate_sizes(sizes, shards)
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    checksums: Dict[str, str] = {}
    for split in SPLITS:
        if split not in sizes:
            continue
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        writer = _shard_writer(out_dir, sizes[split], shards) if split == "train" and shards else None
        image_hash = hashlib.sha256()
        items = []
        for item in tqdm(iter_items(seed, split, sizes[split]), total=sizes[split], desc=f"shapes {split}", disable=not progress):
            png = _png_bytes(item)
            with open(os.path.join(out_dir, item.image), "wb") as f:
                f.write(png)
            image_hash.update(png)
            if writer is not None:
                writer.write(_shard_sample(item, png))
            items.append(item)
        if writer is not None:
            writer.close()
        checksums[f"images/{split}"] = image_hash.hexdigest()
        files = {f"caption_{split}.json": caption_rows(items, split), f"vqa_{split}.json": vqa_rows(items),
                 f"dialogue_{split}.json": dialogue_rows(items)}
        if split != "train":
            files[f"caption_{split}_gt.json"] = caption_gt(items)
        for name, obj in files.items():
            checksums[f"annotations/{name}"] = _write_json(os.path.join(ann_dir, name), obj)
    meta = {
        "generator": "lavis_free.datasets.shapes",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sizes": {s: sizes[s] for s in SPLITS if s in sizes},
        "image_size": IMAGE_SIZE,
        "train_shards": shards,
        "checksums": checksums,
    }
    _write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def _shard_writer(out_dir: str, train_size: int, shards: int):
    """A webdataset ShardWriter spreading the train split over ``shards`` tars (fixed mtime)."""
    import webdataset as wds

    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    per_shard = -(-train_size // shards)
    return wds.ShardWriter(os.path.join(shard_dir, "train-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0.0)


def corpus_texts(seed: int = 0, num_images: int = 3000) -> List[str]:
    """All text of ``num_images`` train images (no rendering): for training the tokenizers.

    Captions, questions, every human answer, dialogue rounds and the dialogue context strings
    the dataset classes build, in generation order.
    """
    texts: List[str] = []
    for item in iter_items(seed, "train", num_images):
        texts.extend(item.text.captions)
        for qa in item.text.questions:
            texts.append(qa.question)
            texts.extend(qa.answers)
        history = []
        for question, answer in item.text.dialog:
            texts.append(dialogue_context(history, question))
            texts.append(answer)
            history.append((question, answer))
    return texts


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_free.datasets.shapes",
        description="Generate the synthetic shapes dataset (images + LAVIS caption/VQA/dialogue annotations).",
    )
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_SIZES[split], help=f"number of {split} images")
    parser.add_argument("--shards", type=int, default=0, help="also write the train split as N webdataset tar shards")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parse_args(argv)
    sizes = {split: getattr(args, split) for split in SPLITS}
    try:
        meta = generate_dataset(args.out, seed=args.seed, sizes=sizes, shards=args.shards)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote {sum(meta['sizes'].values())} images ({meta['sizes']}) to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
