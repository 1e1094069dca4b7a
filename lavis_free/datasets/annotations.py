"""Checked loading of annotation files: errors that name the file, the row and the fix.

LAVIS's datasets ``json.load`` whatever path they get; a missing file then surfaces as a bare
``FileNotFoundError`` and a wrong schema as a ``KeyError`` deep inside a DataLoader worker.
Here every file is checked once, up front, against the row schema of docs/DESIGN.md.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Tuple, Type, Union

from lavis_free.datasets.shapes import GENERATE_HINT
from lavis_free.datasets.shapes_language import dialogue_context

Schema = Mapping[str, Union[Type, Tuple[Type, ...]]]

CAPTION_TRAIN: Schema = {"image": str, "caption": str, "image_id": (int, str)}
CAPTION_EVAL: Schema = {"image": str, "image_id": (int, str)}
VQA: Schema = {"question_id": int, "image": str, "question": str, "answer": list}
DIALOGUE: Schema = {"image": str, "image_id": int, "dialog": list}
_TURN: Schema = {"question": str, "answer": str}


class AnnotationError(ValueError):
    """An annotation file exists but is not valid JSON or not in the expected format."""


def missing_data_message(path: str, root: str) -> str:
    """Say what is missing and the command that creates it."""
    return (
        f"{path} does not exist. Generate the synthetic shapes data with\n"
        f"    {GENERATE_HINT.format(out=root)}\n"
        "or point the dataset's build_info.storage (in the project YAML) at an existing data directory."
    )


def _type_names(expected: Union[Type, Tuple[Type, ...]]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(t.__name__ for t in types)


def _check_row(path: str, index: int, row: object, schema: Schema) -> None:
    if not isinstance(row, dict):
        raise AnnotationError(f"{path}: row {index} is a {type(row).__name__}, expected an object with keys {sorted(schema)}")
    for key, expected in schema.items():
        if key not in row:
            raise AnnotationError(f"{path}: row {index} has no key {key!r} (required keys: {sorted(schema)})")
        if isinstance(row[key], bool) or not isinstance(row[key], expected):
            raise AnnotationError(
                f"{path}: row {index}: {key!r} is a {type(row[key]).__name__}, expected {_type_names(expected)}"
            )


def _check_extra(path: str, index: int, row: dict, schema: Schema) -> None:
    """Nested parts the flat schema cannot say: VQA answer lists and dialogue turns."""
    if schema is VQA and not all(isinstance(a, str) for a in row["answer"]):
        raise AnnotationError(f"{path}: row {index}: 'answer' must be a list of strings")
    if schema is DIALOGUE:
        if not row["dialog"]:
            raise AnnotationError(f"{path}: row {index}: 'dialog' is empty")
        for turn_index, turn in enumerate(row["dialog"]):
            _check_row(f"{path}: row {index}: dialog", turn_index, turn, _TURN)


def load_annotation_file(path: str, schema: Schema, root: str = "") -> List[dict]:
    """Parse ``path`` and check every row against ``schema``.

    Raises FileNotFoundError (with the command that generates the data, ``root`` being the data
    directory) or AnnotationError (naming the file, the row and what is wrong).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_data_message(path, root or os.path.dirname(os.path.dirname(path)) or "."))
    try:
        with open(path, "r", encoding="utf-8") as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path} is not valid JSON ({err}); regenerate it or fix the file") from None
    if not isinstance(rows, list):
        raise AnnotationError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
    for index, row in enumerate(rows):
        _check_row(path, index, row, schema)
        _check_extra(path, index, row, schema)
    return rows


def load_caption_gt(path: str) -> Dict[int, List[str]]:
    """Reference captions per image id from a COCO-format ground-truth file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_data_message(path, os.path.dirname(os.path.dirname(path)) or "."))
    try:
        with open(path, "r", encoding="utf-8") as f:
            gt = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) or not isinstance(gt.get("annotations"), list):
        raise AnnotationError(f"{path}: expected COCO caption format, an object with 'images' and 'annotations' lists")
    refs: Dict[int, List[str]] = {}
    for image in gt["images"]:
        if not isinstance(image, dict) or "id" not in image:
            raise AnnotationError(f"{path}: every entry of 'images' needs an 'id'")
        refs[int(image["id"])] = []
    for index, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise AnnotationError(f"{path}: annotations[{index}] needs 'image_id' and a string 'caption'")
        if int(ann["image_id"]) not in refs:
            raise AnnotationError(f"{path}: annotations[{index}] refers to image_id {ann['image_id']} missing from 'images'")
        refs[int(ann["image_id"])].append(ann["caption"])
    return refs


def dialogue_rounds(rows: List[dict]) -> List[dict]:
    """Expand dialogue rows into one record per round, with the context a model sees.

    ``question_id`` = image_id * 10 + round index; ``context`` = earlier rounds + this question;
    ``row`` = the row's index in ``rows`` (errors name it).
    """
    rounds = []
    for index, row in enumerate(rows):
        history: List[Tuple[str, str]] = []
        for k, turn in enumerate(row["dialog"]):
            rounds.append({
                "row": index,
                "image": row["image"],
                "image_id": row["image_id"],
                "question_id": row["image_id"] * 10 + k,
                "context": dialogue_context(history, turn["question"]),
                "answer": turn["answer"],
            })
            history.append((turn["question"], turn["answer"]))
    return rounds
