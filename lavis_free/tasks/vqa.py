"""Tasks ``free_vqa`` (VQAv2 accuracy) and ``free_dialogue`` (exact-match answer accuracy).

Both subclass LAVIS's VQATask: ``valid_step`` calls ``model.predict_answers`` with the run
config's ``num_beams``, ``max_len``, ``min_len``, ``inference_method``, ``num_ans_candidates``
and ``prompt``, plus every entry of ``run.generate_kwargs``. Results are saved to LAVIS's
``result_dir``; the ground truth is the eval split's own annotation file (its 10 human answers,
or the dialogue round's answer), so nothing is downloaded and no COCO-format VQA files are needed.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.vqa import VQATask

from lavis_free.tasks.answer_metrics import dialogue_metrics, vqa_metrics
from lavis_free.tasks.common import collect_eval_files, generation_kwargs, record_metrics
from lavis_free.tasks.exit_eval import ExitEvalTaskMixin
from lavis_free.tasks.exit_training import ExitTrainingMixin
from lavis_free.tasks.model_building import AttachExitsMixin


@registry.register_task("free_vqa")
class FreeVQATask(AttachExitsMixin, ExitEvalTaskMixin, ExitTrainingMixin, VQATask):
    result_name = "vqa_result"
    headline_metric = "accuracy"
    metric_fn: Callable[..., Dict[str, float]] = staticmethod(vqa_metrics)
    default_inference_method = "generate"

    def __init__(self, num_beams: int, max_len: int, min_len: int, evaluate: bool, num_ans_candidates: int,
                 inference_method: str = "generate", prompt: str = "", generate_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__(num_beams, max_len, min_len, evaluate, num_ans_candidates,
                         inference_method=inference_method, prompt=prompt)
        self.generate_kwargs = dict(generate_kwargs or {})
        self.gt_files: Dict[str, str] = {}

    @classmethod
    def setup_task(cls, cfg) -> "FreeVQATask":
        run_cfg = cfg.run_cfg
        return cls(
            num_beams=run_cfg.get("num_beams", 3),
            max_len=run_cfg.get("max_len", 10),
            min_len=run_cfg.get("min_len", 1),
            evaluate=run_cfg.get("evaluate", False),
            num_ans_candidates=run_cfg.get("num_ans_candidates", 128),
            inference_method=run_cfg.get("inference_method", cls.default_inference_method),
            prompt=run_cfg.get("prompt", ""),
            generate_kwargs=generation_kwargs(run_cfg),
        ).with_exit_eval(run_cfg)

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        self.gt_files = collect_eval_files(datasets, "ann_path")
        return datasets

    def valid_step(self, model, samples: Mapping[str, Any]) -> List[Dict[str, Any]]:
        answers = self.exit_eval.decode(
            model.predict_answers,
            samples=samples,
            answer_list=self.answer_list,
            inference_method=self.inference_method,
            num_beams=self.num_beams,
            max_len=self.max_len,
            min_len=self.min_len,
            num_ans_candidates=self.num_ans_candidates,
            prompt=self.prompt,
            **self.generate_kwargs,
        )
        return [{"question_id": int(q), "answer": a} for a, q in zip(answers, samples["question_id"])]

    def after_evaluation(self, val_result, split_name: str, **kwargs):
        result_file = self.save_result(
            val_result,
            result_dir=registry.get_path("result_dir"),
            filename=f"{split_name}_{self.result_name}",
            remove_duplicate="question_id",
        )
        return self._report_metrics(result_file=result_file, split=split_name)

    def score_results(self, results: List[Mapping[str, Any]], split: str) -> Dict[str, float]:
        """The quality metrics of `valid_step` results of `split` (no exit figures)."""
        if split not in self.gt_files:
            raise KeyError(f"no annotation file known for split {split!r}: is it listed under build_info.annotations?")
        return self.metric_fn(results, self.gt_files[split])

    @main_process
    def _report_metrics(self, result_file: str, split: str) -> Dict[str, float]:
        with open(result_file, "r") as f:
            predictions = json.load(f)
        metrics = self.score_results(predictions, split)
        metrics.update(self.exit_metrics)
        record_metrics(split, metrics)
        return metrics


@registry.register_task("free_dialogue")
class FreeDialogueTask(FreeVQATask):
    """Answers one dialogue round at a time; ``text_input`` already holds the earlier rounds."""

    result_name = "dialogue_result"
    metric_fn = staticmethod(dialogue_metrics)
