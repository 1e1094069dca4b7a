"""Task ``free_captioning``: LAVIS's CaptionTask scored offline against local ground truth.

Run config keys: ``num_beams``, ``max_len``, ``min_len``, ``evaluate``, ``report_metric`` (as
LAVIS), plus ``caption_scorers`` (default [bleu, meteor, rouge, cider]; METEOR's JVM start is
the slow part of an evaluation, so quick runs may drop it), ``spice`` (default false; adds SPICE,
which downloads Stanford CoreNLP on first use) and ``generate_kwargs`` (a mapping added to every
``model.generate`` call). The ground truth of each eval split is the ``gt`` file its dataset
config names (``caption_<split>_gt.json`` for shapes).
``agg_metrics`` (what LAVIS keeps the best checkpoint by) is CIDEr alone, not LAVIS's
CIDEr + BLEU-4, so the reported number is the one the README and the threshold sweeps use.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask

from lavis_free.tasks.caption_metrics import DEFAULT_SCORERS, caption_metrics, check_scorers
from lavis_free.tasks.common import collect_eval_files, generation_kwargs, record_metrics
from lavis_free.tasks.exit_eval import ExitEvalTaskMixin
from lavis_free.tasks.exit_training import ExitTrainingMixin
from lavis_free.tasks.model_building import AttachExitsMixin


@registry.register_task("free_captioning")
class FreeCaptionTask(AttachExitsMixin, ExitEvalTaskMixin, ExitTrainingMixin, CaptionTask):
    headline_metric = "CIDEr"

    def __init__(self, num_beams: int, max_len: int, min_len: int, evaluate: bool, report_metric: bool = True,
                 scorers: Sequence[str] = DEFAULT_SCORERS, generate_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__(num_beams, max_len, min_len, evaluate, report_metric=report_metric)
        check_scorers(scorers)
        self.scorers = tuple(scorers)
        self.generate_kwargs = dict(generate_kwargs or {})
        self.gt_files: Dict[str, str] = {}

    @classmethod
    def setup_task(cls, cfg) -> "FreeCaptionTask":
        run_cfg = cfg.run_cfg
        return cls(
            num_beams=run_cfg.get("num_beams", 5),
            max_len=run_cfg.get("max_len", 30),
            min_len=run_cfg.get("min_len", 1),
            evaluate=run_cfg.get("evaluate", False),
            report_metric=run_cfg.get("report_metric", True),
            scorers=tuple(run_cfg.get("caption_scorers", DEFAULT_SCORERS)) + (("spice",) if run_cfg.get("spice", False) else ()),
            generate_kwargs=generation_kwargs(run_cfg),
        ).with_exit_eval(run_cfg)

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        self.gt_files = collect_eval_files(datasets, "gt_path")
        return datasets

    def valid_step(self, model, samples: Mapping[str, Any]) -> List[Dict[str, Any]]:
        captions = self.exit_eval.decode(
            model.generate,
            samples,
            use_nucleus_sampling=False,
            num_beams=self.num_beams,
            max_length=self.max_len,
            min_length=self.min_len,
            **self.generate_kwargs,
        )
        return [{"caption": c, "image_id": int(i)} for c, i in zip(captions, samples["image_id"])]

    def score_results(self, results: List[Mapping[str, Any]], split: str) -> Dict[str, float]:
        """The caption metrics of `valid_step` results of `split` (`run.caption_scorers`; no exit figures)."""
        if split not in self.gt_files:
            raise KeyError(
                f"no caption ground truth for split {split!r}: set "
                f"datasets.<name>.build_info.annotations.{split}.gt to a COCO-format file"
            )
        metrics = caption_metrics(results, self.gt_files[split], self.scorers)
        metrics["agg_metrics"] = metrics["CIDEr"]
        return metrics

    @main_process
    def _report_metrics(self, eval_result_file: str, split_name: str) -> Dict[str, float]:
        with open(eval_result_file, "r") as f:
            predictions = json.load(f)
        metrics = self.score_results(predictions, split_name)
        metrics.update(self.exit_metrics)
        record_metrics(split_name, metrics)
        return metrics
