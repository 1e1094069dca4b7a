"""What ``train.py`` and ``evaluate.py`` share: arguments, config, process set-up, runner.

Mirrors LAVIS's own (unshipped) scripts: config from ``--cfg-path`` with ``--options key=value``
overrides, distributed init, per-rank seeds, logging, then task, datasets, model and runner.
Differences: ``import lavis_free`` comes first (compat fixes, registrations), distributed init
is CPU-safe, registered names and ``run``/``model`` keys are checked up front with errors that
list the valid ones, and every run gets a job dir of its own, created by rank 0 before any work
and shared with the other ranks (:func:`lavis_free.common.paths.claim_job_dir`).
"""
from __future__ import annotations

import argparse
import logging
import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

import lavis_free  # noqa: F401  (compat fixes and registrations before lavis is used)
import lavis.tasks as tasks
from lavis_free.common.config import FreeConfig
from lavis.common.dist_utils import get_rank
from lavis.common.logger import setup_logger
from lavis.common.registry import registry

from lavis_free.common.dist import init_distributed_mode, on_main_process
from lavis_free.common.paths import claim_job_dir

logger = logging.getLogger(__name__)


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``--cfg-path`` (required), ``--options k=v ...``, optional ``--job-id``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to a LAVIS project YAML")
    parser.add_argument(
        "--options",
        nargs="+",
        default=[],
        help="override settings of the YAML, as key=value (for example run.max_epoch=1)",
    )
    parser.add_argument(
        "--job-id",
        default=None,
        help="output sub-directory name; it must not exist yet (default: a timestamp, with a suffix if taken)",
    )
    return parser.parse_args(argv)


def _check_name(kind: str, key: str, name: Any, known: list[str]) -> None:
    if name not in known:
        raise ValueError(f"{key}: {name!r} is not a registered {kind}; registered: {known}")


def dot_list(options: Sequence[str]) -> list[str]:
    """``--options`` as ``key=value`` strings; LAVIS also accepts ``key value`` pairs."""
    options = list(options)
    if not options or "=" in options[0]:
        return options
    if len(options) % 2:
        raise ValueError(f"--options: {options} is neither key=value items nor key value pairs")
    return [f"{key}={value}" for key, value in zip(options[0::2], options[1::2])]


def check_registered_names(cfg_path: str, options: Sequence[str]) -> None:
    """Fail early, naming the key, when the YAML names a model/dataset/task/runner LAVIS lacks."""
    raw = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(dot_list(options)))
    for section in ("model", "datasets", "run"):
        if raw.get(section, None) is None:
            raise ValueError(f"{cfg_path}: missing top-level section {section!r}")
    _check_name("model", "model.arch", raw.model.get("arch", None), registry.list_models())
    for name in raw.datasets:
        _check_name("dataset builder", f"datasets.{name}", name, registry.list_datasets())
    _check_name("task", "run.task", raw.run.get("task", None), registry.list_tasks())
    _check_name("runner", "run.runner", raw.run.get("runner", "runner_base"), registry.list_runners())


def setup_seeds(seed: int) -> None:
    """Seed python, numpy and torch with ``seed + rank`` (as LAVIS does)."""
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_runner(args: argparse.Namespace) -> Any:
    """Config, distributed init, seeds, logger, task, datasets, model -> the configured runner."""
    check_registered_names(args.cfg_path, args.options)
    cfg = FreeConfig(args)
    init_distributed_mode(cfg.run_cfg)
    setup_seeds(int(cfg.run_cfg.get("seed", 42)))
    setup_logger()
    cfg.pretty_print()
    output_root = cfg.run_cfg.get("output_dir", None)
    if not output_root:
        raise ValueError(f"{args.cfg_path}: run.output_dir is required (the directory job dirs are created in)")
    job_id = on_main_process(lambda: claim_job_dir(str(output_root), args.job_id)).name

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))
    runner = runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    logger.info("Output directory: %s", runner.output_dir)
    return runner
