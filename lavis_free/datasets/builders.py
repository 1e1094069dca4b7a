"""LAVIS dataset builders ``shapes_caption``, ``shapes_vqa``, ``shapes_dialogue``, ``visdial`` and ``shapes_visdial``.

They read LAVIS-format annotations from a local data root and never touch the network (LAVIS's
base builder downloads annotation URLs; here ``_download_data`` does nothing). Paths:
``build_info.storage`` is the data root (default ``data/shapes``, relative to the current
directory); annotation ``storage`` and ``images.storage`` are taken relative to it unless
absolute, so real COCO-format data works by pointing these keys at it. Eval splits may name a
COCO-format caption ground truth (``annotations.<split>.gt``), which the captioning task scores
against. ``build_info.shards`` switches the train split to webdataset tar shards.

``visdial`` (real VisDial v1.0) and ``shapes_visdial`` (the shapes dialogues in that layout) read
the official files (:mod:`lavis_free.datasets.visdial`); their eval splits may name dense
relevance files (``annotations.<split>.dense``), and ``images.<split>`` is the filename pattern
(or list of patterns, the first existing file wins) of an image under ``images.storage``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Union

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_free.datasets.annotations import missing_data_message
from lavis_free.datasets.map_datasets import (
    ShapesCaptionDataset,
    ShapesCaptionEvalDataset,
    ShapesDialogueDataset,
    ShapesDialogueEvalDataset,
    ShapesVQADataset,
    ShapesVQAEvalDataset,
)
from lavis_free.datasets.shards import resolve_shards, shard_train_pipeline
from lavis_free.datasets.visdial import DATA_HINT, VisDialDataset, VisDialEvalDataset, check_image_template

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SPLITS = ("train", "val", "test")


def _under(root: str, path: str) -> str:
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))


class LocalDatasetBuilder(BaseDatasetBuilder):
    """A builder over local LAVIS-format annotation files; subclasses set kind, classes and YAML."""

    kind: str = ""

    @classmethod
    def default_config_path(cls, type: str = "default") -> str:  # noqa: A002  (LAVIS's name)
        if type not in cls.DATASET_CONFIG_DICT:
            raise KeyError(f"unknown dataset config type {type!r} for {cls.__name__}; allowed: {sorted(cls.DATASET_CONFIG_DICT)}")
        return cls.DATASET_CONFIG_DICT[type]

    def _download_data(self) -> None:
        """Nothing to download: the data is generated or provided locally (see build())."""

    def data_root(self) -> str:
        return os.path.abspath(os.path.expanduser(str(self.config.build_info.storage)))

    def missing_message(self, path: str, root: str) -> str:
        """What to say when ``path`` (the data root or one of its files) does not exist."""
        return missing_data_message(path, root)

    def _annotation_paths(self, storage: Union[str, Sequence[str]], root: str) -> List[str]:
        paths = [_under(root, p) for p in ([storage] if isinstance(storage, str) else list(storage))]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(self.missing_message(path, root))
        return paths

    def build(self) -> Dict[str, object]:
        """Datasets for the splits listed under ``build_info.annotations`` (train/val/test); a
        split set to null (``--options datasets.shapes_vqa.build_info.annotations.val=null``, or
        in a project YAML) is not built: LAVIS's runner allows one eval dataset per split, so a
        multi-dataset training run keeps the eval splits of one."""
        self.build_processors()
        info = self.config.build_info
        root = self.data_root()
        if not os.path.isdir(root):
            raise FileNotFoundError(self.missing_message(root, root))
        images = info.get("images")
        vis_root = _under(root, str(images.storage) if images is not None and images.get("storage") else ".")
        datasets: Dict[str, object] = {}
        for split, split_info in info.annotations.items():
            if split not in SPLITS or split_info is None:
                continue
            stage = "train" if split == "train" else "eval"
            vis_processor, text_processor = self.vis_processors[stage], self.text_processors[stage]
            if split == "train" and info.get("shards"):
                shard_files = resolve_shards(str(info.shards), root)
                datasets[split] = shard_train_pipeline(self.kind, shard_files, vis_processor, text_processor)
                continue
            datasets[split] = self.make_dataset(split, split_info, vis_processor, text_processor, vis_root, root)
        return datasets

    def make_dataset(self, split: str, split_info, vis_processor, text_processor, vis_root: str, root: str):
        """The map-style dataset of one split (the VisDial builders add image patterns and dense files)."""
        dataset_cls = self.train_dataset_cls if split == "train" else self.eval_dataset_cls
        dataset = dataset_cls(
            vis_processor=vis_processor,
            text_processor=text_processor,
            vis_root=vis_root,
            ann_paths=self._annotation_paths(split_info.storage, root),
        )
        if split != "train" and split_info.get("gt"):
            dataset.gt_path = _under(root, str(split_info.gt))
        return dataset


@registry.register_builder("shapes_caption")
class ShapesCaptionBuilder(LocalDatasetBuilder):
    kind = "caption"
    train_dataset_cls = ShapesCaptionDataset
    eval_dataset_cls = ShapesCaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(CONFIG_DIR, "shapes_caption.yaml")}


@registry.register_builder("shapes_vqa")
class ShapesVQABuilder(LocalDatasetBuilder):
    kind = "vqa"
    train_dataset_cls = ShapesVQADataset
    eval_dataset_cls = ShapesVQAEvalDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(CONFIG_DIR, "shapes_vqa.yaml")}


@registry.register_builder("shapes_dialogue")
class ShapesDialogueBuilder(LocalDatasetBuilder):
    kind = "dialogue"
    train_dataset_cls = ShapesDialogueDataset
    eval_dataset_cls = ShapesDialogueEvalDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(CONFIG_DIR, "shapes_dialogue.yaml")}


def _as_list(value) -> List[str]:
    """A config value that is one string or a list of them."""
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


class VisDialBuilder(LocalDatasetBuilder):
    """Official VisDial v1.0 files; ``images.<split>`` holds each split's filename pattern(s)."""

    kind = "visdial"
    train_dataset_cls = VisDialDataset
    eval_dataset_cls = VisDialEvalDataset

    def build(self) -> Dict[str, object]:
        if self.config.build_info.get("shards"):
            raise ValueError(f"build_info.shards is not supported by the {self.kind} builders (shards hold no "
                             "captions or answer options); remove it")
        return super().build()

    def image_templates(self) -> Dict[str, List[str]]:
        """Per split, its image filename pattern(s), checked now so a bad one names its config key."""
        images = self.config.build_info.get("images") or {}
        templates = {split: _as_list(images[split]) for split in SPLITS if images.get(split)}
        for split, patterns in templates.items():
            for pattern in patterns:
                check_image_template(pattern, f"build_info.images.{split}")
        return templates

    def make_dataset(self, split: str, split_info, vis_processor, text_processor, vis_root: str, root: str):
        dense = split_info.get("dense")
        if dense and split == "train":
            raise ValueError("build_info.annotations.train.dense: training does not use dense relevance (only "
                             "val/test samples carry it); remove it")
        dataset_cls = self.train_dataset_cls if split == "train" else self.eval_dataset_cls
        return dataset_cls(
            vis_processor=vis_processor,
            text_processor=text_processor,
            vis_root=vis_root,
            ann_paths=self._annotation_paths(split_info.storage, root),
            image_templates=self.image_templates(),
            dense_paths=self._annotation_paths(dense, root) if dense else [],
            caption_in_context=self.caption_in_context(),
        )

    def caption_in_context(self) -> bool:
        value = self.config.build_info.get("caption_in_context", True)
        if not isinstance(value, bool):
            raise ValueError(f"build_info.caption_in_context must be true or false, got {value!r}")
        return value


@registry.register_builder("visdial")
class RealVisDialBuilder(VisDialBuilder):
    DATASET_CONFIG_DICT = {"default": os.path.join(CONFIG_DIR, "visdial.yaml")}

    def missing_message(self, path: str, root: str) -> str:
        """Where real VisDial comes from, instead of the shapes generator command."""
        return f"{path} does not exist. {DATA_HINT}; or point build_info.storage (in the project YAML) at the data."


@registry.register_builder("shapes_visdial")
class ShapesVisDialBuilder(VisDialBuilder):
    DATASET_CONFIG_DICT = {"default": os.path.join(CONFIG_DIR, "shapes_visdial.yaml")}
