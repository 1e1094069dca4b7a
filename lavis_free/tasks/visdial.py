"""Task ``free_visdial``: VisDial v1.0, answered two ways per round, with exit figures for each.

- Retrieval (VisDial's metrics): the round's 100 answer options are ranked by the model's
  likelihood, `model.score_answers` (teacher-forced; with exits, each token's log-probability
  is read at the exit the decoding rule takes for it, so ranking skips layers for real), then
  R@1/5/10, mean rank and MRR against ``gt_index`` and NDCG against the dense relevance, with
  the official definitions (:mod:`lavis_free.tasks.visdial_metrics`; fractions, as the official
  code reports them; mean rank in 1..100).
- Generation: `model.predict_answers`, exact match after VQA normalisation against the
  ground-truth answer (``answer_accuracy``, percent).

Run config keys: those of ``free_vqa`` (``prompt``, ``max_len``, ``min_len``, ``num_beams``,
``generate_kwargs``, ``compare_full_depth``) plus ``rank_options`` and ``generate_answers``
(both default true). Exit figures of generation keep the names the other tasks use
(``layer_speedup``, ``wallclock_speedup``, ``time_decode_s`` ...); those of ranking are the same
names prefixed ``ranking_``. ``agg_metrics`` is MRR where the split has ground-truth answers,
else NDCG, else the answer accuracy. The ground truth travels in the result file (one row per
round: ``question_id``, ``answer``, ``scores``, ``gt_index``, ``gt_answer``, ``gt_relevance``),
so ranks of every process are scored together.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from lavis.common.registry import registry

from lavis_free.exits.options import ExitOptions
from lavis_free.tasks.answer_metrics import normalize_answer
from lavis_free.tasks.visdial_metrics import retrieval_metrics
from lavis_free.tasks.vqa import FreeVQATask


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"run.{key} must be true or false, got {value!r}")
    return value


@registry.register_task("free_visdial")
class FreeVisDialTask(FreeVQATask):
    result_name = "visdial_result"
    headline_metric = "mrr"
    exit_decodings = ("", "ranking_")
    headline_decoding = "ranking_"

    @classmethod
    def setup_task(cls, cfg) -> "FreeVisDialTask":
        task = super().setup_task(cfg)
        run_cfg = cfg.run_cfg
        task.rank_options = _flag("rank_options", run_cfg.get("rank_options", True))
        task.generate_answers = _flag("generate_answers", run_cfg.get("generate_answers", True))
        if not (task.rank_options or task.generate_answers):
            raise ValueError("run.rank_options and run.generate_answers are both false: nothing to evaluate")
        return task

    def valid_step(self, model, samples: Mapping[str, Any]) -> List[Dict[str, Any]]:
        count = len(samples["question_id"])
        answers = super().valid_step(model, samples) if self.generate_answers else [{} for _ in range(count)]
        scores: Optional[torch.Tensor] = None
        if self.rank_options:
            exit_options = {k: v for k, v in self.generate_kwargs.items() if k in ExitOptions.names()}
            scores = self.exit_evals["ranking_"].decode(model.score_answers, samples, samples["answer_options"], prompt=self.prompt,
                                           **exit_options)
        rows = []
        for i in range(count):
            gt_index, relevance = samples["gt_index"][i], samples["gt_relevance"][i]
            rows.append({
                "question_id": int(samples["question_id"][i]),
                "answer": answers[i].get("answer"),
                "scores": None if scores is None else [round(s, 5) for s in scores[i].tolist()],
                "gt_index": gt_index,
                "gt_answer": None if gt_index is None else samples["answer_options"][i][gt_index],
                "gt_relevance": None if relevance is None else relevance.tolist(),
            })
        return rows

    def score_results(self, results: List[Mapping[str, Any]], split: str) -> Dict[str, float]:
        """The rows carry their ground truth (module docstring): no file is read."""
        return visdial_metrics(results)


def visdial_metrics(rows: List[Mapping[str, Any]]) -> Dict[str, float]:
    """The metrics of ``free_visdial`` result rows (see the module docstring)."""
    if not rows:
        raise ValueError("no VisDial results to score")
    metrics: Dict[str, float] = {}
    ranked = [r for r in rows if r.get("scores") is not None]
    if ranked:
        scores = torch.tensor([r["scores"] for r in ranked])
        metrics.update(retrieval_metrics(scores, [r["gt_index"] for r in ranked], [r["gt_relevance"] for r in ranked]))
    answered = [r for r in rows if r.get("answer") is not None and r.get("gt_answer") is not None]
    if answered:
        hits = [normalize_answer(r["answer"]) == normalize_answer(r["gt_answer"]) for r in answered]
        metrics["answer_accuracy"] = round(100.0 * sum(hits) / len(hits), 2)
        metrics["num_answered"] = len(answered)
    for key in ("mrr", "ndcg", "answer_accuracy"):
        if key in metrics:
            metrics["agg_metrics"] = metrics[key]
            break
    return metrics
