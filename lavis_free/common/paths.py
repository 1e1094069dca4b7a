"""Where lavis-free (and LAVIS, through its registry) reads and writes files.

LAVIS registers its paths once, at import, relative to its own package directory
(``cache_root`` = ``/export/home/.cache/lavis``, output dirs under site-packages). Its registry
refuses to register a path twice, so :func:`set_registry_path` replaces an existing entry
explicitly; that is how the cache root and the per-run output dirs are pointed elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

from lavis.common.registry import registry

CACHE_ENV = "LAVIS_FREE_CACHE"


def cache_root() -> Path:
    """``$LAVIS_FREE_CACHE`` if set, else ``~/.cache/lavis_free`` (absolute, not created)."""
    configured = os.environ.get(CACHE_ENV)
    root = Path(configured) if configured else Path("~/.cache/lavis_free")
    return root.expanduser().resolve()


def set_registry_path(name: str, path: Path | str) -> None:
    """Register ``name`` -> ``path`` in LAVIS's registry, replacing an earlier registration."""
    registry.mapping["paths"][name] = str(path)


def output_dir_for(run_output_dir: str, job_id: str) -> Path:
    """``run.output_dir`` (relative to the current directory unless absolute) / job_id."""
    return (Path(run_output_dir).expanduser() / job_id).resolve()
