"""A tiny `instructblip_free` Vicuna (transformers' LlamaForCausalLM) whose greedy outputs vary,
and references that do not use the engine: the decoder-only twin of `varied_instruct_t5.py`
(same API, asserted by the conformance suite). Needs transformers with LLaMA (the second stack);
importing it elsewhere raises ImportError, which the suite turns into a skip with the reason.

The LLaMA's weights are set as `varied_lm.py` sets OPT's: a random successor per token through
the untied head, "end" tokens whose successor is EOS, sharp query/key projections (so rotary
positions change tokens) and random exits. The reference is LAVIS main's `Blip2VicunaInstruct`
greedy path written out from LAVIS's and transformers' modules: the instruction-aware Q-Former,
[queries | left-padded prompt] into HF's `generate` from `inputs_embeds` (its placeholder start id
dropped), with the added [PAD] banned as the engine bans it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from lavis_free.compat.transformers_version import HAS_LLAMA

if not HAS_LLAMA:
    raise ImportError("varied_vicuna needs transformers >= 4.28 (LLaMA): the second stack")

from varied_lm import TeacherForced, _normal_, images, set_qformer  # noqa: E402,F401  (the same API)

from lavis_free.hosts import exits_of  # noqa: E402
from lavis_free.models.instructblip_free import InstructBlipFree  # noqa: E402

SEED = 9  # a seed where the conformance suite's degeneracy checks hold (checked there)
NUM_LAYERS, HIDDEN, FFN, HEADS, KV_HEADS = 6, 64, 128, 4, 2
EXIT_LAYERS = (1, 3)
EOS = 2  # </s> (bos = eos = unk = </s> after LAVIS's set-up)
END_SHARE = 0.15
QK_SCALE = 2.0
EXIT_SCALE = 1.0
VANILLA_NOISE = 0.5
PROMPTS = ["", "a", "a photo of", "two red circles on the"]
HOSTS = ("plugin",)  # LAVIS main's Blip2VicunaInstruct is not in salesforce-lavis 1.0.2
GENERATE_KWARGS = {"repetition_penalty": 1.0}  # InstructBLIP's generate defaults to 1.5 (not greedy)
PAD = None  # the added [PAD]'s id, set by build_model (the tokenizer decides it)


def trim_at_eos(row: Sequence[int]) -> List[int]:
    row = list(row)
    return row[: row.index(EOS) + 1] if EOS in row else row


def build_model(layout: str = "free", exit_layers: Optional[Sequence[int]] = None, seed: Optional[int] = None):
    global PAD
    exit_layers = EXIT_LAYERS if exit_layers is None else exit_layers
    seed = SEED if seed is None else seed
    cfg = OmegaConf.merge(
        OmegaConf.load(InstructBlipFree.default_config_path("tiny_vicuna")).model,
        {"llm_config": {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": NUM_LAYERS,
                        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS},
         "exits": {"layers": list(exit_layers), "init": "random", "layout": layout}},
    )
    torch.manual_seed(seed)
    model = InstructBlipFree.from_config(cfg).eval()
    PAD = model.llm_tokenizer.pad_token_id
    assert model.llm_tokenizer.eos_token_id == EOS
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _set_lm(model.llm_model, gen)
        set_qformer(model, model.llm_proj, gen, instruction=True)
        for module in model.early_exits.exits:
            _set_exit(module, model.llm_model, gen)
    return model


def _set_layer(layer, gen: torch.Generator, out_scale: float = 1.0) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    for linear in (attn.q_proj, attn.k_proj):
        _normal_(linear.weight, QK_SCALE / math.sqrt(linear.in_features), gen)
    _normal_(attn.v_proj.weight, 1.0 / math.sqrt(attn.v_proj.in_features), gen)
    _normal_(attn.o_proj.weight, out_scale / math.sqrt(attn.o_proj.in_features), gen)
    for linear in (mlp.gate_proj, mlp.up_proj):
        _normal_(linear.weight, 1.0 / math.sqrt(linear.in_features), gen)
    _normal_(mlp.down_proj.weight, out_scale / math.sqrt(mlp.down_proj.in_features), gen)


def _set_lm(lm, gen: torch.Generator) -> None:
    vocab, dim = lm.config.vocab_size, lm.config.hidden_size
    end_direction = torch.randn(dim, generator=gen)
    end_direction /= end_direction.norm()
    embeddings = torch.randn(vocab, dim, generator=gen)
    ends = torch.rand(vocab, generator=gen) < END_SHARE
    ends[[0, 1, EOS, PAD]] = False
    embeddings[ends] += 3.0 * math.sqrt(dim) * end_direction
    lm.model.embed_tokens.weight.copy_(embeddings)
    head = torch.randn(vocab, dim, generator=gen)
    head[EOS] = 6.0 * end_direction
    head[[0, 1]] = 0.0
    lm.lm_head.weight.copy_(head)
    for layer in lm.model.layers:
        _set_layer(layer, gen)


def _set_exit(module, lm, gen: torch.Generator) -> None:
    if hasattr(module, "layer"):
        _set_layer(module.layer, gen, EXIT_SCALE)
    else:
        head = lm.lm_head.weight
        module.head[-1].weight.copy_(head + torch.randn(head.shape, generator=gen) * VANILLA_NOISE * head.std())


@torch.no_grad()
def _queries(model, image: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """LAVIS main's instruction-aware Q-Former, from LAVIS's modules."""
    image_embeds = model.ln_vision(model.visual_encoder(image))
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    text = model.tokenizer(list(prompts), padding="longest", truncation=True, max_length=model.max_txt_len, return_tensors="pt")
    query_tokens = model.query_tokens.expand(image.shape[0], -1, -1)
    mask = torch.cat([torch.ones(query_tokens.shape[:2], dtype=torch.long), text.attention_mask], 1)
    out = model.Qformer.bert(text.input_ids, attention_mask=mask, query_embeds=query_tokens,
                             encoder_hidden_states=image_embeds, encoder_attention_mask=atts, return_dict=True)
    return model.llm_proj(out.last_hidden_state[:, : query_tokens.shape[1]])


@torch.no_grad()
def _prefix(model, image: torch.Tensor, prompts: Sequence[str]):
    queries = _queries(model, image, prompts)
    model.llm_tokenizer.padding_side = "left"
    tokens = model.llm_tokenizer(list(prompts), padding="longest", return_tensors="pt")
    embeds = torch.cat([queries, model.llm_model.get_input_embeddings()(tokens.input_ids)], 1)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), tokens.attention_mask], 1)
    return embeds, mask


@torch.no_grad()
def lavis_greedy(model, image: torch.Tensor, prompt, max_length: int) -> List[List[int]]:
    """LAVIS main's `generate(max_length=...)`: HF counts its placeholder start id, so at most
    max_length - 1 new tokens; ids after the placeholder, trimmed after EOS."""
    prompts = [prompt] * image.shape[0] if isinstance(prompt, str) else list(prompt)
    embeds, mask = _prefix(model, image, prompts)
    out = model.llm_model.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=1, do_sample=False,
                                   max_length=max_length, min_length=1, repetition_penalty=1.0,
                                   bad_words_ids=[[PAD]], eos_token_id=EOS, pad_token_id=PAD)
    return [trim_at_eos(row) for row in out[:, 1:].tolist()]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """HF LLaMA's generation positions: cumsum(mask) - 1, padding at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def forced_on(model, image: torch.Tensor, prompts: Sequence[str], tokens: torch.Tensor):
    """HF LLaMA's forward over [queries | left-padded prompt | generated tokens but the last] at
    generation's positions, and each exit's own LlamaDecoderLayer on its layer's output; [PAD]
    banned in every logit. Returns (TeacherForced, prefix)."""
    lm = model.llm_model
    embeds, mask = _prefix(model, image, prompts)
    prefix = mask.shape[1]
    embeds = torch.cat([embeds, lm.get_input_embeddings()(tokens[:, :-1])], 1)
    mask = torch.cat([mask, torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=mask.dtype)], 1)
    positions = _positions(mask)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True,
             use_cache=True, return_dict=True)
    hidden = out.hidden_states
    keys = [kv[0] for kv in out.past_key_values]
    values = [kv[1] for kv in out.past_key_values]
    causal = lm.model._prepare_decoder_attention_mask(mask, mask.shape, embeds, 0)

    def banned(logits):
        logits = logits.clone()
        logits[..., PAD] = -float("inf")
        return logits

    exit_logits = []
    for module, layer in zip(model.early_exits.exits, exits_of(model).config.layers):
        exit_input = hidden[layer + 1]
        if hasattr(module, "layer"):
            exit_out, present = module.layer(exit_input, attention_mask=causal, position_ids=positions, use_cache=True)
            keys.append(present[0])
            values.append(present[1])
            exit_logits.append(banned(lm.lm_head(lm.model.norm(exit_out))))
        else:
            exit_logits.append(banned(module.head(module.norm(exit_input))))
    return TeacherForced(hidden, banned(out.logits), exit_logits, keys, values), prefix


def decode_text(model, ids: Sequence[int]) -> str:
    """LAVIS main's post-processing: id 0 read as </s>, special tokens skipped, stripped."""
    return model.llm_tokenizer.decode([EOS if i == 0 else i for i in ids], skip_special_tokens=True).strip()


def slot_layers(model) -> list:
    return list(model.llm_model.model.layers) + [m.layer for m in model.early_exits.exits]


def self_kv(layer, hidden: torch.Tensor, position: int):
    """The keys/values [H_kv, Dh] `layer` computes from its input `hidden` [D] at `position`:
    keys rotated there with transformers' own rotary functions, as the cache stores them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn, x = layer.self_attn, layer.input_layernorm(hidden)[None, None]
    keys = attn.k_proj(x).view(1, 1, KV_HEADS, HIDDEN // HEADS).transpose(1, 2)
    values = attn.v_proj(x).view(KV_HEADS, HIDDEN // HEADS)
    cos, sin = attn.rotary_emb(values, seq_len=int(position) + 1)
    _, keys = apply_rotary_pos_emb(keys, keys, cos, sin, torch.tensor([[int(position)]]))
    return keys.view(KV_HEADS, HIDDEN // HEADS), values
