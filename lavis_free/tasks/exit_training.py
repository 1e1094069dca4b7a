"""FREE exit training inside LAVIS tasks: the alternating discriminator / generator loop.

A task gains it by listing `ExitTrainingMixin` first among its bases: when the model has exits
attached (`exits_of(model).early_exits is not None`) its `train_epoch` runs this loop, otherwise
LAVIS's own. The loop talks to the model only through its `AttachedExits` ("host" below), so any
LAVIS model with a host binding trains the same way.

One iteration, for the `free` layout:
  1. the frozen backbone's outputs for the batch: no autograd, optionally read from the on-disk
     feature cache (`run.exit_feature_cache`), since they never change;
  2. the exit features and logits, once, with autograd;
  3. `loss.disc_steps` discriminator steps on those features, detached;
  4. one generator (exit) step: token loss + adversarial loss against the discriminators just
     updated. The exits did not change during step 3, so reusing the features of step 2 is exact.
Layouts `no_adversarial` and `vanilla` have only the generator group and run step 4 with the
token loss alone. Each group has its own optimizer and LR schedule (built by `runner_free`).

Gradients are averaged across processes here, not by DDP: the loop calls the exits directly,
never the wrapped model's `forward`, so DDP's reducer stays idle and each step all-reduces
exactly the parameters it updates (with the step's loss values, so every rank sees the same
metrics and stops together on a non-finite loss).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_world_size, is_dist_avail_and_initialized
from lavis.common.logger import MetricLogger, SmoothedValue
from lavis.common.registry import registry
from lavis.datasets.data_utils import prepare_sample
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lavis_free.common.dist import collective_device
from lavis_free.exits.early_exits import BackboneOutputs
from lavis_free.exits.feature_cache import CACHE_DTYPES, FeatureCache, backbone_fingerprint, image_digests, sample_keys
from lavis_free.hosts import AttachedExits, exits_of

logger = logging.getLogger(__name__)

GENERATOR = "generator"
DISCRIMINATOR = "discriminator"


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stops rather than stepping on it."""


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def has_exits(model: nn.Module) -> bool:
    """True for a model whose exits are being trained (LAVIS's own loop is used otherwise)."""
    host = exits_of(model)
    return host is not None and host.early_exits is not None


@dataclass(frozen=True)
class ExitTrainingSettings:
    """`run.*` keys read by exit training.

    feature_cache: directory of the on-disk backbone feature cache, or None (no cache).
    feature_cache_dtype: "float32" (exact) or "float16" (half the disk, rounded inputs).
    pseudo_max_len / pseudo_min_len: generation lengths of pseudo labels (`run.max_len`,
    `run.min_len`, as LAVIS's captioning task names them).
    """

    feature_cache: Optional[str] = None
    feature_cache_dtype: str = "float32"
    pseudo_max_len: int = 30
    pseudo_min_len: int = 1

    @classmethod
    def from_run_config(cls, run_cfg: Optional[Mapping[str, Any]]) -> "ExitTrainingSettings":
        run_cfg = run_cfg or {}
        if OmegaConf.is_config(run_cfg):
            run_cfg = OmegaConf.to_container(run_cfg, resolve=True)
        cache = run_cfg.get("exit_feature_cache")
        if cache is not None and (not isinstance(cache, str) or not cache):
            raise ValueError(f"run.exit_feature_cache={cache!r}: expected a directory path or null")
        dtype = run_cfg.get("exit_feature_cache_dtype", "float32")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"run.exit_feature_cache_dtype={dtype!r}: allowed values are {sorted(CACHE_DTYPES)}")
        return cls(
            feature_cache=cache,
            feature_cache_dtype=dtype,
            pseudo_max_len=int(run_cfg.get("max_len", cls.pseudo_max_len)),
            pseudo_min_len=int(run_cfg.get("min_len", cls.pseudo_min_len)),
        )


# ---- one iteration ------------------------------------------------------------------------

@contextlib.contextmanager
def frozen(params: List[nn.Parameter]) -> Iterator[None]:
    """Parameters that must not receive gradients for a while (the discriminators while the
    generator loss flows through them)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _average_across_processes(params: List[nn.Parameter], logs: Dict[str, float]) -> Dict[str, float]:
    """Mean gradients of `params` and mean `logs` over the process group (no-op when alone)."""
    if not is_dist_avail_and_initialized() or get_world_size() == 1:
        return logs
    world = get_world_size()
    device = collective_device()
    values = torch.tensor(list(logs.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads]).to(device)
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
    return dict(zip(logs, (values / world).tolist()))


def _check_finite(logs: Mapping[str, float], phase: str, epoch: int, iteration: int) -> None:
    for name, value in logs.items():
        if not torch.isfinite(torch.tensor(value)):
            raise NonFiniteLossError(
                f"non-finite {name}={value} in the {phase} step at epoch {epoch}, iteration {iteration}: "
                f"stopping instead of training on it (lower run.init_lr or run.optim.{phase}.init_lr, "
                f"or check the batch)"
            )


def _update(
    loss: torch.Tensor,
    logs: Dict[str, float],
    optimizer: torch.optim.Optimizer,
    params: List[nn.Parameter],
    scaler: Optional[torch.amp.GradScaler],
    phase: str,
    epoch: int,
    iteration: int,
) -> Dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    logs = _average_across_processes(params, logs)
    _check_finite(logs, phase, epoch, iteration)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return logs


def _autocast(scaler: Optional[torch.amp.GradScaler]) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.float16) if scaler is not None else contextlib.nullcontext()


def discriminator_step(
    host: AttachedExits,
    outputs: Any,
    backbone: BackboneOutputs,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    iteration: int,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> Dict[str, float]:
    """One update of the discriminators on detached exit features (exits get no gradient)."""
    exits = host.early_exits
    with _autocast(scaler):
        loss, logs = exits.discriminator_loss(outputs, backbone)
    return _update(loss, logs, optimizer, list(exits.discriminators.parameters()), scaler, DISCRIMINATOR, epoch, iteration)


def generator_step(
    host: AttachedExits,
    outputs: Any,
    backbone: BackboneOutputs,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    iteration: int,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> Dict[str, float]:
    """One update of the exits: token loss (+ adversarial loss through frozen discriminators)."""
    exits = host.early_exits
    with frozen(list(exits.discriminators.parameters())), _autocast(scaler):
        loss, logs = exits.generator_loss(host.adapter, outputs, backbone)
    params = [p for p in exits.exits.parameters() if p.requires_grad]
    return _update(loss, logs, optimizer, params, scaler, GENERATOR, epoch, iteration)


def train_step(
    host: AttachedExits,
    backbone: BackboneOutputs,
    optimizers: Mapping[str, torch.optim.Optimizer],
    epoch: int,
    iteration: int,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> Dict[str, float]:
    """Exit features once, `disc_steps` discriminator steps (with discriminators), one generator step."""
    with _autocast(scaler):
        outputs = host.early_exits.exit_outputs(host.adapter, backbone)
    stats: Dict[str, float] = {}
    if DISCRIMINATOR in optimizers:
        for _ in range(host.config.loss.disc_steps):
            stats.update(discriminator_step(host, outputs, backbone, optimizers[DISCRIMINATOR], epoch, iteration, scaler))
    stats.update(generator_step(host, outputs, backbone, optimizers[GENERATOR], epoch, iteration, scaler))
    return stats


# ---- what the LM is trained on ------------------------------------------------------------

def _with_prompt(template: str, text: str) -> str:
    return (template.format(text) if template else text).strip()


def _best_answers(samples: Mapping[str, Any]) -> List[str]:
    """VQAv2 batches flatten every question's answers (`answer`, `weight`, `n_answers`):
    the most weighted answer of each question."""
    answers, weights = list(samples["answer"]), samples["weight"].tolist()
    best, start = [], 0
    for n in samples["n_answers"].tolist():
        scores = weights[start: start + n]
        best.append(answers[start + scores.index(max(scores))])
        start += n
    return best


def answer_lm_samples(samples: Dict[str, Any], prompt: str) -> Dict[str, Any]:
    """Batches with answers (dialogue: `text_output`; VQA: `answer`) become `text_input` =
    prompt(question), unscored, and `text_output` = the answer, scored (the host binding's
    convention, `HostBinding.training_batch`); caption batches are returned as they are."""
    if "text_output" in samples:
        answers = list(samples["text_output"])
    elif "answer" in samples and "n_answers" in samples:
        answers = _best_answers(samples)
    else:
        return samples
    prompts = [_with_prompt(prompt, q) for q in samples["text_input"]]
    return {**samples, "text_input": prompts, "text_output": answers}


class PseudoLabels:
    """`loss.mode: pseudo`: the scored text is the full model's own greedy continuation of the
    prompt (captions: the model's prompt; VQA/dialogue: the question), generated once per
    (image, prompt) at full depth with exits off, and reused in later epochs. Images are
    identified by content, so datasets need no ids (and a randomly augmented image is labelled
    anew, as it should be)."""

    def __init__(self, max_len: int, min_len: int):
        self.max_len = max_len
        self.min_len = min_len
        self.texts: Dict[Tuple[Any, str], str] = {}

    def relabel(self, host: AttachedExits, samples: Dict[str, Any]) -> Dict[str, Any]:
        ids = image_digests(samples["image"])
        answers = "text_output" in samples
        model_prompt = getattr(host.model, "prompt", "").strip()
        prompts = list(samples["text_input"]) if answers else [model_prompt] * len(ids)
        keys = list(zip(ids, prompts))
        rows = [row for row, key in enumerate(keys) if key not in self.texts and key not in keys[:row]]
        if rows:
            generated = host.generate_texts(
                samples["image"][rows],
                [prompts[r] for r in rows],
                num_beams=1,
                repetition_penalty=1.0,  # greedy, whatever the host's default (InstructBLIP: 1.5)
                max_length=self.max_len,
                min_length=self.min_len,
                early_exit=False,
            )
            self.texts.update((keys[r], text) for r, text in zip(rows, generated))
        # the prompt unscored, the continuation scored: the host binding's text_output convention
        # (for a T5 host the prompt goes to the encoder, so it must not be part of the target)
        return {**samples, "text_input": prompts, "text_output": [self.texts[key] for key in keys]}


class ExitTrainer:
    """Per-task state of exit training: settings, the feature cache and the pseudo labels."""

    def __init__(self, settings: ExitTrainingSettings):
        self.settings = settings
        self.pseudo = PseudoLabels(settings.pseudo_max_len, settings.pseudo_min_len)
        self._cache: Optional[FeatureCache] = None

    def feature_cache(self, host: AttachedExits) -> Optional[FeatureCache]:
        if self.settings.feature_cache is None:
            return None
        if self._cache is None:
            fingerprint = {
                "model": type(host.model).__name__,
                "backbone": backbone_fingerprint(host.model),
                "exit_layers": list(host.config.layers),
                "labels": "aligned",  # LMBatch's convention (entries of older caches are shifted)
                **host.binding.settings(host.model),
            }
            self._cache = FeatureCache(self.settings.feature_cache, self.settings.feature_cache_dtype, fingerprint)
            logger.info("exit feature cache: %s", self._cache.root)
        return self._cache

    def lm_samples(self, host: AttachedExits, samples: Dict[str, Any], task_samples: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Dict[str, Any]:
        """The task's LM samples, with the scored text replaced by pseudo labels in `pseudo` mode."""
        samples = task_samples(samples)
        if host.config.loss.mode == "pseudo":
            return self.pseudo.relabel(host, samples)
        return samples

    def backbone_outputs(self, host: AttachedExits, samples: Mapping[str, Any]) -> BackboneOutputs:
        """The frozen backbone's outputs: from the feature cache when it holds the whole batch."""
        cache = self.feature_cache(host)
        if cache is None:
            return host.backbone_outputs(samples)
        keys = sample_keys(samples)
        lm_dtype = next(host.lm.parameters()).dtype
        cached = cache.load(keys, samples["image"].device, lm_dtype)
        if cached is not None:
            return cached
        outputs = host.backbone_outputs(samples)
        cache.store(keys, outputs)
        return outputs

    def train_epoch(
        self,
        epoch: int,
        model: nn.Module,
        data_loader: Any,
        optimizer: Any,
        lr_scheduler: Any,
        scaler: Optional[torch.amp.GradScaler] = None,
        cuda_enabled: bool = False,
        log_freq: int = 50,
        accum_grad_iters: int = 1,
        task_samples: Callable[[Dict[str, Any]], Dict[str, Any]] = lambda samples: samples,
    ) -> Dict[str, str]:
        """One epoch of exit training; returns LAVIS-style averaged stats (strings)."""
        if accum_grad_iters != 1:
            raise ValueError(
                f"run.accum_grad_iters={accum_grad_iters}: exit training steps both optimizers every "
                f"iteration; use 1 (raise run.batch_size_train instead)"
            )
        host = exits_of(model)
        # fitted confidence heads describe the exits as they were: they go stale as these train
        host.early_exits.confidence_fitted.fill_(False)
        optimizers, schedulers = _by_group(optimizer, lr_scheduler, list(host.optimizer_groups()))
        metric_logger = MetricLogger(delimiter="  ")
        for group in optimizers:
            metric_logger.add_meter(f"lr_{group}", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        iters = len(data_loader)
        header = f"Train exits ({host.config.layout}, {host.config.loss.mode}): epoch [{epoch}]"
        for i in metric_logger.log_every(range(iters), log_freq, header):
            samples = prepare_sample(next(data_loader), cuda_enabled=cuda_enabled)
            samples = self.lm_samples(host, samples, task_samples)
            for scheduler in schedulers.values():
                scheduler.step(cur_epoch=epoch, cur_step=i)
            backbone = self.backbone_outputs(host, samples)
            metric_logger.update(**train_step(host, backbone, optimizers, epoch, i, scaler))
            metric_logger.update(**{f"lr_{g}": o.param_groups[0]["lr"] for g, o in optimizers.items()})
        metric_logger.synchronize_between_processes()
        if self._cache is not None:
            logger.info("exit feature cache: %d batches read, %d computed", self._cache.hits, self._cache.misses)
        logger.info("Averaged stats: %s", metric_logger.global_avg())
        return {k: f"{meter.global_avg:.3f}" for k, meter in metric_logger.meters.items()}


def _by_group(optimizer: Any, lr_scheduler: Any, groups: List[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """runner_free passes plain objects for one group and dicts for several: always dicts here."""
    if not isinstance(optimizer, Mapping):
        optimizer, lr_scheduler = {groups[0]: optimizer}, {groups[0]: lr_scheduler}
    if sorted(optimizer) != sorted(groups) or sorted(lr_scheduler) != sorted(groups):
        raise ValueError(
            f"exit training needs one optimizer and LR scheduler per group {sorted(groups)}; got "
            f"{sorted(optimizer)} and {sorted(lr_scheduler)} (use run.runner: runner_free)"
        )
    return dict(optimizer), dict(lr_scheduler)


class ExitTrainingMixin:
    """First base of a LAVIS task: exit training when the model has exits, LAVIS's loop otherwise.

    `exit_lm_samples` turns a batch into LM text: VQA and dialogue batches become the task's
    prompt around the question, then the answer (only the answer is scored); captions stay.
    """

    @property
    def exit_trainer(self) -> ExitTrainer:
        """Created on first use from the run config LAVIS registered (`registry.get("configuration")`),
        so tasks need no set-up code of their own."""
        if getattr(self, "_exit_trainer", None) is None:
            config = registry.get("configuration", no_warning=True)
            self._exit_trainer = ExitTrainer(ExitTrainingSettings.from_run_config(config.run_cfg if config is not None else None))
        return self._exit_trainer

    def exit_lm_samples(self, samples: Dict[str, Any]) -> Dict[str, Any]:
        """The batch as the LM is trained on it: answers after their (unscored) prompt, captions as loaded."""
        return answer_lm_samples(samples, getattr(self, "prompt", ""))

    def train_epoch(
        self,
        epoch: int,
        model: nn.Module,
        data_loader: Any,
        optimizer: Any,
        lr_scheduler: Any,
        scaler: Optional[torch.amp.GradScaler] = None,
        cuda_enabled: bool = False,
        log_freq: int = 50,
        accum_grad_iters: int = 1,
    ) -> Dict[str, str]:
        """LAVIS's signature; exit training when the model has exits."""
        if not has_exits(model):
            return super().train_epoch(
                epoch=epoch, model=model, data_loader=data_loader, optimizer=optimizer, lr_scheduler=lr_scheduler,
                scaler=scaler, cuda_enabled=cuda_enabled, log_freq=log_freq, accum_grad_iters=accum_grad_iters,
            )
        return self.exit_trainer.train_epoch(
            epoch, model, data_loader, optimizer, lr_scheduler, scaler=scaler, cuda_enabled=cuda_enabled,
            log_freq=log_freq, accum_grad_iters=accum_grad_iters, task_samples=self.exit_lm_samples,
        )
