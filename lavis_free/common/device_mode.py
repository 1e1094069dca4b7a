"""Run LAVIS code that asks for CUDA tensors in a CPU-only process.

LAVIS's ``SmoothedValue.synchronize_between_processes`` (``lavis/common/logger.py:43``), called
at the end of every ``BaseTask`` training epoch, builds its all-reduce buffer with
``device="cuda"``. Under gloo on CPU that is the only CUDA request left, and it cannot be
overridden from outside the task's inner loop. :func:`cuda_requests_on_cpu` is a torch function
mode (the mechanism behind ``torch.set_default_device``) that rewrites an explicit CUDA
``device=`` argument to CPU while it is active; the runner enables it only for distributed CPU
runs, around training and evaluation epochs. Plugin tasks that all-reduce their own stats
should use :func:`lavis_free.common.dist.collective_device` instead of relying on it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


class cuda_requests_on_cpu(TorchFunctionMode):
    """Torch function mode: ``device="cuda"`` keyword arguments become ``device="cpu"``."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        return func(*args, **kwargs)
