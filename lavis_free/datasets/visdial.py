"""The official VisDial v1.0 layout (visualdialog.org): a strict reader and LAVIS datasets over it.

Files (docs/DESIGN.md "Data formats"; the shapes generator writes its dialogues this way too):

- ``visdial_1.0_{split}.json``: ``{"version": "1.0", "split", "data": {"questions": [str],
  "answers": [str], "dialogs": [{"image_id", "caption", "dialog": [{"question", "answer",
  "answer_options", "gt_index"}, ...]}]}}``; question/answer/answer_options are indices into
  ``questions``/``answers``, ``gt_index`` is the answer's position in ``answer_options``. In test,
  each dialog has ``round_id`` (1-based, its last round) and only that round has
  ``answer_options``, with no ``answer``/``gt_index`` (the shapes test file keeps both: shapes
  has test answers).
- ``visdial_1.0_{split}_dense_annotations.json``: ``[{"image_id", "round_id", "gt_relevance":
  [one float in [0, 1] per answer option]}]``, one round per image.

Nothing is unpickled; every file is checked once, up front, and errors name the file, the
dialog, the key and what is allowed. A round's ``question_id`` is ``image_id * 100 + round``
(1-based round, as ``round_id``). The model sees the caption, the earlier rounds and the
question (:func:`visdial_context`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from lavis.datasets.datasets.base_dataset import BaseDataset
from torch.utils.data.dataloader import default_collate

from lavis_free.datasets.annotations import AnnotationError
from lavis_free.datasets.map_datasets import _StrictImages, load_processed_image
from lavis_free.datasets.shapes_language import dialogue_context

VERSION = "1.0"
SPLITS = ("train", "val", "test")
# The "split" of a file -> its split: the real VisDial v1.0 files say "val2018" and "test2018".
SPLIT_NAMES = {"train": "train", "val": "val", "test": "test", "train2018": "train", "val2018": "val",
               "test2018": "test"}
NUM_OPTIONS = 100
IMAGE_FIELDS = ("image_id", "split")
DATA_HINT = (
    "VisDial v1.0 comes from https://visualdialog.org/data; the shapes data is written in this layout by "
    "`python -m lavis_free.datasets.shapes --out DIR`"
)

DenseRelevance = Dict[Tuple[int, int], Tuple[int, List[float]]]


def question_id(image_id: int, round_number: int) -> int:
    """``image_id * 100 + round`` (1-based): unique while a dialog has fewer than 100 rounds (VisDial has 10)."""
    return image_id * 100 + round_number


def visdial_context(caption: str, history: Sequence[Tuple[str, str]], question: str) -> str:
    """The caption, then the shapes dialogue context (earlier rounds, current question).

    The caption is included because in VisDial it is round 0 of the history: the questioner saw
    it before asking, so questions build on it ("is it the only one?") and VisDial's own models
    read it.
    """
    return f"{caption} {dialogue_context(history, question)}"


def _load_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist. {DATA_HINT}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path} is not valid JSON ({err})") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(where: str, obj: Mapping, key: str, kind: type, allowed: str) -> Any:
    """``obj[key]``, which must exist and be a ``kind``; errors say ``where`` and what is ``allowed``."""
    if key not in obj:
        raise AnnotationError(f"{where} has no key {key!r} (expected {allowed})")
    value = obj[key]
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise AnnotationError(f"{where}: {key!r} is a {type(value).__name__}, expected {allowed}")
    return value


def _index(where: str, obj: Mapping, key: str, size: int, into: str) -> int:
    allowed = f"an int index into {into} (0..{size - 1})"
    value = _require(where, obj, key, int, allowed)
    if not 0 <= value < size:
        raise AnnotationError(f"{where}: {key!r} is {value}, out of range; expected {allowed}")
    return value


def _options(where: str, turn: Mapping, answers: List[str]) -> List[str]:
    allowed = f"a list of {NUM_OPTIONS} int indices into data.answers"
    indices = _require(where, turn, "answer_options", list, allowed)
    if len(indices) != NUM_OPTIONS:
        raise AnnotationError(f"{where}: 'answer_options' has {len(indices)} entries, expected {allowed}")
    for position, value in enumerate(indices):
        if not _is_int(value) or not 0 <= value < len(answers):
            raise AnnotationError(
                f"{where}: answer_options[{position}] is {value!r}, expected an int index into data.answers "
                f"(0..{len(answers) - 1})"
            )
    return [answers[i] for i in indices]


def _gt_index(where: str, turn: Mapping, options: List[str], answer: str) -> int:
    """``gt_index``, checked to point at the round's own answer (a wrong one silently corrupts R@k)."""
    gt_index = _index(where, turn, "gt_index", NUM_OPTIONS, "answer_options")
    if options[gt_index] != answer:
        raise AnnotationError(
            f"{where}: answer_options[gt_index={gt_index}] is {options[gt_index]!r}, not the round's answer {answer!r}"
        )
    return gt_index


def _strings(path: str, data: Mapping, key: str) -> List[str]:
    values = _require(f"{path}: data", data, key, list, "a list of strings")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise AnnotationError(f"{path}: data.{key}[{index}] is a {type(value).__name__}, expected a string")
    return values


def _header(path: str, top: object, split: Optional[str]) -> Tuple[str, Mapping]:
    """The file's split (train, val or test; checked against the expected one) and its ``data`` object."""
    if not isinstance(top, dict):
        raise AnnotationError(f"{path}: expected a VisDial v1.0 object with 'version', 'split' and 'data', "
                              f"got a {type(top).__name__}")
    version = _require(path, top, "version", str, f'"{VERSION}"')
    if version != VERSION:
        raise AnnotationError(f"{path}: 'version' is {version!r}; only VisDial {VERSION!r} is supported")
    allowed = f"one of {', '.join(SPLIT_NAMES)}"
    name = _require(path, top, "split", str, allowed)
    if name not in SPLIT_NAMES:
        raise AnnotationError(f"{path}: 'split' is {name!r}, expected {allowed}")
    file_split = SPLIT_NAMES[name]
    if split is not None and file_split != split:
        raise AnnotationError(f"{path} is the {file_split!r} split, but it is configured as the {split!r} split")
    return file_split, _require(path, top, "data", dict, "an object with 'questions', 'answers' and 'dialogs'")


def _round_record(where: str, turn: object, questions: List[str], answers: List[str], needs_answer: bool,
                  needs_options: bool, options: bool) -> Dict[str, Any]:
    """One round's question, answer (or None), options and gt_index (or None), by the split's rules."""
    if not isinstance(turn, dict):
        raise AnnotationError(f"{where} is a {type(turn).__name__}, expected an object with 'question', 'answer', ...")
    record: Dict[str, Any] = {"question": questions[_index(where, turn, "question", len(questions), "data.questions")]}
    has_answer = needs_answer or "answer" in turn or "gt_index" in turn
    record["answer"] = answers[_index(where, turn, "answer", len(answers), "data.answers")] if has_answer else None
    record["answer_options"] = _options(where, turn, answers) if needs_options and options else None
    record["gt_index"] = None
    if record["answer_options"] is not None and has_answer:
        record["gt_index"] = _gt_index(where, turn, record["answer_options"], record["answer"])
    return record


def _dialog_rounds(path: str, index: int, dialog: object, split: str, questions: List[str], answers: List[str],
                   options: bool) -> List[Dict[str, Any]]:
    """The records of one dialog: every round's text, context and (where the split has them) options."""
    where = f"{path}: dialog {index}"
    if not isinstance(dialog, dict):
        raise AnnotationError(f"{where} is a {type(dialog).__name__}, expected an object with 'image_id', "
                              "'caption' and 'dialog'")
    image_id = _require(where, dialog, "image_id", int, "an int")
    caption = _require(where, dialog, "caption", str, "a string")
    turns = _require(where, dialog, "dialog", list, "a non-empty list of rounds")
    if not turns:
        raise AnnotationError(f"{where}: 'dialog' is empty, expected a non-empty list of rounds")
    last = len(turns)
    if split == "test":
        last = _require(where, dialog, "round_id", int, f"the 1-based number of the last round ({len(turns)})")
        if last != len(turns):
            raise AnnotationError(f"{where}: 'round_id' is {last} but the dialog has {len(turns)} rounds; "
                                  "expected the 1-based number of its last round")
    history: List[Tuple[str, str]] = []
    records = []
    for number, turn in enumerate(turns, start=1):
        is_open = split == "test" and number == last
        record = _round_record(f"{where}: round {number}", turn, questions, answers, needs_answer=not is_open,
                               needs_options=split != "test" or is_open, options=options)
        record.update({
            "dialog": index, "split": split, "image_id": image_id, "round": number,
            "question_id": question_id(image_id, number),
            "context": visdial_context(caption, history, record["question"]),
            "dialogue_context": dialogue_context(history, record["question"]), "gt_relevance": None,
        })
        records.append(record)
        if record["answer"] is not None:
            history.append((record["question"], record["answer"]))
    return records


def read_visdial(path: str, split: Optional[str] = None, options: bool = True) -> List[Dict[str, Any]]:
    """One record per round of a ``visdial_1.0_{split}.json`` file, in file order.

    Record keys: ``dialog`` (its index in the file), ``split``, ``image_id``, ``round`` (1-based),
    ``question_id``, ``question``, ``answer`` (None for a test dialog's open round),
    ``context`` (:func:`visdial_context`), ``dialogue_context`` (the same without the caption),
    ``answer_options`` (100 strings, or None where the
    round has none), ``gt_index`` (None without an answer) and ``gt_relevance`` (None; see
    :func:`attach_relevance`). ``split`` (train, val or test), when given, must be the file's own
    (a file's "val2018"/"test2018", as real VisDial says, are val/test). ``options=False``
    neither checks nor returns answer options: training does not use them, and real VisDial
    train has 123 million option indices.
    """
    file_split, data = _header(path, _load_json(path), split)
    questions, answers = _strings(path, data, "questions"), _strings(path, data, "answers")
    dialogs = _require(f"{path}: data", data, "dialogs", list, "a list of dialogs")
    records: List[Dict[str, Any]] = []
    for index, dialog in enumerate(dialogs):
        records.extend(_dialog_rounds(path, index, dialog, file_split, questions, answers, options))
    return records


def _relevance(where: str, entry: Mapping) -> List[float]:
    allowed = f"a list of {NUM_OPTIONS} numbers in [0, 1], one per answer option"
    values = _require(where, entry, "gt_relevance", list, allowed)
    if len(values) != NUM_OPTIONS:
        raise AnnotationError(f"{where}: 'gt_relevance' has {len(values)} entries, expected {allowed}")
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise AnnotationError(f"{where}: gt_relevance[{position}] is {value!r}, expected a number in [0, 1]")
    return [float(v) for v in values]


def read_dense_annotations(path: str) -> DenseRelevance:
    """``(image_id, round_id) -> (entry index, gt_relevance)`` of a dense annotation file."""
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: expected a JSON list of dense annotations, got a {type(entries).__name__}")
    dense: DenseRelevance = {}
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict):
            raise AnnotationError(f"{where} is a {type(entry).__name__}, expected an object with 'image_id', "
                                  "'round_id' and 'gt_relevance'")
        key = (_require(where, entry, "image_id", int, "an int"),
               _require(where, entry, "round_id", int, "a 1-based round number"))
        if key in dense:
            raise AnnotationError(f"{where} repeats image_id {key[0]} round_id {key[1]} of entry {dense[key][0]}")
        dense[key] = (index, _relevance(where, entry))
    return dense


def attach_relevance(records: List[Dict[str, Any]], dense: DenseRelevance, dense_path: str) -> None:
    """Set ``gt_relevance`` of the rounds that ``dense`` annotates; every entry must match a round with options."""
    by_key = {(r["image_id"], r["round"]): r for r in records if r["answer_options"] is not None}
    for key, (index, relevance) in dense.items():
        if key not in by_key:
            raise AnnotationError(
                f"{dense_path}: entry {index}: image_id {key[0]} round_id {key[1]} is not a round with answer "
                "options in the dialog files it is configured with"
            )
        by_key[key]["gt_relevance"] = relevance


def check_image_template(template: str, key: str) -> None:
    """Fail at build time, naming the config key, on a filename pattern that cannot be formatted."""
    try:
        template.format(image_id=1, split="val")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"{key} = {template!r} is not a valid filename pattern ({err!r}); allowed fields: "
            f"{', '.join('{' + f + '}' for f in IMAGE_FIELDS)}, e.g. 'images/{{split}}/{{image_id:06d}}.png'"
        ) from None


class _VisDialRounds(_StrictImages, BaseDataset):
    """Rounds of VisDial files whose image paths come from per-split filename patterns.

    ``image_templates[split]`` lists patterns (fields ``{image_id}``, ``{split}``) relative to
    ``vis_root``; with several (real VisDial train images are COCO train2014 and val2014 files)
    each image takes the first that exists, checked once here. A file's own ``split`` picks its
    patterns, so train and val files can be combined (VisDial's final models train on both).
    """

    options = True  # read (and check) the answer options

    def __init__(self, vis_processor, text_processor, vis_root: str, ann_paths: Sequence[str],
                 image_templates: Mapping[str, Sequence[str]], dense_paths: Sequence[str] = (),
                 caption_in_context: bool = True):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths=[])
        # text_input starts with the caption (VisDial's round 0), or not (a model trained on
        # dialogues without it, as the shapes default: build_info.caption_in_context)
        self.context_key = "context" if caption_in_context else "dialogue_context"
        self.ann_paths, self.ann_path = list(ann_paths), ann_paths[0]
        records: List[Dict[str, Any]] = []
        for path in ann_paths:
            file_records = read_visdial(path, options=self.options)
            self._set_images(file_records, path, image_templates)
            records.extend(file_records)
        for dense_path in dense_paths:
            attach_relevance(records, read_dense_annotations(dense_path), dense_path)
        self.annotation = [r for r in records if self.keep(r)]
        self._add_instance_ids()

    def keep(self, record: Dict[str, Any]) -> bool:
        """Whether a round is a sample of this dataset."""
        raise NotImplementedError

    def _set_images(self, records: List[Dict[str, Any]], path: str,
                    image_templates: Mapping[str, Sequence[str]]) -> None:
        """Give every record its ``image`` path (one look-up per image) and its file, for errors."""
        resolved: Dict[int, str] = {}
        for record in records:
            split, image_id = record["split"], record["image_id"]
            if not image_templates.get(split):
                raise ValueError(f"{path} is a {split!r} file but build_info.images has no {split!r} filename pattern")
            if image_id not in resolved:
                where = f"dialog {record['dialog']} of {path}"
                resolved[image_id] = self._image_path(image_templates[split], image_id, split, where)
            record["image"], record["path"] = resolved[image_id], path

    def _image_path(self, templates: Sequence[str], image_id: int, split: str, where: str) -> str:
        """The one pattern's path (a missing file is an error when it is loaded, as in the other
        datasets), or the first of several that exists."""
        candidates = [t.format(image_id=image_id, split=split) for t in templates]
        if len(candidates) == 1:
            return candidates[0]
        for candidate in candidates:
            if os.path.isfile(os.path.join(self.vis_root, candidate)):
                return candidate
        raise FileNotFoundError(
            f"no image for image_id {image_id} ({where}) under {self.vis_root}: tried {', '.join(candidates)}"
        )

    def annotation_source(self, index: int) -> str:
        ann = self.annotation[index]
        return f"dialog {ann['dialog']} (round {ann['round']}) of {ann['path']}"


class VisDialDataset(_VisDialRounds):
    """Train: one sample per answered round -> ``image``, ``text_input`` (caption + history +
    question), ``text_output`` (answer), ``image_id``: the shapes dialogue samples' keys."""

    options = False

    def keep(self, record: Dict[str, Any]) -> bool:
        return record["answer"] is not None

    def sample(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        return {
            "image": load_processed_image(self.vis_root, ann["image"], self.vis_processor),
            "text_input": self.text_processor(ann[self.context_key]),
            "text_output": ann["answer"],
            "image_id": ann["image_id"],
        }


class VisDialEvalDataset(_VisDialRounds):
    """Val/test: one sample per round with answer options (val: every round; test: each dialog's
    ``round_id``) -> ``image``, ``text_input``, ``question_id``, ``instance_id``,
    ``answer_options`` (100 strings), ``gt_index`` (None without an answer) and
    ``gt_relevance`` (a float tensor of 100, or None for rounds without dense annotations)."""

    def keep(self, record: Dict[str, Any]) -> bool:
        return record["answer_options"] is not None

    def sample(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        relevance = ann["gt_relevance"]
        return {
            "image": load_processed_image(self.vis_root, ann["image"], self.vis_processor),
            "text_input": self.text_processor(ann[self.context_key]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
            "answer_options": list(ann["answer_options"]),
            "gt_index": ann["gt_index"],
            "gt_relevance": None if relevance is None else torch.tensor(relevance, dtype=torch.float),
        }

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Images and ids collated as usual; options, gt_index and gt_relevance stay per-sample lists
        (default_collate would transpose the option lists and fails on None)."""
        per_sample = ("answer_options", "gt_index", "gt_relevance")
        batch = default_collate([{k: v for k, v in s.items() if k not in per_sample} for s in samples])
        batch.update({key: [s[key] for s in samples] for key in per_sample})
        return batch
