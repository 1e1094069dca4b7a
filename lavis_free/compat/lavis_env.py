"""Point LAVIS's process-wide settings at places that work on any machine.

LAVIS's default cache root is ``/export/home/.cache/lavis`` (Salesforce's internal storage,
unwritable elsewhere); annotations and COCO ground truth are cached there. ``import lavis`` also
leaves the LR schedulers (``lavis.common.optims``) and runners unregistered, so a config naming
``linear_warmup_cosine_lr`` or ``runner_base`` would fail; importing them here registers them.
"""
from __future__ import annotations

import lavis  # noqa: F401  (registers lavis's paths, models, builders, tasks)
import lavis.common.optims  # noqa: F401  (registers the LR schedulers)
import lavis.runners  # noqa: F401  (registers runner_base, runner_iter)

from lavis_free.common.paths import cache_root, set_registry_path


def configure() -> None:
    """Set LAVIS's ``cache_root`` registry path to :func:`lavis_free.common.paths.cache_root`."""
    set_registry_path("cache_root", cache_root())
