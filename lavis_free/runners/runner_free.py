"""``runner_free``: LAVIS's epoch runner made to work on CPU, under gloo or NCCL, with several optimizers.

Chosen with ``run.runner: runner_free``. It keeps LAVIS's ``RunnerBase`` interface and
dataloader/dataset handling and overrides what breaks outside a single-node CUDA set-up
(file:line references are to lavis 1.0.2):

1. ``model`` (``runner_base.py:85``) returned None when the model was already on the device; here
   the model is moved and wrapped once.
2. ``PrefetchLoader`` (``runner_base.py:538``) creates CUDA streams; see :mod:`.loaders`.
3. The unconditional ``dist.barrier()`` (``runner_base.py:406``) runs only when distributed.
4. Evaluation passes ``cuda_enabled`` (``runner_base.py:469`` moved batches to CUDA always).
5. Process-group set-up is :func:`lavis_free.common.dist.init_distributed_mode` (gloo on CPU).
6. DDP gets ``device_ids=None`` on CPU; ``find_unused_parameters`` is ``run.find_unused_parameters``
   (default true: FREE's alternating steps leave half of the trainables unused).
7. LAVIS's MetricLogger all-reduces a CUDA tensor; distributed CPU epochs run under
   :class:`lavis_free.common.device_mode.cuda_requests_on_cpu`.

Also: ``run.output_dir`` is relative to the current directory (LAVIS put it inside its package),
registry paths are replaced so several runners can live in one process, checkpoints hold only
the trainable state and resume verifies it, the test phase falls back to the current weights
when validation never produced a best checkpoint, and a model may declare several optimizer
groups (see :mod:`.optim`).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lavis.common.dist_utils import get_world_size, is_main_process, main_process
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP

from lavis_free.common.device_mode import cuda_requests_on_cpu
from lavis_free.common.dist import barrier, gather_values
from lavis_free.common.files import write_atomically
from lavis_free.common.paths import output_dir_for, set_registry_path
from lavis_free.common.safe_load import load_torch_file
from lavis_free.hosts import exits_of
from lavis_free.hosts.attached import EXIT_METADATA
from lavis_free.runners import optim
from lavis_free.runners.checkpoint import load_trainable_state, trainable_state_dict
from lavis_free.runners.loaders import build_loaders, check_train_split

logger = logging.getLogger(__name__)

BEST_CHECKPOINT = "checkpoint_best.pth"
LATEST_CHECKPOINT = "checkpoint_latest.pth"
_CHECKPOINT_KEYS = ("model", "optimizers", "lr_schedulers", "epoch")


@registry.register_runner("runner_free")
class RunnerFree(RunnerBase):
    """Epoch-based runner; ``optimizers`` / ``lr_schedulers`` are dicts keyed by group name."""

    def __init__(self, cfg: Any, task: Any, model: torch.nn.Module, datasets: dict, job_id: str):
        self._optimizers: Optional[dict[str, torch.optim.Optimizer]] = None
        self._lr_schedulers: Optional[dict[str, Any]] = None
        self._amp_warned = False
        self.best_agg_metric = 0.0
        self.best_epoch = 0
        self._datasets_by_name = datasets  # LAVIS regroups self.datasets by split once loaders exist
        super().__init__(cfg, task, model, datasets, job_id)

    # ---- configuration ------------------------------------------------------------------
    def _required(self, key: str) -> Any:
        value = self.config.run_cfg.get(key, None)
        if value is None:
            raise ValueError(f"run.{key} is required by runner_free")
        return value

    @property
    def max_epoch(self) -> int:
        return int(self._required("max_epoch"))

    @property
    def find_unused_parameters(self) -> bool:
        return bool(self.config.run_cfg.get("find_unused_parameters", True))

    # ---- model, optimizers --------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The model on ``run.device``, wrapped in DDP when distributed and something trains."""
        if self._wrapped_model is None:
            self._model = self._model.to(self.device)
            trains = any(p.requires_grad for p in self._model.parameters())
            if self.use_distributed and trains:
                self._wrapped_model = DDP(
                    self._model,
                    device_ids=[self.config.run_cfg.gpu] if self.cuda_enabled else None,
                    find_unused_parameters=self.find_unused_parameters,
                )
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    def unwrap_dist_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DDP) else model

    def _build_optimizers(self) -> None:
        model = self.unwrap_dist_model(self.model)
        groups = optim.parameter_groups(model)
        settings = optim.group_settings(self.config.run_cfg, list(groups))
        self._optimizers, self._lr_schedulers = {}, {}
        for name, named_params in groups.items():
            count = sum(p.numel() for _, p in named_params)
            logger.info("optimizer group %r: %d trainable parameters, %s", name, count, settings[name])
            self._optimizers[name] = optim.build_optimizer(named_params, settings[name])
            self._lr_schedulers[name] = optim.build_scheduler(self._optimizers[name], settings[name], self.max_epoch)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW per optimizer group (``main`` unless the model defines ``optimizer_groups``)."""
        if self._optimizers is None:
            self._build_optimizers()
        return self._optimizers

    @property
    def lr_schedulers(self) -> dict[str, Any]:
        """One LAVIS LR scheduler per optimizer group."""
        if self._lr_schedulers is None:
            self._build_optimizers()
        return self._lr_schedulers

    def _single(self, objects: dict[str, Any], what: str) -> Any:
        if len(objects) != 1:
            raise AttributeError(f"the model has optimizer groups {sorted(objects)}; use runner.{what}s")
        return next(iter(objects.values()))

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._single(self.optimizers, "optimizer")

    @property
    def lr_scheduler(self) -> Any:
        return self._single(self.lr_schedulers, "lr_scheduler")

    @property
    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """A GradScaler with ``run.amp`` on CUDA; none on CPU (autocast there is CUDA-only in LAVIS)."""
        if not self.config.run_cfg.get("amp", False):
            return None
        if not self.cuda_enabled:
            if not self._amp_warned:
                logger.warning("run.amp is set but run.device is CPU: training in float32 without a GradScaler")
                self._amp_warned = True
            return None
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    # ---- data ---------------------------------------------------------------------------
    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        return build_loaders(
            datasets=datasets,
            batch_sizes=batch_sizes,
            is_trains=is_trains,
            collate_fns=collate_fns,
            num_workers=num_workers,
            distributed=self.use_distributed,
            dist_eval_sampler=self.use_dist_eval_sampler,
            cuda=self.cuda_enabled,
            dataset_ratios=dataset_ratios,
        )

    # ---- output -------------------------------------------------------------------------
    def setup_output_dir(self) -> None:
        """``run.output_dir/job_id`` (relative to the current directory) and its ``result/``."""
        output_dir = output_dir_for(str(self._required("output_dir")), self.job_id)
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        set_registry_path("output_dir", output_dir)
        set_registry_path("result_dir", result_dir)
        self.output_dir, self.result_dir = output_dir, result_dir

    # ---- loop ---------------------------------------------------------------------------
    def _collectives_context(self) -> contextlib.AbstractContextManager:
        if self.use_distributed and not self.cuda_enabled:
            return cuda_requests_on_cpu()
        return contextlib.nullcontext()

    def train(self) -> None:
        start_time = time.time()
        valid_splits = list(self.valid_splits)
        self.log_config()
        if self.evaluate_only and not valid_splits and not self.test_splits:
            raise ValueError("run.evaluate is True but run.valid_splits and run.test_splits are empty: nothing to evaluate")
        if not self.evaluate_only:
            for split in self.train_splits:
                check_train_split(split, self._datasets_by_name, int(self._required("batch_size_train")), get_world_size())
            if self._optimizers is None:
                self._build_optimizers()  # validates the optimizer settings before any work
            if self.resume_ckpt_path is not None:
                self._load_checkpoint(self.resume_ckpt_path)
        cur_epoch = self.start_epoch
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                logger.info("Start training epoch %d of %d", cur_epoch, self.max_epoch)
                self.log_stats(split_name="train", stats=self.train_epoch(cur_epoch))
                self._check_replicas_agree()
            for split_name in valid_splits:
                self._validate(split_name, cur_epoch)
            if self.evaluate_only:
                break
            self._save_checkpoint(cur_epoch, is_best=False)
            barrier()
        if self.test_splits:
            self.evaluate(cur_epoch="best" if valid_splits else cur_epoch, skip_reload=self.evaluate_only)
        logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))

    def evaluate(self, cur_epoch: Any = "best", skip_reload: bool = False) -> dict:
        """Test on every split of ``run.test_splits``; with none, an error rather than a run that
        succeeds having evaluated nothing."""
        if not self.test_splits:
            raise ValueError(
                "run.test_splits is empty: nothing to evaluate. Name the splits to test, e.g. "
                "--options run.test_splits=[test]"
            )
        return super().evaluate(cur_epoch=cur_epoch, skip_reload=skip_reload)

    def _task_optim_args(self) -> tuple[Any, Any]:
        """Plain optimizer/scheduler for one group (LAVIS tasks), dicts for several."""
        if len(self.optimizers) == 1:
            return self.optimizer, self.lr_scheduler
        return self.optimizers, self.lr_schedulers

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        optimizer, lr_scheduler = self._task_optim_args()
        with self._collectives_context():
            return self.task.train_epoch(
                epoch=epoch,
                model=self.model,
                data_loader=self.train_loader,
                optimizer=optimizer,
                scaler=self.scaler,
                lr_scheduler=lr_scheduler,
                cuda_enabled=self.cuda_enabled,
                log_freq=self.log_freq,
                accum_grad_iters=self.accum_grad_iters,
            )

    def _check_replicas_agree(self) -> None:
        """Compare a checksum of the trainable weights across ranks; only rank 0 saves them."""
        if not self.use_distributed:
            return
        params = [p.detach().double() for p in self.unwrap_dist_model(self.model).parameters() if p.requires_grad]
        checksum = torch.stack([sum(p.sum() for p in params), sum(p.abs().sum() for p in params)])
        values = gather_values(checksum)
        if any(not torch.allclose(v, values[0], rtol=1e-9, atol=0.0) for v in values):
            raise RuntimeError(f"trainable weights differ across ranks (checksums {[v.tolist() for v in values]})")
        logger.info("trainable-weight checksum agrees across %d ranks: %s", len(values), values[0].tolist())

    def _validate(self, split_name: str, cur_epoch: int) -> None:
        logger.info("Evaluating on %s.", split_name)
        val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
        if val_log is None or not is_main_process():
            return
        if "agg_metrics" not in val_log:
            raise ValueError(
                f"{type(self.task).__name__}.after_evaluation returned no 'agg_metrics' for split "
                f"{split_name!r} (needed to pick the best checkpoint)"
            )
        if split_name == "val" and val_log["agg_metrics"] > self.best_agg_metric:
            self.best_epoch, self.best_agg_metric = cur_epoch, float(val_log["agg_metrics"])
            self._save_checkpoint(cur_epoch, is_best=True)
        self.log_stats({**val_log, "best_epoch": self.best_epoch}, split_name)

    @torch.no_grad()
    def eval_epoch(self, split_name: str, cur_epoch: Any, skip_reload: bool = False) -> Any:
        data_loader = self.dataloaders.get(split_name, None)
        if data_loader is None:
            raise ValueError(
                f"run.valid_splits/test_splits name split {split_name!r}, but the datasets have "
                f"splits {sorted(self.dataloaders)}"
            )
        model = self.unwrap_dist_model(self.model)
        if not skip_reload and cur_epoch == "best":
            model = self._reload_best_model(model)
        model.eval()
        with self._collectives_context():
            self.task.before_evaluation(model=model, dataset=self.datasets[split_name])
            results = self.task.evaluation(model, data_loader, cuda_enabled=self.cuda_enabled)
            if results is None:
                return None
            return self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch)

    # ---- checkpoints --------------------------------------------------------------------
    @main_process
    def _save_checkpoint(self, cur_epoch: int, is_best: bool = False) -> None:
        """``checkpoint_best.pth``, else ``checkpoint_latest.pth`` with validation, else per epoch."""
        if is_best:
            name = BEST_CHECKPOINT
        else:
            name = LATEST_CHECKPOINT if self.valid_splits else f"checkpoint_{cur_epoch}.pth"
        model = self.unwrap_dist_model(self.model)
        save_obj = {
            "model": trainable_state_dict(model),
            EXIT_METADATA: exits_of(model).exit_metadata() if exits_of(model) is not None else None,
            "optimizers": {g: o.state_dict() for g, o in self.optimizers.items()},
            "lr_schedulers": {g: optim.scheduler_state(s) for g, s in self.lr_schedulers.items()},
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
            "best_agg_metric": self.best_agg_metric,
            "best_epoch": self.best_epoch,
            "config": self.config.to_dict(),
        }
        path = Path(self.output_dir) / name
        logger.info("Saving checkpoint at epoch %d to %s.", cur_epoch, path)
        write_atomically(path, lambda partial: torch.save(save_obj, partial))

    def _reload_best_model(self, model: torch.nn.Module) -> torch.nn.Module:
        path = Path(self.output_dir) / BEST_CHECKPOINT
        if not path.is_file():
            logger.warning(
                "No %s (the validation agg_metrics never rose above %s): testing the current, "
                "latest weights instead",
                path,
                self.best_agg_metric,
            )
            return model
        checkpoint = load_torch_file(str(path), "best checkpoint of this run")
        _load_model_state(model, checkpoint, f"{path} (best checkpoint of this run)")
        return model

    def _load_checkpoint(self, url_or_filename: str) -> None:
        """Resume model, optimizers, schedulers, scaler and epoch from a runner_free checkpoint."""
        path = Path(url_or_filename)
        if not path.is_file():
            raise FileNotFoundError(f"run.resume_ckpt_path: {path} is not a file")
        checkpoint = load_torch_file(str(path), "run.resume_ckpt_path")
        absent = [k for k in _CHECKPOINT_KEYS if k not in checkpoint]
        if absent:
            raise ValueError(f"{path}: not a runner_free checkpoint (no {absent}); it cannot be resumed")
        _load_model_state(self.unwrap_dist_model(self.model), checkpoint, f"{path} (run.resume_ckpt_path)")
        if set(checkpoint["optimizers"]) != set(self.optimizers):
            raise ValueError(
                f"{path}: checkpoint has optimizer groups {sorted(checkpoint['optimizers'])}, "
                f"the model has {sorted(self.optimizers)}"
            )
        for group, optimizer in self.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][group])
            changed = optim.load_scheduler_state(self.lr_schedulers[group], checkpoint["lr_schedulers"].get(group))
            if changed:
                logger.warning("LR schedule of group %r differs from the checkpoint's (saved, now): %s", group, changed)
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = int(checkpoint["epoch"]) + 1
        self.best_agg_metric = float(checkpoint.get("best_agg_metric", 0.0))
        self.best_epoch = int(checkpoint.get("best_epoch", 0))
        logger.info("Resumed from %s: continuing at epoch %d", path, self.start_epoch)


def _load_model_state(model: torch.nn.Module, checkpoint: dict, source: str) -> None:
    """A runner checkpoint's model state onto ``model``; with exits, their layers, layout, LM depth
    and backbone are checked against the checkpoint's record first (they all fit the key check)."""
    if exits_of(model) is not None:
        exits_of(model).check_exit_state(checkpoint["model"], source, checkpoint.get(EXIT_METADATA))
    load_trainable_state(model, checkpoint["model"], source)
