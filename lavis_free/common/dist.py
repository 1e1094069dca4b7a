"""Distributed set-up that works on CPU (gloo) as well as CUDA (NCCL).

LAVIS's ``init_distributed_mode`` always calls ``torch.cuda.set_device`` and uses NCCL, so a
CPU run under ``python -m torch.distributed.run`` crashes. This version reads the same
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), picks the backend from
``run.device`` and fills the same fields of ``run_cfg`` that LAVIS's runner reads
(``distributed``, ``rank``, ``world_size``, ``gpu``, ``dist_backend``).

``run.dist_timeout_min`` (minutes, default 30: torch's own ``default_pg_timeout``) is how long a
rank waits for the others at a collective before the run fails. It must outlast the longest
wait a healthy run makes, which is rank 0 working alone while the others wait at a barrier:
downloading weights and annotations, merging the ranks' results and scoring them (minutes with
COCO and SPICE). 30 minutes covers that and is what torch.distributed users already get;
LAVIS never set it, and this plugin used to wait 60. Under gloo, :func:`barrier` is torch's
``monitored_barrier``, so a rank that hangs (alive, never arriving) is named in the error
rather than leaving the others blocked without a word.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, is_dist_avail_and_initialized, setup_for_distributed
from torch.distributed.constants import default_pg_timeout

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MIN = default_pg_timeout.total_seconds() / 60
T = TypeVar("T")
# The process group's timeout, for barrier(): torch's monitored_barrier defaults to the
# backend's default timeout, not to the one the group was created with.
_timeout = default_pg_timeout


def _timeout_from(run_cfg: Any) -> datetime.timedelta:
    """``run.dist_timeout_min`` as a timedelta; a non-number or non-positive value is a config error."""
    value = run_cfg.get("dist_timeout_min", None)
    if value is None:
        return default_pg_timeout
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        minutes = float("nan")
    if not minutes > 0:
        raise ValueError(f"run.dist_timeout_min: {value!r} is not a positive number of minutes (default {DEFAULT_TIMEOUT_MIN:g})")
    return datetime.timedelta(minutes=minutes)


def _check_device(device: str) -> torch.device:
    """Parse ``run.device``; a CUDA device without CUDA is a config error, not a late crash."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"run.device: {device!r} is not a torch device (use 'cpu' or 'cuda')") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"run.device is {device!r} but torch.cuda.is_available() is False; "
            "set run.device: cpu (for example with --options run.device=cpu)"
        )
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"run.device: {device!r} is not supported (use 'cpu' or 'cuda')")
    return parsed


def init_distributed_mode(run_cfg: Any) -> None:
    """Initialise torch.distributed from torch.distributed.run's env vars, or stay single-process.

    Sets ``run_cfg.distributed``, ``rank``, ``world_size``, ``gpu`` and ``dist_backend``.
    Backend: ``nccl`` when ``run.device`` is CUDA, else ``gloo``. ``run.dist_url`` (default
    ``env://``) and ``run.dist_timeout_min`` (default 30, see the module docstring) are optional.
    """
    global _timeout
    device = _check_device(str(run_cfg.get("device", "cpu")))
    timeout = _timeout_from(run_cfg)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        run_cfg.distributed = False
        run_cfg.rank, run_cfg.world_size, run_cfg.gpu = 0, 1, 0
        logger.info("Not using distributed mode (no RANK/WORLD_SIZE in the environment)")
        return

    run_cfg.rank = int(os.environ["RANK"])
    run_cfg.world_size = int(os.environ["WORLD_SIZE"])
    run_cfg.gpu = int(os.environ.get("LOCAL_RANK", 0))
    run_cfg.distributed = True
    if device.type == "cuda":
        torch.cuda.set_device(run_cfg.gpu)
        run_cfg.dist_backend = "nccl"
    else:
        run_cfg.dist_backend = "gloo"
    dist_url = str(run_cfg.get("dist_url", "env://"))
    print(
        f"| distributed init (rank {run_cfg.rank}, world {run_cfg.world_size}, "
        f"backend {run_cfg.dist_backend}): {dist_url}",
        flush=True,
    )
    dist.init_process_group(
        backend=run_cfg.dist_backend,
        init_method=dist_url,
        world_size=run_cfg.world_size,
        rank=run_cfg.rank,
        timeout=timeout,
    )
    _timeout = timeout
    barrier()
    setup_for_distributed(run_cfg.rank == 0)


def collective_device() -> torch.device:
    """Device a tensor must live on for collectives: CUDA for NCCL, CPU otherwise."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (nothing in a single process).

    Under gloo this is ``monitored_barrier(wait_all_ranks=True)``: when the timeout passes,
    rank 0's error lists every rank that did not arrive. Other backends use ``dist.barrier()``.
    """
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() != dist.Backend.GLOO:
        dist.barrier()
        return
    try:
        dist.monitored_barrier(timeout=_timeout, wait_all_ranks=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"rank {get_rank()}: not every rank reached a barrier within run.dist_timeout_min="
            f"{_timeout.total_seconds() / 60:g} min (a rank hung or died; rank 0 names them): {err}"
        ) from err


def shutdown_distributed() -> None:
    """Wait for every rank, then destroy the process group (nothing in a single process).

    Why: a rank that reaches the end first and exits with the group alive can abort in gloo's
    threads ("terminate called without an active exception", exit code -6) while rank 0 is still
    merging and scoring results, which fails the whole torch.distributed.run job."""
    if is_dist_avail_and_initialized():
        barrier()
        dist.destroy_process_group()


def on_main_process(func: Callable[[], T]) -> T:
    """``func()`` run on rank 0 only, its result given to every rank.

    An exception it raises is raised on every rank too, so that no rank is left waiting for a
    rank 0 that has failed.
    """
    outcome: Any = None
    if get_rank() == 0:
        try:
            outcome = (func(), None)
        except Exception as err:  # re-raised below, on every rank
            outcome = (None, err)
    value, error = broadcast_object(outcome)
    if error is not None:
        raise error
    return value


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_values(value: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a small tensor (``[value]`` in a single process), on the CPU."""
    if not is_dist_avail_and_initialized():
        return [value.detach().cpu()]
    local = value.detach().to(collective_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [g.cpu() for g in gathered]
