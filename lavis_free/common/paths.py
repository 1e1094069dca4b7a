"""Where lavis-free (and LAVIS, through its registry) reads and writes files.

LAVIS registers its paths once, at import, relative to its own package directory
(``cache_root`` = ``/export/home/.cache/lavis``, output dirs under site-packages). Its registry
refuses to register a path twice, so :func:`set_registry_path` replaces an existing entry
explicitly; that is how the cache root and the per-run output dirs are pointed elsewhere.

Each run writes into a job dir of its own, ``run.output_dir/<job id>``, which
:func:`claim_job_dir` creates with a plain ``mkdir`` (no ``exist_ok``): two runs started in the
same second, or a reused ``--job-id``, can never share a dir and overwrite each other's
checkpoints and log.
"""
from __future__ import annotations

import datetime
import itertools
import os
from pathlib import Path
from typing import Optional

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


def claim_job_dir(run_output_dir: str, job_id: Optional[str] = None) -> Path:
    """Create ``run.output_dir/job_id`` for this run only and return it (see :func:`output_dir_for`).

    ``job_id`` None or empty: the current time (``%Y%m%d%H%M%S``), then ``_1``, ``_2``... while that
    name is taken. An explicit ``job_id`` whose dir exists is an error: it is another run's. To
    continue a run, start a new one with ``run.resume_ckpt_path`` set to its checkpoint.
    """
    if job_id:
        if Path(job_id).name != job_id or job_id in (".", ".."):
            raise ValueError(f"--job-id {job_id!r}: must be a plain directory name (no '/', '.' or '..')")
        path = output_dir_for(run_output_dir, job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise FileExistsError(
                f"--job-id {job_id!r}: {path} already exists (another run's output); choose a new job id or "
                "leave --job-id out for a fresh timestamp. To continue that run, start a new one with "
                f"--options run.resume_ckpt_path={path}/<checkpoint>.pth"
            ) from None
        return path
    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    output_dir_for(run_output_dir, stamp).parent.mkdir(parents=True, exist_ok=True)
    for suffix in itertools.count():
        path = output_dir_for(run_output_dir, f"{stamp}_{suffix}" if suffix else stamp)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
