"""A tiny `instructblip_free` (FlanT5) whose greedy outputs vary, and references that do not use
the engine: `varied_t5.py`'s T5 weights behind InstructBLIP's instruction-aware Q-Former.

The reference decoding is LAVIS main's `Blip2T5Instruct.generate` path written out here from
LAVIS's modules (the class is not in salesforce-lavis 1.0.2): the instruction through the BERT
tokenizer (left truncation) beside the queries in the Q-Former, [queries, instruction tokens]
into LAVIS's own (uncached) T5, greedy. The instruction changes the queries, so rows differ by
image and by prompt.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence

import torch
from lavis.models.blip2_models.modeling_t5 import T5ForConditionalGeneration
from omegaconf import OmegaConf
from varied_lm import set_qformer
from varied_t5 import (  # noqa: F401  (the same API)
    D_KV, ENCODER_LAYERS, EOS, EXIT_LAYERS, FFN, HEADS, HIDDEN, NUM_LAYERS, PAD, PROMPTS,
    TeacherForced, _set_exit, _set_lm, decode_text, forced_on as t5_forced_on, images, self_kv, slot_layers,
    trim_at_eos,
)

from lavis_free.models.instructblip_free import InstructBlipFree

SEED = 12  # a seed where the conformance suite's degeneracy checks hold (checked there)
HOSTS = ("plugin",)  # LAVIS main's Blip2T5Instruct is not in salesforce-lavis 1.0.2
GENERATE_KWARGS = {"repetition_penalty": 1.0}  # InstructBLIP's generate defaults to 1.5 (not greedy)


def build_model(layout: str = "free", exit_layers: Optional[Sequence[int]] = None, seed: Optional[int] = None):
    exit_layers = EXIT_LAYERS if exit_layers is None else exit_layers
    seed = SEED if seed is None else seed
    cfg = OmegaConf.merge(
        OmegaConf.load(InstructBlipFree.default_config_path("tiny_flant5")).model,
        {
            "t5_config": {"d_model": HIDDEN, "d_kv": D_KV, "d_ff": FFN, "num_layers": ENCODER_LAYERS,
                          "num_decoder_layers": NUM_LAYERS, "num_heads": HEADS,
                          "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16},
            "exits": {"layers": list(exit_layers), "init": "random", "layout": layout},
        },
    )
    torch.manual_seed(seed)
    model = InstructBlipFree.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _set_lm(model.t5_model, gen)
        set_qformer(model, model.t5_proj, gen, instruction=True)
        for module in model.early_exits.exits:
            _set_exit(module, model.t5_model, gen)
    return model


@torch.no_grad()
def instruct_encoder_inputs(model, image: torch.Tensor, prompts: Sequence[str]):
    """LAVIS main's InstructBLIP FlanT5 encoder input, from LAVIS's modules."""
    with model.maybe_autocast():
        image_embeds = model.ln_vision(model.visual_encoder(image))
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    text = model.tokenizer(list(prompts), padding="longest", truncation=True, max_length=model.max_txt_len, return_tensors="pt")
    query_tokens = model.query_tokens.expand(image.shape[0], -1, -1)
    mask = torch.cat([torch.ones(query_tokens.shape[:2], dtype=torch.long), text.attention_mask], 1)
    query = model.Qformer.bert(text.input_ids, attention_mask=mask, query_embeds=query_tokens,
                               encoder_hidden_states=image_embeds, encoder_attention_mask=atts, return_dict=True)
    inputs_t5 = model.t5_proj(query.last_hidden_state[:, : query_tokens.shape[1]])
    prompt_tokens = model.t5_tokenizer(list(prompts), padding="longest", return_tensors="pt")
    encoder_mask = torch.cat([torch.ones(inputs_t5.shape[:2], dtype=torch.long), prompt_tokens.attention_mask], 1)
    return torch.cat([inputs_t5, model.t5_model.encoder.embed_tokens(prompt_tokens.input_ids)], 1), encoder_mask


forced_on = partial(t5_forced_on, encoder_inputs=instruct_encoder_inputs)


@torch.no_grad()
def lavis_greedy(model, image: torch.Tensor, prompt, max_length: int) -> List[List[int]]:
    """LAVIS main's InstructBLIP FlanT5 greedy generate (repetition_penalty 1.0) with LAVIS's own
    T5 class; generated ids per row after the start token, trimmed after EOS."""
    prompts = [prompt] * image.shape[0] if isinstance(prompt, str) else list(prompt)
    embeds, mask = instruct_encoder_inputs(model, image, prompts)
    lm = model.t5_model
    plugin_class = type(lm)
    lm.__class__ = T5ForConditionalGeneration
    try:
        out = lm.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=1, do_sample=False,
                          max_new_tokens=max_length, min_length=1, repetition_penalty=1.0)
    finally:
        lm.__class__ = plugin_class
    return [trim_at_eos(row) for row in out[:, 1:].tolist()]
