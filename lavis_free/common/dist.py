"""Distributed set-up that works on CPU (gloo) as well as CUDA (NCCL).

LAVIS's ``init_distributed_mode`` always calls ``torch.cuda.set_device`` and uses NCCL, so a
CPU run under ``python -m torch.distributed.run`` crashes. This version reads the same
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), picks the backend from
``run.device`` and fills the same fields of ``run_cfg`` that LAVIS's runner reads
(``distributed``, ``rank``, ``world_size``, ``gpu``, ``dist_backend``).
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from lavis.common.dist_utils import is_dist_avail_and_initialized, setup_for_distributed

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MIN = 60


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
    ``env://``) and ``run.dist_timeout_min`` (default 60) are optional.
    """
    device = _check_device(str(run_cfg.get("device", "cpu")))
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
    timeout_min = float(run_cfg.get("dist_timeout_min", DEFAULT_TIMEOUT_MIN))
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
        timeout=datetime.timedelta(minutes=timeout_min),
    )
    dist.barrier()
    setup_for_distributed(run_cfg.rank == 0)


def collective_device() -> torch.device:
    """Device a tensor must live on for collectives: CUDA for NCCL, CPU otherwise."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """``dist.barrier()`` when torch.distributed is initialised; nothing in a single process."""
    if is_dist_avail_and_initialized():
        dist.barrier()


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
