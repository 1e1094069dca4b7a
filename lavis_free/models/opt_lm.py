"""LAVIS's OPT language model with generation that really uses its KV cache.

Why: LAVIS 1.0.2's `modeling_opt.OPTForCausalLM.prepare_inputs_for_generation` reads the cache
from a keyword named `past`, but transformers 4.26 hands it over as `past_key_values`. The
cache is therefore dropped and every generated token re-runs the whole sequence (image queries
and prompt included): the outputs are right, the cost is quadratic. This subclass only renames
the keyword; weights, state-dict keys and forward are LAVIS's.
"""
from typing import Any, Dict, Optional

import torch
from lavis.models.blip2_models.modeling_opt import OPTForCausalLM


class CachedOPTForCausalLM(OPTForCausalLM):
    """`OPTForCausalLM` whose `generate` reuses past keys/values between steps."""

    def prepare_inputs_for_generation(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        query_embeds: Optional[torch.FloatTensor] = None,
        past: Optional[tuple] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        past_key_values: Optional[tuple] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        return super().prepare_inputs_for_generation(
            input_ids=input_ids,
            query_embeds=query_embeds,
            past=past if past is not None else past_key_values,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
