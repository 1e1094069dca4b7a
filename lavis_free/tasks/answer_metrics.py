"""VQAv2 accuracy and dialogue exact-match accuracy, callable without a LAVIS runner.

Answers are normalised with the VQAv2 rules LAVIS ships (``VQAEval.processPunctuation`` and
``processDigitArticle``: punctuation, articles, number words -> digits), applied to both the
prediction and the human answers. VQA accuracy is the official VQAv2 formula: for each of the
human answers, min(#matches among the *other* humans / 3, 1), averaged, so an answer given by 3
of 10 humans scores 0.9 and one given by 4 or more scores 1. All results are in percent, as
LAVIS reports them.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Sequence

from lavis.common.vqa_tools.vqa_eval import VQAEval

from lavis_free.datasets.annotations import DIALOGUE, VQA, dialogue_rounds, load_annotation_file

_NORMALISER = VQAEval()


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _NORMALISER.processDigitArticle(_NORMALISER.processPunctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy in [0, 1] of one prediction against the human answers."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in answers]
    if len(humans) == 1:
        return float(pred == humans[0])
    total = 0.0
    for i in range(len(humans)):
        matches = sum(1 for j, h in enumerate(humans) if j != i and h == pred)
        total += min(matches / 3.0, 1.0)
    return total / len(humans)


def _answers_by_id(predictions: Sequence[Mapping], known: Mapping[int, object], source: str) -> Dict[int, str]:
    answers: Dict[int, str] = {}
    for index, pred in enumerate(predictions):
        if not isinstance(pred, Mapping) or "question_id" not in pred or not isinstance(pred.get("answer"), str):
            raise ValueError(f"prediction {index} must be an object with 'question_id' and a string 'answer', got {pred!r}")
        qid = int(pred["question_id"])
        if qid not in known:
            raise ValueError(f"prediction {index} has question_id {qid}, which is not in {source}")
        answers.setdefault(qid, pred["answer"])
    if not answers:
        raise ValueError("no predictions to score")
    return answers


def _percent(values: List[float]) -> float:
    return round(100.0 * sum(values) / len(values), 2)


def vqa_metrics(predictions: Sequence[Mapping], ann_path: str) -> Dict[str, float]:
    """``[{"question_id", "answer"}]`` against a VQA annotation file: overall and per question type."""
    rows = {row["question_id"]: row for row in load_annotation_file(ann_path, VQA)}
    answers = _answers_by_id(predictions, rows, ann_path)
    per_type: Dict[str, List[float]] = defaultdict(list)
    overall = []
    for qid, answer in answers.items():
        acc = vqa_accuracy(answer, rows[qid]["answer"])
        overall.append(acc)
        per_type[rows[qid].get("question_type", "other")].append(acc)
    metrics = {"accuracy": _percent(overall), "num_questions": len(overall)}
    metrics.update({f"accuracy_{t}": _percent(v) for t, v in sorted(per_type.items())})
    metrics["agg_metrics"] = metrics["accuracy"]
    return metrics


def dialogue_metrics(predictions: Sequence[Mapping], ann_path: str) -> Dict[str, float]:
    """Exact match (after normalisation) of ``[{"question_id", "answer"}]``; overall and per round."""
    rounds = {r["question_id"]: r for r in dialogue_rounds(load_annotation_file(ann_path, DIALOGUE))}
    answers = _answers_by_id(predictions, rounds, ann_path)
    per_round: Dict[int, List[float]] = defaultdict(list)
    overall = []
    for qid, answer in answers.items():
        hit = float(normalize_answer(answer) == normalize_answer(rounds[qid]["answer"]))
        overall.append(hit)
        per_round[qid % 10 + 1].append(hit)
    metrics = {"accuracy": _percent(overall), "num_questions": len(overall)}
    metrics.update({f"accuracy_round{k}": _percent(v) for k, v in sorted(per_round.items())})
    metrics["agg_metrics"] = metrics["accuracy"]
    return metrics
