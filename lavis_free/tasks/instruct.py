"""Task ``free_instruct``: one model trained on captions, VQA and dialogue through instructions,
as InstructBLIP is meant to be used; validated and tested on captions.

Every training *sample* is turned into InstructBLIP's format, ``text_input`` = the instruction,
``text_output`` = the target, by the kind of dataset it comes from: captions get the caption
instruction; VQA questions the VQA instruction and their most weighted answer; dialogue rounds
the dialogue instruction around history + question, and the round's answer. Why per sample, not
per batch: LAVIS's runner concatenates the train datasets of one split (`concat_datasets`) and
its `ConcatDataset` keeps only the keys every sample of a batch shares, so a batch mixing the
three kinds keeps only `image` and `text_input`, and targets by kind would be lost. Stage 1
(LAVIS's `train_step`) and exit training then read the same text.

Run config keys: those of ``free_captioning`` plus ``instructions`` (a mapping with ``caption``,
``vqa``, ``dialogue``; the defaults are `INSTRUCTIONS`). Evaluation uses the model's prompt,
which should be the caption instruction; VQA and dialogue are evaluated by ``free_vqa`` /
``free_dialogue`` with the same instructions as their ``run.prompt``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from lavis.common.registry import registry
from lavis.datasets.datasets.caption_datasets import CaptionDataset
from lavis.datasets.datasets.vqa_datasets import VQADataset
from torch.utils.data import Dataset, default_collate

from lavis_free.datasets.map_datasets import ShapesDialogueDataset
from lavis_free.tasks.captioning import FreeCaptionTask

INSTRUCTIONS = {
    "caption": "A short image description:",
    "vqa": "Question: {} Short answer:",
    "dialogue": "Dialogue: {} Short answer:",
}
KINDS = ((VQADataset, "vqa"), (ShapesDialogueDataset, "dialogue"), (CaptionDataset, "caption"))


def check_instructions(instructions: Optional[Mapping[str, str]]) -> Dict[str, str]:
    given = dict(instructions or {})
    unknown = sorted(set(given) - set(INSTRUCTIONS))
    if unknown:
        raise ValueError(f"run.instructions: unknown kind(s) {unknown}; kinds are {sorted(INSTRUCTIONS)}")
    merged = {**INSTRUCTIONS, **given}
    for kind in ("vqa", "dialogue"):
        if merged[kind].count("{}") != 1:
            raise ValueError(f"run.instructions.{kind}={merged[kind]!r} needs one '{{}}' where the question goes")
    return merged


def instruction_sample(sample: Mapping[str, Any], kind: str, instructions: Mapping[str, str]) -> Dict[str, Any]:
    """One sample as InstructBLIP trains on it: the image, the instruction and the target."""
    text = sample["text_input"]
    if kind == "caption":
        instruction, target = instructions["caption"], text
    elif kind == "vqa":
        weights = list(sample["weights"])
        instruction, target = instructions["vqa"].format(text), sample["answers"][weights.index(max(weights))]
    else:
        instruction, target = instructions["dialogue"].format(text), sample["text_output"]
    return {"image": sample["image"], "text_input": instruction.strip(), "text_output": target}


class InstructionDataset(Dataset):
    """A train dataset whose samples come out in instruction format (see the module docstring)."""

    def __init__(self, dataset: Dataset, kind: str, instructions: Mapping[str, str]):
        self.dataset, self.kind, self.instructions = dataset, kind, instructions

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return instruction_sample(self.dataset[index], self.kind, self.instructions)

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        return default_collate(samples)

    def set_processors(self, vis_processor: Any, text_processor: Any) -> None:  # LAVIS calls it on every dataset
        self.dataset.set_processors(vis_processor, text_processor)


def dataset_kind(dataset: Dataset, name: str) -> str:
    for cls, kind in KINDS:
        if isinstance(dataset, cls):
            return kind
    raise ValueError(f"free_instruct: datasets.{name} ({type(dataset).__name__}) is neither a caption, a VQA nor a "
                     "dialogue dataset; its samples have no instruction format")


@registry.register_task("free_instruct")
class FreeInstructTask(FreeCaptionTask):
    def __init__(self, *args: Any, instructions: Optional[Mapping[str, str]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.instructions = check_instructions(instructions)

    @classmethod
    def setup_task(cls, cfg) -> "FreeInstructTask":
        task = super().setup_task(cfg)
        task.instructions = check_instructions(cfg.run_cfg.get("instructions"))
        return task

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        for name, splits in datasets.items():
            if "train" in splits:
                splits["train"] = InstructionDataset(splits["train"], dataset_kind(splits["train"], name), self.instructions)
        return datasets
