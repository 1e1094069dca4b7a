"""Host bindings of InstructBLIP (LAVIS main's `Blip2T5Instruct` / `Blip2VicunaInstruct`, and the
plugin's re-implementations on 1.0.2, `instructblip_free`).

What InstructBLIP changes against BLIP-2: the instruction enters the Q-Former too (BERT tokens
beside the queries in one self-attention, truncated on the left; only the queries cross-attend
to the image and go on to the LM), targets have their own tokenizer and length
(`max_output_txt_len`), and `generate` defaults to beam search with a repetition penalty.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import torch
from torch import nn

from lavis_free.hosts.binding import HostBinding, register_host
from lavis_free.hosts.blip2_t5 import Blip2T5Binding
from lavis_free.hosts.inputs import vision_input

# LAVIS main's InstructBLIP generate / predict_answers defaults
INSTRUCT_GENERATE_DEFAULTS = {**HostBinding.generate_defaults, "max_length": 256, "repetition_penalty": 1.5}


def instruction_queries(model: nn.Module, image: torch.Tensor, instructions: Sequence[str], projection: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """InstructBLIP's instruction-aware Q-Former: queries and instruction tokens in one
    self-attention (queries first, the instruction after them with its own positions), only the
    queries cross-attend to the image; the queries' outputs, projected into the LM's space."""
    image = image.to(vision_input(model)[3].dtype)
    with model.maybe_autocast():
        image_embeds = model.ln_vision(model.visual_encoder(image))
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
    text = model.tokenizer(list(instructions), padding="longest", truncation=True, max_length=model.max_txt_len,
                           return_tensors="pt").to(image.device)
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image.device)
    output = model.Qformer.bert(
        text.input_ids,
        attention_mask=torch.cat([query_atts, text.attention_mask], dim=1),
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    queries = projection(output.last_hidden_state[:, : query_tokens.shape[1]])
    return queries, torch.ones(queries.shape[:-1], dtype=torch.long, device=image.device)


@register_host
class InstructBlipT5Binding(Blip2T5Binding):
    """InstructBLIP FlanT5: BLIP-2 T5's encoder-decoder layout with the instruction in the Q-Former."""

    host_class = "Blip2T5Instruct"
    generate_defaults = INSTRUCT_GENERATE_DEFAULTS

    def queries(self, model: nn.Module, image: torch.Tensor, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        return instruction_queries(model, image, texts, model.t5_proj)

    def target_tokens(self, model: nn.Module, targets: Sequence[str], device: torch.device):
        return model.t5_output_tokenizer(list(targets), padding="longest", truncation=True,
                                         max_length=model.max_output_txt_len, return_tensors="pt").to(device)

    def settings(self, model: nn.Module) -> dict:
        return {**super().settings(model), "max_output_txt_len": model.max_output_txt_len}
