"""Where the evaluation commands write: checked before any work, written atomically as results come,
and read back (by the report and the plot command) with errors that name the file.

Why: a sweep or a calibration decodes for minutes to hours; finding out at the end that `--out`
is a file, read-only or under a file loses all of it, and a run stopped half-way would leave
nothing (or a half-written JSON) behind. Every command therefore calls `prepare_output_dir`
first, which fails at once naming the flag and the reason, and writes each result file with
`atomic_write`, so a reader (or a rerun after Ctrl-C) sees either the previous complete file or
the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Sequence, Union

from lavis_free.common.files import write_atomically


class OutputDirError(OSError):
    """The output directory cannot be created or written."""


def prepare_output_dir(path: Union[str, Path], flag: str = "--out") -> Path:
    """Creates `path` (and its parents) and writes and removes a probe file in it; returns it.
    Raises OutputDirError naming `flag`, the path and why it cannot be used."""
    if not str(path).strip():
        raise OutputDirError(f"{flag} is empty; give a directory")
    target = Path(path).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write_probe_"):
            pass
    except FileExistsError as error:
        raise OutputDirError(f"{flag} {path}: exists and is not a directory; give a directory") from error
    except NotADirectoryError as error:
        raise OutputDirError(f"{flag} {path}: a part of the path is a file, not a directory; give a directory") from error
    except OSError as error:
        raise OutputDirError(
            f"{flag} {path}: cannot write there ({error.strerror or error}); give a writable directory"
        ) from error
    return target


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Writes `data` (text as UTF-8) to `path` atomically (see `write_atomically`)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_atomically(path, lambda partial: partial.write_bytes(payload))


def read_result(path: Union[str, Path], flag: str, required: Sequence[str], writer: str,
                allow_partial: bool = False) -> Dict[str, Any]:
    """The JSON result at `path` (given as `flag`), written by the command `writer`. Refuses a
    missing file, one that is not JSON, one without the `required` top-level keys (another
    command's output) and, unless `allow_partial`, one of a run that did not finish
    (`"complete": false`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag} {path}: not a JSON file ({error}); give the JSON written by {writer}") from error
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{flag} {path}: has no {missing}; give the JSON written by {writer}")
    if not allow_partial and not data.get("complete", True):
        raise ValueError(f"{flag} {path}: that run did not finish (\"complete\": false); rerun {writer} to the end first")
    return data
