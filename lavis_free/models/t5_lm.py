"""LAVIS's T5 language model with generation that really uses its KV cache.

Why: LAVIS 1.0.2's `modeling_t5.T5ForConditionalGeneration.prepare_inputs_for_generation` reads
the cache from a keyword named `past`, but transformers 4.26 hands it over as `past_key_values`
(the same bug as LAVIS's OPT, see opt_lm.py). The cache is therefore dropped: at step t the
decoder re-runs all t tokens generated so far, and every decoder layer recomputes its
cross-attention keys/values over the encoder output (the encoder itself runs once). Outputs are
right, the decoder's cost is quadratic in the caption length. Measured on the tiny T5 of
tests/test_t5_adapter.py: decoder input lengths per step 1, 2, 3, ... with LAVIS's class, 1, 1,
1, ... with this one. This subclass only renames the keyword; weights, state-dict keys and
forward are LAVIS's.
"""
from typing import Any, Dict, Optional

import torch
from lavis.models.blip2_models.modeling_t5 import T5ForConditionalGeneration


class CachedT5ForConditionalGeneration(T5ForConditionalGeneration):
    """`T5ForConditionalGeneration` whose `generate` reuses past keys/values between steps."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past: Optional[tuple] = None,
        attention_mask: Optional[torch.Tensor] = None,
        head_mask: Optional[torch.Tensor] = None,
        decoder_head_mask: Optional[torch.Tensor] = None,
        cross_attn_head_mask: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        encoder_outputs: Optional[Any] = None,
        past_key_values: Optional[tuple] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        return super().prepare_inputs_for_generation(
            input_ids,
            past=past if past is not None else past_key_values,
            attention_mask=attention_mask,
            head_mask=head_mask,
            decoder_head_mask=decoder_head_mask,
            cross_attn_head_mask=cross_attn_head_mask,
            use_cache=use_cache,
            encoder_outputs=encoder_outputs,
            **kwargs,
        )
