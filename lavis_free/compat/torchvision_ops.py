"""Make torchvision importable on a CPU-only torch when its compiled ops cannot load.

The only torchvision release that matches torch 2.13.0 (0.28.0) is a CUDA build. On a CPU torch
its ``_C`` extension fails to load (it needs libtorch_cuda), and ``import torchvision`` then
crashes in ``torchvision/_meta_registrations.py``, which registers fake kernels for the op
schemas ``torchvision::nms`` and ``torchvision::qnms`` that only ``_C`` would have defined.
timm and LAVIS import torchvision, so ``import lavis`` fails too.

The fix defines those two schemas ourselves (and gives ``nms`` a pure-torch CPU kernel, so
``torch.ops.torchvision.nms`` works), but only after trying to load ``_C`` and seeing it fail.
A torch with a working torchvision (for example a CUDA install) is left untouched. It must run
before torchvision is first imported; :func:`install_if_needed` is a no-op afterwards.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# The Library must stay alive: torch removes its definitions when it is garbage-collected.
_fallback_library: Optional[torch.library.Library] = None


def _compiled_ops_path() -> Optional[Path]:
    """Path of torchvision's ``_C`` extension, found without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"_C{suffix}"
        if candidate.is_file():
            return candidate
    return None


def compiled_ops_load() -> bool:
    """Try to load torchvision's compiled ops; True when they load (or torchvision is absent)."""
    path = _compiled_ops_path()
    if path is None:
        return importlib.util.find_spec("torchvision") is None
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        logger.debug("torchvision compiled ops do not load: %s", err)
        return False
    return True


def nms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression in plain torch; same contract as ``torchvision.ops.nms``.

    Returns the indices of the kept boxes (``(x1, y1, x2, y2)``), by decreasing score.
    """
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = scores.argsort(descending=True)
    boxes = dets[order].to(torch.float64)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    overlaps = (inter / (areas[:, None] + areas[None, :] - inter)) > iou_threshold
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def install_if_needed(ops_load: Callable[[], bool] = compiled_ops_load) -> bool:
    """Define the torchvision op schemas when the compiled ops do not load.

    Returns True when the fallback is installed by this call. Does nothing when torchvision is
    already imported, when the fallback is already in place, or when ``ops_load()`` succeeds.
    """
    global _fallback_library
    if _fallback_library is not None or "torchvision" in sys.modules:
        return False
    if ops_load():
        return False
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        library.define(schema)
    library.impl("nms", nms_reference, "CPU")
    _fallback_library = library
    logger.info(
        "torchvision compiled ops did not load (CPU torch with a CUDA torchvision build); "
        "defined torchvision::nms/qnms schemas with a pure-torch CPU nms"
    )
    return True


def fallback_installed() -> bool:
    """True when this process runs with the pure-torch fallback instead of torchvision's ops."""
    return _fallback_library is not None
