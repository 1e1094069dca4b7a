"""The one place where lavis_free reads a torch file: ``load_torch_file``.

Why: ``torch.load`` unpickles, and a pickle can run any code while it loads. torch < 2.6 (which
``setup.py`` admits) defaults to the unsafe unpickler, and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
turns it back on for every call that leaves ``weights_only`` unset, as LAVIS's loads do. Every
checkpoint, exits file, feature-cache entry and runner checkpoint the plugin reads therefore comes
through here with ``weights_only=True`` (which the environment variable cannot override), and each
way a file can be unusable becomes one error that names the file and the setting it came from.

Library code that loads for the plugin with a bare ``torch.load`` (LAVIS's EVA/CLIP ViT loaders,
transformers 4.26's ``from_pretrained`` of ``pytorch_model.bin``) runs inside
:func:`forced_weights_only`, so those files get the same unpickler.

What is allowed: torch's weights-only unpickler (tensors, dtypes, ``torch.Size``, ``OrderedDict``,
dicts, lists, tuples, strings, numbers, booleans, None). No extra classes are allow-listed, because
nothing that LAVIS or this plugin writes needs one: LAVIS 1.0.2's ``RunnerBase._save_checkpoint``
(which wrote the released BLIP-2 checkpoints) stores ``{"model": state dict, "optimizer": AdamW
state dict, "config": OmegaConf.to_container(...) (plain dicts and lists), "scaler": dict or None,
"epoch": int}``; the plugin's runner adds numbers and plain dicts; exported weights and exits are
state dicts. A format that needs a class would add it with ``torch.serialization.safe_globals``
here, with its reason; a file that asks for anything else is refused, and the error does not offer
an unsafe re-run.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
from typing import Any, Dict, Iterator

import torch


class CheckpointLoadError(ValueError):
    """A torch file that cannot be read safely (missing, empty, truncated, foreign or unsafe)."""


def load_torch_file(path: str, origin: str) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on CPU; the file must hold a dict. Raises
    FileNotFoundError, or CheckpointLoadError for a file that cannot be used.

    ``origin`` is the YAML key or argument the path came from (``model.exits_checkpoint``,
    ``run.resume_ckpt_path``, ...); every error starts with ``"{path} ({origin})"``.
    """
    source = f"{path} ({origin})"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointLoadError(f"{source} is empty (0 bytes): an interrupted download or save?")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own text suggests weights_only=False or allow-listing the global: pass neither on.
        reason = str(error.__context__ or "").split("\n")[0]
        imported = re.search(r"GLOBAL ([\w.]+)", reason)
        if imported:
            raise CheckpointLoadError(
                f"{source} was refused: loading it would call {imported.group(1)}, and a checkpoint of "
                "tensors never calls code; this may be a crafted pickle. Use a file written by "
                "torch.save of a state dict (or {'model': state dict})"
            ) from None
        raise CheckpointLoadError(f"{source} is not a torch checkpoint ({reason or 'unreadable pickle'})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, UnicodeDecodeError) as error:
        reason = str(error).split("\n")[0].split(". ")[0]
        raise CheckpointLoadError(
            f"{source} is truncated or not a torch checkpoint ({type(error).__name__}: {reason})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(
            f"{source} holds a {type(checkpoint).__name__}, not a dict (expected a state dict or "
            "{'model': state dict, ...})"
        )
    return checkpoint


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside the block uses ``weights_only=True``, whatever its caller asks.

    For library loaders the plugin routes (see the module docstring) that cannot be given the
    argument. ``torch.load`` is replaced for the duration of the block, process-wide: a load in
    another thread meanwhile is weights-only too, which is only ever safer.
    """
    original = torch.load

    @functools.wraps(original)
    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original
