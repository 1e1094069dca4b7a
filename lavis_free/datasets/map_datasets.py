"""Map-style LAVIS datasets for captioning, VQA and dialogue on LAVIS-format annotations.

They subclass LAVIS's caption/VQA datasets, so batches look exactly like LAVIS's own
(COCO caption, VQAv2); what they add: every annotation file is checked before use (errors name
the file and row), VQA samples keep their ``question_id``, and dialogue rows are expanded into
one sample per round whose ``text_input`` is the earlier rounds plus the current question.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import torch
from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset
from lavis.datasets.datasets.vqa_datasets import VQAEvalDataset
from PIL import Image

from lavis_free.datasets.annotations import (
    CAPTION_EVAL, CAPTION_TRAIN, DIALOGUE, VQA, Schema, dialogue_rounds, load_annotation_file,
)


def load_processed_image(vis_root: str, relative_path: str, vis_processor) -> torch.Tensor:
    image = Image.open(os.path.join(vis_root, relative_path)).convert("RGB")
    return vis_processor(image)


class _CheckedAnnotations:
    """Check the annotation files, then let LAVIS's ``BaseDataset`` load them as it always does.

    ``ann_paths`` holds the annotation files; ``ann_path`` (the first) is kept because the
    evaluation tasks read their ground truth from it.
    """

    schema: Schema

    def __init__(self, vis_processor, text_processor, vis_root: str, ann_paths: Sequence[str]):
        for path in ann_paths:
            load_annotation_file(path, self.schema)
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

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = super().__getitem__(index)
        sample["question_id"] = self.annotation[index]["question_id"]
        return sample

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = super().collater(samples)
        batch["question_id"] = torch.tensor([s["question_id"] for s in samples], dtype=torch.long)
        return batch


class ShapesVQAEvalDataset(_CheckedAnnotations, VQAEvalDataset):
    """Val/test: ``image``, ``text_input`` (question), ``question_id``, ``instance_id``."""

    schema = VQA

    def __getitem__(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        return {
            "image": load_processed_image(self.vis_root, ann["image"], self.vis_processor),
            "text_input": self.text_processor(ann["question"]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
        }


class _DialogueRounds(BaseDataset):
    """One sample per dialogue round; ``question_id`` = image_id * 10 + round."""

    def __init__(self, vis_processor, text_processor, vis_root: str, ann_paths: Sequence[str]):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths=[])
        self.ann_path = ann_paths[0]
        for path in ann_paths:
            self.annotation.extend(dialogue_rounds(load_annotation_file(path, DIALOGUE)))
        self._add_instance_ids()


class ShapesDialogueDataset(_DialogueRounds):
    """Train: ``image``, ``text_input`` (history + question), ``text_output`` (answer), ``image_id``."""

    def __getitem__(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        return {
            "image": load_processed_image(self.vis_root, ann["image"], self.vis_processor),
            "text_input": self.text_processor(ann["context"]),
            "text_output": ann["answer"],
            "image_id": ann["image_id"],
        }


class ShapesDialogueEvalDataset(_DialogueRounds):
    """Val/test: ``image``, ``text_input`` (history + question), ``question_id``, ``instance_id``."""

    def __getitem__(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        return {
            "image": load_processed_image(self.vis_root, ann["image"], self.vis_processor),
            "text_input": self.text_processor(ann["context"]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
        }
