"""Generate the synthetic "shapes" vision-language dataset on disk, in LAVIS's formats.

    python -m lavis_free.datasets.shapes --out data/shapes --seed 0 [--train 2000 --val 200 --test 200] [--shards N]

The layout and annotation formats are those of docs/DESIGN.md ("Data formats"): LAVIS's COCO
caption and VQAv2 shapes, so the same dataset classes read real data. The same seed and sizes
give byte-identical files. Each image is generated from its own RNG (seed, split, index), so the
val/test images do not depend on the train size. Image ids are ``ID_BASE[split] + index + 1``;
question ids are ``image_id * 10 + k``. The dialogues are also written in the official VisDial
v1.0 layout (``visdial_1.0_{split}.json`` with 100 answer options per round, and dense relevance
annotations for val and test), which :mod:`lavis_free.datasets.visdial` reads.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from tqdm import tqdm

from lavis_free.datasets.shapes_language import (
    _ALTERNATIVES, NUMBER_WORDS, SHAPE_SYNONYMS, SIZE_SYNONYMS, ImageText, describe, dialogue_context,
)
from lavis_free.datasets.shapes_scene import (
    COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, Scene, render_scene, sample_scene, scene_rng,
)

# 1.2: each image's scene in the caption ground truth; 1.3: the dialogues also in the VisDial
# v1.0 layout (options from their own RNG, so every earlier file keeps its bytes).
GENERATOR_VERSION = "1.3"
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


def _unique(words: Iterable[str]) -> Tuple[str, ...]:
    """The words without repeats, in first-seen order (so the options are deterministic)."""
    return tuple(dict.fromkeys(words))


def _accepted_answers() -> Dict[str, Tuple[str, ...]]:
    """What an annotator would accept instead of each answer (dense relevance 0.5).

    The synonyms the captions use, the position paraphrases of the language's ``_ALTERNATIVES``
    (each names the same cell), "violet" for purple and a number word's digit (VQA normalisation
    equates them). The other ``_ALTERNATIVES`` are mistakes (orange for red, no for yes): relevance 0.
    """
    groups: List[Tuple[str, ...]] = [*SHAPE_SYNONYMS.values(), *SIZE_SYNONYMS.values(), ("purple", "violet")]
    groups += [(position, *paraphrases) for position, paraphrases in _ALTERNATIVES["position"].items()]
    groups += [(word, str(number)) for number, word in enumerate(NUMBER_WORDS)]
    return {word: tuple(w for w in group if w != word) for group in groups for word in group}


def _answer_kinds() -> Dict[str, Tuple[str, ...]]:
    """Every answer of a shapes dialogue with its paraphrases and likely mistakes, by kind, plus
    two-word answers ("red circle", "small star"): single words alone are too few for 100
    distinct options."""
    canonical = {"color": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZE_SYNONYMS),
                 "position": tuple(POSITIONS.values()), "yes/no": ("yes", "no")}
    kinds = {
        kind: _unique([*words, *(a for w in words for a in _ACCEPTED.get(w, ())),
                       *(m for w in words for m in _ALTERNATIVES[kind].get(w, ()))])
        for kind, words in canonical.items()
    }
    kinds["count"] = _unique(w for word in NUMBER_WORDS for w in (word, *_ACCEPTED[word]))
    pairs = (("color", "shape"), ("size", "shape"), ("size", "color"))
    kinds["phrase"] = tuple(f"{a} {b}" for first, second in pairs for a in canonical[first] for b in canonical[second])
    return kinds


VISDIAL_OPTIONS = 100
_ACCEPTED = _accepted_answers()
_KIND_OF = {word: words for words in _answer_kinds().values() for word in words}
VISDIAL_ANSWERS: Tuple[str, ...] = tuple(sorted(_KIND_OF))  # data.answers of every shapes VisDial file


def visdial_options(answer: str, dialog_answers: Sequence[str], rng: random.Random) -> List[str]:
    """100 distinct answer options for a round, shuffled (``gt_index`` says where the answer went).

    First the plausible ones: the answer, what annotators would also accept, the other answers
    of its kind (every colour for a colour question) and the dialog's other answers; then
    random others of :data:`VISDIAL_ANSWERS`.
    """
    plausible = _unique([answer, *_ACCEPTED.get(answer, ()), *_KIND_OF[answer], *dialog_answers])
    others = [a for a in VISDIAL_ANSWERS if a not in plausible]
    options = list(plausible) + rng.sample(others, VISDIAL_OPTIONS - len(plausible))
    rng.shuffle(options)
    return options


def visdial_relevance(answer: str, options: Sequence[str]) -> List[float]:
    """Dense relevance of each option: 1 for the answer, 0.5 for what annotators would also accept, else 0."""
    accepted = _ACCEPTED.get(answer, ())
    return [1.0 if option == answer else 0.5 if option in accepted else 0.0 for option in options]


def visdial_files(items: Sequence[ShapesItem], seed: int, split: str) -> Dict[str, object]:
    """The split's dialogues in the official VisDial v1.0 layout: ``visdial_1.0_{split}.json`` and,
    for val and test, ``visdial_1.0_{split}_dense_annotations.json`` (one round per image: val a
    drawn one, test the ``round_id`` one).

    Options and the val round come from an RNG of their own per image, so the other files keep
    their bytes. Test dialogs keep every round and answer (shapes has them); only the last round
    has options, and ``round_id`` names it, as in the official test file.
    """
    questions = sorted({q for item in items for q, _ in item.text.dialog})
    question_index = {q: i for i, q in enumerate(questions)}
    answer_index = {a: i for i, a in enumerate(VISDIAL_ANSWERS)}
    dialogs, dense = [], []
    for item in items:
        rng = random.Random(f"visdial:{seed}:{split}:{item.image_id - ID_BASE[split] - 1}")
        answers = [a for _, a in item.text.dialog]
        options = [visdial_options(a, answers, rng) for a in answers]
        turns = []
        for number, ((question, answer), opts) in enumerate(zip(item.text.dialog, options), start=1):
            turn = {"question": question_index[question], "answer": answer_index[answer]}
            if split != "test" or number == len(answers):
                turn.update(answer_options=[answer_index[o] for o in opts], gt_index=opts.index(answer))
            turns.append(turn)
        dialog = {"image_id": item.image_id, "caption": item.text.captions[0], "dialog": turns}
        if split == "test":
            dialog["round_id"] = len(turns)
        dialogs.append(dialog)
        if split != "train":
            number = len(turns) if split == "test" else rng.randrange(len(turns)) + 1
            dense.append({"image_id": item.image_id, "round_id": number,
                          "gt_relevance": visdial_relevance(answers[number - 1], options[number - 1])})
    data = {"questions": questions, "answers": list(VISDIAL_ANSWERS), "dialogs": dialogs}
    files: Dict[str, object] = {f"visdial_1.0_{split}.json": {"version": "1.0", "split": split, "data": data}}
    if split != "train":
        files[f"visdial_1.0_{split}_dense_annotations.json"] = dense
    return files


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
        files.update(visdial_files(items, seed, split))
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
