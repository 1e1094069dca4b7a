"""Per-LM adapters. `adapter_for(lm)` picks one by the LM's class."""
from __future__ import annotations

from torch import nn

from lavis_free.compat.transformers_version import HAS_LLAMA, require_llama
from lavis_free.exits.adapters.base import DecoderAdapter
from lavis_free.exits.adapters.opt import OPTAdapter
from lavis_free.exits.adapters.t5 import T5Adapter

_ADAPTERS = {"OPTForCausalLM": OPTAdapter, "T5ForConditionalGeneration": T5Adapter}
__all__ = ["DecoderAdapter", "OPTAdapter", "T5Adapter", "adapter_for"]

if HAS_LLAMA:  # transformers >= 4.28 ships LlamaForCausalLM (compat/transformers_version.py)
    from lavis_free.exits.adapters.llama import LlamaAdapter

    _ADAPTERS["LlamaForCausalLM"] = LlamaAdapter
    __all__.append("LlamaAdapter")


def adapter_for(lm: nn.Module) -> DecoderAdapter:
    """The adapter for an LM (matched by class name along its MRO, so LAVIS's and HF's
    copies and their subclasses all match); errors list the supported classes."""
    for cls in type(lm).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__](lm)
    if any(cls.__name__ == "LlamaForCausalLM" for cls in type(lm).__mro__):
        require_llama("the LLaMA early-exit adapter")  # raises, naming the transformers it needs
    raise NotImplementedError(
        f"no early-exit adapter for {type(lm).__name__}; supported LMs: {', '.join(sorted(_ADAPTERS))}"
    )
