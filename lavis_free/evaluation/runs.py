"""A LAVIS project loaded for evaluation, and one split decoded with given exit settings.

Why this module: the sweep, the calibration and the oracle all need the same steps, done the way
LAVIS does them so that any project YAML works: Config from `--cfg-path` and `--options`, then
`task.build_datasets` and `task.build_model`; a DataLoader over (a prefix of) one eval split;
decoding through the task's own `valid_step` with the exit settings put into the task's
`generate_kwargs`; scoring with the task's metric function, without a runner.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import lavis_free  # noqa: F401  (compat fixes and registrations before lavis is used)
import lavis.tasks as lavis_tasks
from lavis_free.common.config import FreeConfig
from lavis.datasets.data_utils import prepare_sample

from lavis_free.common.launch import check_registered_names, setup_seeds
from lavis_free.exits.options import ExitOptions
from lavis_free.tasks.exit_eval import ExitTally


EXIT_SETTING_KEYS = ExitOptions.names()
FULL_DEPTH = {"early_exit": False}  # the settings of a full-depth decoding


@dataclass
class Project:
    """What one project YAML builds: task, model (eval mode, on `device`) and datasets."""

    cfg_path: str
    task: Any
    model: torch.nn.Module
    datasets: Dict[str, Dict[str, Dataset]]
    device: torch.device
    batch_size: int
    base_generate_kwargs: Dict[str, Any] = field(default_factory=dict)

    def dataset(self, split: str, name: Optional[str] = None) -> Dataset:
        """The `split` dataset of `name` (or of the project's only dataset)."""
        if name is None:
            if len(self.datasets) != 1:
                raise ValueError(f"{self.cfg_path} has datasets {sorted(self.datasets)}: choose one with --dataset")
            name = next(iter(self.datasets))
        if name not in self.datasets:
            raise ValueError(f"--dataset {name!r} is not in {self.cfg_path}; it has {sorted(self.datasets)}")
        splits = self.datasets[name]
        if split not in splits:
            raise ValueError(f"split {split!r} is not built for dataset {name!r}; splits: {sorted(splits)}")
        return splits[split]


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every evaluation command shares (project, device, data size)."""
    parser.add_argument("--cfg-path", required=True, help="LAVIS project YAML (e.g. projects/free/shapes_caption.yaml)")
    parser.add_argument("--options", nargs="+", default=[], help="key=value overrides of the YAML (LAVIS style)")
    parser.add_argument("--dataset", default=None, help="dataset name when the YAML has several")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples of each split")
    parser.add_argument("--batch-size", type=int, default=None, help="default: run.batch_size_eval")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--confidence", default=None, help="max_prob | margin | entropy | learned (default: the model config's)")
    parser.add_argument("--min-exit-layer", type=int, default=None, help="default: the model config's")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is fastest for tiny models on busy CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load_project(cfg_path: str, options: Sequence[str] = (), device: Optional[str] = None, batch_size: Optional[int] = None,
                 threads: Optional[int] = None) -> Project:
    """Task, datasets and model of a project YAML, built by LAVIS as `evaluate.py` would."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    check_registered_names(cfg_path, options)
    cfg = FreeConfig(argparse.Namespace(cfg_path=cfg_path, options=list(options)))
    setup_seeds(int(cfg.run_cfg.get("seed", 42)))  # as train.py: a random backbone (`tiny`) is rebuilt alike
    task = lavis_tasks.setup_task(cfg)
    if not hasattr(task, "exit_eval"):
        raise ValueError(
            f"run.task={cfg.run_cfg.task!r} does not report exit figures; use free_captioning, free_vqa, free_dialogue or free_visdial"
        )
    datasets = task.build_datasets(cfg)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = task.build_model(cfg).to(target).eval()
    size = int(batch_size if batch_size is not None else cfg.run_cfg.get("batch_size_eval", 8))
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {size}")
    return Project(cfg_path, task, model, datasets, target, size, dict(getattr(task, "generate_kwargs", {})))


def project_from_args(args: argparse.Namespace) -> Project:
    """`load_project` with the arguments of `add_project_arguments`."""
    return load_project(args.cfg_path, args.options, args.device, args.batch_size, args.threads)


def split_loader(project: Project, split: str, max_samples: Optional[int] = None, dataset: Optional[str] = None) -> DataLoader:
    """A sequential loader over the first `max_samples` items (all when None) of `split`."""
    full = project.dataset(split, dataset)
    data = full
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
        data = Subset(full, range(min(max_samples, len(full))))
    collate = getattr(full, "collater", None)
    return DataLoader(data, batch_size=project.batch_size, shuffle=False, num_workers=0, collate_fn=collate)


def default_metric(task: Any) -> str:
    """The headline quality metric of a task (its `headline_metric`: CIDEr for captions,
    accuracy for answers, MRR for VisDial)."""
    return task.headline_metric


def check_scored_split(project: Project, split: str, flag: str = "--split") -> None:
    """Refuses, before anything is decoded, a split without ground truth (e.g. train) rather
    than after decoding it; `flag` is the command-line option that named it."""
    gt_files = getattr(project.task, "gt_files", {})
    if split not in gt_files:
        raise ValueError(f"{flag} {split}: no ground truth known for this split (splits with one: {sorted(gt_files)})")


def scored_loader(project: Project, split: str, max_samples: Optional[int] = None, dataset: Optional[str] = None,
                  flag: str = "--split") -> DataLoader:
    """`split_loader` for a split whose decodes will be scored (see `check_scored_split`)."""
    check_scored_split(project, split, flag)
    return split_loader(project, split, max_samples, dataset)


def quality_metrics(task: Any, results: List[Mapping[str, Any]], split: str) -> Dict[str, float]:
    """Scores `valid_step` results of `split` (one `scored_loader` accepted) with the task's own
    metrics (`score_results`; captions: the task's `run.caption_scorers`; METEOR is slow to
    start, so sweeps may leave it out)."""
    return task.score_results(results, split)


@dataclass
class SettingRun:
    """One decoding of a split: task results, quality metrics and the exit tally."""

    settings: Dict[str, Any]
    results: List[Mapping[str, Any]]
    metrics: Dict[str, float]
    tallies: Dict[str, ExitTally]  # per decoding of the task (`exit_decodings`; "" = generation)
    headline: str = ""  # the decoding the task's headline metric judges (VisDial's MRR: "ranking_")

    @property
    def tally(self) -> ExitTally:
        """The tally of the decoding the quality figure belongs to."""
        return self.tallies[self.headline]

    def figures(self, metric: str) -> Dict[str, Any]:
        """The row of a sweep or report. Time is given per sample (one caption or answer) and
        throughput per token, each for this decoding and for the full-depth decoding of the same
        samples (timed beside it; a full-depth run is its own reference): the wall-clock speedup
        is the ratio of the per-sample times, which differs from the ratio of tokens/s when the
        two decodings generate different numbers of tokens. `avg_exit_layer` is the average
        number of decoder layers run per token (README: layer numbering)."""
        if metric not in self.metrics:
            raise ValueError(f"--metric {metric!r} is not reported; available: {sorted(self.metrics)}")
        summary = self.tally.summary()
        tally = self.tally
        beside = tally.full_seconds > 0
        full_seconds, full_tokens = (tally.full_seconds, tally.full_tokens) if beside else (tally.seconds, tally.tokens)
        samples = max(len(self.results), 1)
        return {
            **{k: v for k, v in self.settings.items() if k in EXIT_SETTING_KEYS},
            "quality": float(self.metrics[metric]),
            "avg_exit_layer": summary.get("avg_exit_layer"),
            "layer_speedup": summary.get("layer_speedup"),
            "wallclock_speedup": summary.get("wallclock_speedup", 1.0),
            "ms_per_sample": 1000 * tally.seconds / samples,
            "full_depth_ms_per_sample": 1000 * full_seconds / samples,
            "tokens_per_s": summary.get("tokens_per_s"),
            "full_depth_tokens_per_s": summary.get("full_depth_tokens_per_s", summary.get("tokens_per_s")),
            "num_samples": len(self.results),
            "num_tokens": tally.tokens,
            "full_depth_num_tokens": full_tokens,
            "seconds": tally.seconds,
            "full_depth_seconds": full_seconds,
            "histogram": list(self.tally.histogram),
            "metrics": dict(self.metrics),
        }


def decode_split(project: Project, loader: Iterable[Any], settings: Mapping[str, Any], desc: str = "decode",
                 progress: bool = True) -> Tuple[List[Mapping[str, Any]], Dict[str, ExitTally]]:
    """Runs the task's `valid_step` over the loader with `settings` added to its generate kwargs;
    returns the results and the tally of each of the task's decodings. With exits enabled, each
    batch is also decoded at full depth right beside it, so the wall-clock speedup compares
    timings taken under the same machine load."""
    task = project.task
    unknown = sorted(set(settings) - set(EXIT_SETTING_KEYS))
    if unknown:
        raise ValueError(f"unknown exit settings {unknown}; allowed: {EXIT_SETTING_KEYS}")
    task.generate_kwargs = {**project.base_generate_kwargs, **{k: v for k, v in settings.items() if v is not None}}
    task.reset_exit_evals(compare_full_depth=ExitOptions().override(**settings).enabled)
    results: List[Mapping[str, Any]] = []
    try:
        for samples in tqdm(loader, desc=desc, leave=False, disable=not progress):
            samples = prepare_sample(samples, cuda_enabled=project.device.type == "cuda")
            results.extend(task.valid_step(model=project.model, samples=samples))
    finally:
        task.generate_kwargs = dict(project.base_generate_kwargs)
    if not any(evaluator.tally.tokens for evaluator in task.exit_evals.values()):
        raise RuntimeError(
            f"{type(task).__name__}.valid_step decoded without exit stats: the model must be an "
            "early-exit model (blip2_opt_free) and valid_step must decode through self.exit_eval.decode"
        )
    return results, {name: evaluator.tally for name, evaluator in task.exit_evals.items()}


def run_setting(project: Project, loader: DataLoader, split: str, settings: Mapping[str, Any], desc: str = "decode",
                progress: bool = True) -> SettingRun:
    """Decodes and scores `split` with these exit settings."""
    results, tallies = decode_split(project, loader, settings, desc=desc, progress=progress)
    return SettingRun(dict(settings), results, quality_metrics(project.task, results, split), tallies,
                      headline=project.task.headline_decoding)


def warm_up(project: Project, loader: DataLoader, settings: Mapping[str, Any]) -> None:
    """Decodes the first batch once at full depth and once with `settings`, untimed, so lazy
    initialisation does not land in the first timed setting."""
    first = [next(iter(loader))]
    for decoding in (FULL_DEPTH, settings):
        decode_split(project, first, decoding, progress=False)
