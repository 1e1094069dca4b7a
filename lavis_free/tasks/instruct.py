"""Task ``free_instruct``: one model trained on captions, VQA and dialogue through instructions,
as InstructBLIP is meant to be used; validated and tested on captions.

Each training batch comes from one dataset (LAVIS's ``MultiIterLoader`` draws them in turn) and
is turned into InstructBLIP's format, ``text_input`` = the instruction, ``text_output`` = the
target, by its kind: caption batches get the caption instruction; VQA batches (``answer``,
``weight``, ``n_answers``) the VQA instruction around the question and the most weighted answer;
dialogue batches (``text_output``) the dialogue instruction around history + question. Stage 1
(LAVIS's ``train_step``) and exit training (``exit_lm_samples``) use the same text.

Run config keys: those of ``free_captioning`` plus ``instructions`` (a mapping with ``caption``,
``vqa``, ``dialogue``; the defaults are `INSTRUCTIONS`). Evaluation uses the model's prompt,
which should be the caption instruction; VQA and dialogue are evaluated by ``free_vqa`` /
``free_dialogue`` with the same instructions as their ``run.prompt``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from lavis.common.registry import registry

from lavis_free.tasks.captioning import FreeCaptionTask
from lavis_free.tasks.exit_training import answer_lm_samples

INSTRUCTIONS = {
    "caption": "A short image description:",
    "vqa": "Question: {} Short answer:",
    "dialogue": "Dialogue: {} Short answer:",
}


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

    def instruction_samples(self, samples: Dict[str, Any]) -> Dict[str, Any]:
        """The batch as InstructBLIP trains on it (see the module docstring)."""
        if "answer" in samples and "n_answers" in samples:
            return answer_lm_samples(samples, self.instructions["vqa"])
        if "text_output" in samples:
            return answer_lm_samples(samples, self.instructions["dialogue"])
        captions = list(samples["text_input"])
        return {**samples, "text_input": [self.instructions["caption"]] * len(captions), "text_output": captions}

    def train_step(self, model, samples):
        return super().train_step(model, self.instruction_samples(samples))

    def exit_lm_samples(self, samples: Dict[str, Any]) -> Dict[str, Any]:
        return self.instruction_samples(samples)
