"""What the free_* tasks share: extra generation kwargs, ground-truth paths, metric logging."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Mapping

from lavis.common.registry import registry
from omegaconf import DictConfig, OmegaConf


def generation_kwargs(run_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``run.generate_kwargs``: a mapping passed as is to ``model.generate``/``predict_answers``
    (for example the early-exit arguments), so new decoding options need no task change."""
    value = run_cfg.get("generate_kwargs", None)
    if value is None:
        return {}
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, dict):
        raise ValueError(f"run.generate_kwargs must be a mapping of keyword arguments, got {type(value).__name__}")
    return value


def collect_eval_files(datasets: Mapping[str, Mapping[str, Any]], attribute: str) -> Dict[str, str]:
    """Split name -> the ``attribute`` path (e.g. ``gt_path``) of the eval datasets that have one.

    Two datasets giving different files for one split is an error: the task scores one per split.
    """
    files: Dict[str, str] = {}
    for name, splits in datasets.items():
        for split, dataset in splits.items():
            path = getattr(dataset, attribute, None)
            if split == "train" or path is None:
                continue
            if split in files and files[split] != path:
                raise ValueError(f"datasets give two ground truths for split {split!r}: {files[split]} and {path} ({name}); evaluate one dataset per task")
            files[split] = path
    return files


def record_metrics(split: str, metrics: Mapping[str, Any]) -> None:
    """Log the metrics and append them to ``evaluate.txt`` in the run's output dir, as LAVIS does."""
    logging.info("%s metrics: %s", split, json.dumps(metrics))
    with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
        f.write(json.dumps({split: dict(metrics)}) + "\n")
