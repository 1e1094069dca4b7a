"""Which transformers features this environment has: the one place that knows.

lavis-free supports two stacks (README "Install"): salesforce-lavis 1.0.2 with transformers 4.26.1
(the default, what `pip install` gives) and with transformers 4.33.2 (what LAVIS's GitHub main
pins). Code that behaves differently between them asks here instead of comparing versions itself:

- ``HAS_LLAMA``: transformers ships ``LlamaForCausalLM`` (4.28 on). The LLaMA adapter of the exits
  core and every Vicuna model type need it; 4.26 has none.
- ``GENERATE_EXPANDS_MODEL_INPUTS``: ``generate`` repeats every tensor model input (e.g. LAVIS's
  ``query_embeds``) ``num_beams`` / ``num_return_sequences`` times itself (4.27 on, transformers
  PR #21624). A caller that repeats them too, as LAVIS 1.0.2's ``Blip2OPT.generate`` does,
  gets tensors of twice the batch (LAVIS #154), so repeat them only when this is False.

``require_vicuna(model_type)`` (and the general ``require_llama(what)``) raise
``TransformersVersionError``, naming the transformers this needs and how to install it, when the
environment has no LLaMA.
"""
from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION: str = transformers.__version__
_VERSION = Version(TRANSFORMERS_VERSION)

LLAMA_MIN_VERSION = "4.28"  # LlamaForCausalLM entered transformers in 4.28.0
LLAMA_TESTED_VERSION = "4.33.2"  # the second stack's, what LAVIS's GitHub main pins
GENERATE_EXPANDS_MIN_VERSION = "4.27"  # transformers PR #21624

HAS_LLAMA: bool = _VERSION >= Version(LLAMA_MIN_VERSION)
GENERATE_EXPANDS_MODEL_INPUTS: bool = _VERSION >= Version(GENERATE_EXPANDS_MIN_VERSION)

SECOND_STACK_SETUP = "STACK=lavis-main bash run_scripts/setup_env.sh"


class TransformersVersionError(RuntimeError):
    """This transformers lacks a feature a model or adapter needs; the message names the version."""


def require_llama(what: str) -> None:
    """Raise TransformersVersionError unless this transformers has LLaMA; `what` names the thing
    that needs it (shown first in the message)."""
    if HAS_LLAMA:
        return
    raise TransformersVersionError(
        f"{what} needs transformers >= {LLAMA_MIN_VERSION} (LlamaForCausalLM; tested with "
        f"{LLAMA_TESTED_VERSION}, what LAVIS's GitHub main pins), but this environment has transformers "
        f"{TRANSFORMERS_VERSION} (salesforce-lavis 1.0.2's default). Install the second stack: "
        f"`{SECOND_STACK_SETUP}`, or `pip install -c constraints-lavis-main.txt transformers` "
        f"(see README, \"Install\")"
    )


def require_vicuna(model_type: str) -> None:
    """For Vicuna (LLaMA) model types, e.g. InstructBLIP's `vicuna7b`: a clear error on a
    transformers without LLaMA, naming the type and the version it needs."""
    require_llama(f"model type {model_type!r} (a Vicuna LLM, HF LlamaForCausalLM)")


__all__ = [
    "GENERATE_EXPANDS_MODEL_INPUTS",
    "HAS_LLAMA",
    "LLAMA_MIN_VERSION",
    "LLAMA_TESTED_VERSION",
    "TRANSFORMERS_VERSION",
    "TransformersVersionError",
    "require_llama",
    "require_vicuna",
]
