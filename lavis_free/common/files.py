"""Writing a file so that readers see the old file or the new one, never a part of it.

Why: a run killed mid-save (Ctrl-C, out of disk, a preempted job) must not leave a truncated
checkpoint, cache entry or report where the last good one was. Checkpoints, feature-cache
entries and evaluation results all save through :func:`write_atomically`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union


def write_atomically(path: Union[str, Path], write: Callable[[Path], None]) -> Path:
    """Calls ``write(partial)`` on a temporary file beside ``path``, then renames it over ``path``
    (``os.replace``, atomic on one file system). The temporary name carries the process id, so
    processes writing the same file do not share one, and gets the usual permissions (a
    ``tempfile`` file would be private to the user). On any failure it is removed."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        write(partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target
