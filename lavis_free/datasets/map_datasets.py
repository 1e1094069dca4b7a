"""Map-style LAVIS datasets for captioning, VQA and dialogue on LAVIS-format annotations.

They subclass LAVIS's caption/VQA datasets, so batches look exactly like LAVIS's own
(COCO caption, VQAv2); what they add: every annotation file is checked before use (errors name
the file and row), every image is decoded strictly (a missing, truncated or corrupt file is an
error naming it and its annotation), VQA samples keep their ``question_id``, and dialogue rows
are expanded into one sample per round whose ``text_input`` is the earlier rounds plus the
current question.
"""
from __future__ import annotations

import bisect
import contextlib
import os
import threading
from typing import Any, Dict, Iterator, List, Sequence

import torch
from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset
from lavis.datasets.datasets.vqa_datasets import VQAEvalDataset
from PIL import Image, ImageFile

from lavis_free.datasets.annotations import (
    CAPTION_EVAL, CAPTION_TRAIN, DIALOGUE, VQA, Schema, dialogue_rounds, load_annotation_file,
)


class ImageFileError(OSError):
    """An annotation's image file that does not decode in full (truncated or corrupt)."""


_STRICT_DECODING = threading.Lock()


@contextlib.contextmanager
def strict_image_decoding() -> Iterator[None]:
    """PIL raises on truncated image files inside this block.

    Why the global flag is switched: importing LAVIS sets ``ImageFile.LOAD_TRUNCATED_IMAGES =
    True`` for the whole process (truncated files then decode grey-padded, silently), and PIL
    reads that module global at decode time with no per-image setting. It is turned off only
    around the plugin datasets' own decodes and restored after; the lock keeps overlapping
    decodes in threads from restoring it early (other threads decoding meanwhile are strict too).
    """
    with _STRICT_DECODING:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def load_processed_image(vis_root: str, relative_path: str, vis_processor) -> torch.Tensor:
    image = Image.open(os.path.join(vis_root, relative_path)).convert("RGB")
    return vis_processor(image)


class _StrictImages:
    """Samples whose image is decoded strictly; a bad file names itself and its annotation.

    Subclasses build a sample in ``sample(index)`` (LAVIS's ``__getitem__`` by default) and
    record ``ann_starts``/``ann_paths``: the first sample index of each annotation file.
    """

    ann_paths: List[str]
    ann_starts: List[int]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            with strict_image_decoding():
                return self.sample(index)
        except OSError as err:  # PIL: UnidentifiedImageError, "image file is truncated", broken stream
            path = os.path.join(self.vis_root, self.annotation[index]["image"])
            error = FileNotFoundError if isinstance(err, FileNotFoundError) else ImageFileError
            reason = "no such file" if error is FileNotFoundError else f"truncated or corrupt ({err})"
            raise error(f"{path}: {reason}; it is the image of {self.annotation_source(index)}") from err

    def sample(self, index: int) -> Dict[str, Any]:
        return super().__getitem__(index)

    def annotation_source(self, index: int) -> str:
        """``row R of FILE`` for sample ``index``."""
        file = bisect.bisect_right(self.ann_starts, index) - 1
        return f"row {self.annotation_row(index, self.ann_starts[file])} of {self.ann_paths[file]}"

    def annotation_row(self, index: int, start: int) -> int:
        return index - start


class _CheckedAnnotations(_StrictImages):
    """Check the annotation files, then let LAVIS's ``BaseDataset`` load them as it always does.

    ``ann_paths`` holds the annotation files; ``ann_path`` (the first) is kept because the
    evaluation tasks read their ground truth from it.
    """

    schema: Schema

    def __init__(self, vis_processor, text_processor, vis_root: str, ann_paths: Sequence[str]):
        self.ann_paths, self.ann_starts, total = list(ann_paths), [], 0
        for path in ann_paths:
            self.ann_starts.append(total)
            total += len(load_annotation_file(path, self.schema))
        self.ann_path = ann_paths[0]
        super().__init__(vis_processor, text_processor, vis_root, list(ann_paths))


class ShapesCaptionDataset(_CheckedAnnotations, CaptionDataset):
    """Train: one row per caption -> ``image``, ``text_input``, ``image_id`` (LAVIS's index)."""

    schema = CAPTION_TRAIN


class ShapesCaptionEvalDataset(_CheckedAnnotations, CaptionEvalDataset):
    """Val/test: one row per image -> ``image``, ``image_id`` (the real id), ``instance_id``."""

    schema = CAPTION_EVAL


class ShapesVQADataset(_CheckedAnnotations, COCOVQADataset):
    """Train: ``image``, ``text_input`` (question), ``answers``/``weights`` (VQAv2 soft targets), ``question_id``."""

    schema = VQA

    def sample(self, index: int) -> Dict[str, Any]:
        sample = super().sample(index)
        sample["question_id"] = self.annotation[index]["question_id"]
        return sample

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = super().collater(samples)
        batch["question_id"] = torch.tensor([s["question_id"] for s in samples], dtype=torch.long)
        return batch


class ShapesVQAEvalDataset(_CheckedAnnotations, VQAEvalDataset):
    """Val/test: ``image``, ``text_input`` (question), ``question_id``, ``instance_id``."""

    schema = VQA

    def sample(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        return {
            "image": load_processed_image(self.vis_root, ann["image"], self.vis_processor),
            "text_input": self.text_processor(ann["question"]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
        }


class _DialogueRounds(_StrictImages, BaseDataset):
    """One sample per dialogue round; ``question_id`` = image_id * 10 + round."""

    def __init__(self, vis_processor, text_processor, vis_root: str, ann_paths: Sequence[str]):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths=[])
        self.ann_path = ann_paths[0]
        self.ann_paths, self.ann_starts = list(ann_paths), []
        for path in ann_paths:
            self.ann_starts.append(len(self.annotation))
            self.annotation.extend(dialogue_rounds(load_annotation_file(path, DIALOGUE)))
        self._add_instance_ids()

    def annotation_row(self, index: int, start: int) -> int:
        return self.annotation[index]["row"]


class ShapesDialogueDataset(_DialogueRounds):
    """Train: ``image``, ``text_input`` (history + question), ``text_output`` (answer), ``image_id``."""

    def sample(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        return {
            "image": load_processed_image(self.vis_root, ann["image"], self.vis_processor),
            "text_input": self.text_processor(ann["context"]),
            "text_output": ann["answer"],
            "image_id": ann["image_id"],
        }


class ShapesDialogueEvalDataset(_DialogueRounds):
    """Val/test: ``image``, ``text_input`` (history + question), ``question_id``, ``instance_id``."""

    def sample(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        return {
            "image": load_processed_image(self.vis_root, ann["image"], self.vis_processor),
            "text_input": self.text_processor(ann["context"]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
        }
