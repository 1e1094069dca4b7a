"""Per-LM adapters. `adapter_for(lm)` picks one by the LM's class."""
from __future__ import annotations

from torch import nn

from lavis_free.exits.adapters.base import DecoderAdapter
from lavis_free.exits.adapters.opt import OPTAdapter

_ADAPTERS = {"OPTForCausalLM": OPTAdapter}


def adapter_for(lm: nn.Module) -> DecoderAdapter:
    """The adapter for a causal LM; errors list the supported classes."""
    name = type(lm).__name__
    if name not in _ADAPTERS:
        raise NotImplementedError(
            f"no early-exit adapter for {name}; supported LMs: {', '.join(sorted(_ADAPTERS))}"
        )
    return _ADAPTERS[name](lm)


__all__ = ["DecoderAdapter", "OPTAdapter", "adapter_for"]
