"""A tiny `blip2_t5_free` whose greedy outputs vary, and references that do not use the engine:
the encoder-decoder twin of `varied_lm.py` (same API, same properties, asserted by the
conformance suite, tests/test_conformance.py).

The T5's weights are set (seeded, no training): each decoder input token has a random successor
through the untied head, about one token in six is an "end" token whose successor is EOS, the
decoder's self- and cross-attention and feed-forward write into the residual stream at the
embedding's scale (so the prefix, the relative positions and the encoder output all matter),
block 0's relative position bias table is random (a bias bug changes tokens), and the exits are
random T5 blocks at the same scale (vanilla: the head plus noise). Prompts go to the encoder, so
rows differ in encoder padding; the decoder starts from T5's start token.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from lavis.models.blip2_models.modeling_t5 import T5ForConditionalGeneration
from omegaconf import OmegaConf
from varied_lm import TeacherForced, _normal_, images, set_qformer  # noqa: F401  (same API)

from lavis_free.hosts import exits_of
from lavis_free.models.blip2_t5_free import Blip2T5Free

SEED = 3
NUM_LAYERS, HIDDEN, FFN, HEADS, D_KV, ENCODER_LAYERS = 6, 64, 128, 4, 16, 2
EXIT_LAYERS = (1, 3)
EOS, PAD = 1, 0  # T5: </s> ends, <pad> pads and starts the decoder
SPECIAL = (0, 1, 2)  # <pad>, </s>, <unk>: never generated except EOS
END_SHARE = 0.15
VANILLA_NOISE = 0.5
EXIT_SCALE = 1.0
BIAS_SCALE = 1.0  # std of block 0's relative position bias table
PROMPTS = ["", "a", "a photo of", "two red circles on the"]
HOSTS = ("plugin", "lavis")  # Blip2T5 is in salesforce-lavis 1.0.2
GENERATE_KWARGS = {}  # the host's generate defaults are greedy-compatible once num_beams=1


def build_model(layout: str = "free", exit_layers: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> Blip2T5Free:
    exit_layers = EXIT_LAYERS if exit_layers is None else exit_layers
    seed = SEED if seed is None else seed
    cfg = OmegaConf.merge(
        OmegaConf.load(Blip2T5Free.default_config_path("tiny")).model,
        {
            "t5_config": {"d_model": HIDDEN, "d_kv": D_KV, "d_ff": FFN, "num_layers": ENCODER_LAYERS,
                          "num_decoder_layers": NUM_LAYERS, "num_heads": HEADS,
                          "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16},
            "exits": {"layers": list(exit_layers), "init": "random", "layout": layout},
        },
    )
    torch.manual_seed(seed)
    model = Blip2T5Free.from_config(cfg).eval()
    assert model.t5_model.config.eos_token_id == EOS and model.t5_model.config.pad_token_id == PAD
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _set_lm(model.t5_model, gen)
        set_qformer(model, model.t5_proj, gen)
        for module in model.early_exits.exits:
            _set_exit(module, model.t5_model, gen)
    return model


def trim_at_eos(row: Sequence[int]) -> List[int]:
    row = list(row)
    return row[: row.index(EOS) + 1] if EOS in row else row


def _set_block(block: torch.nn.Module, gen: torch.Generator, out_scale: float = 1.0) -> None:
    for sub in block.layer[:-1]:
        attn = getattr(sub, "SelfAttention", None) or sub.EncDecAttention
        for linear in (attn.q, attn.k, attn.v):
            _normal_(linear.weight, 1.0 / math.sqrt(linear.in_features), gen)
        _normal_(attn.o.weight, out_scale / math.sqrt(attn.o.in_features), gen)
    ff = block.layer[-1].DenseReluDense
    for name in ("wi", "wi_0", "wi_1"):
        if hasattr(ff, name):
            _normal_(getattr(ff, name).weight, 1.0 / math.sqrt(getattr(ff, name).in_features), gen)
    _normal_(ff.wo.weight, out_scale / math.sqrt(ff.wo.in_features), gen)


def _set_lm(lm: T5ForConditionalGeneration, gen: torch.Generator) -> None:
    vocab, dim = lm.config.vocab_size, lm.config.d_model
    end_direction = torch.randn(dim, generator=gen)
    end_direction /= end_direction.norm()
    embeddings = torch.randn(vocab, dim, generator=gen)
    ends = torch.rand(vocab, generator=gen) < END_SHARE
    ends[list(SPECIAL)] = False
    embeddings[ends] += 3.0 * math.sqrt(dim) * end_direction
    lm.shared.weight.copy_(embeddings)
    head = torch.randn(vocab, dim, generator=gen)
    head[EOS] = 6.0 * end_direction
    head[[PAD, 2]] = 0.0
    lm.lm_head.weight.copy_(head)
    for block in list(lm.encoder.block) + list(lm.decoder.block):
        _set_block(block, gen)
    _normal_(lm.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, BIAS_SCALE, gen)
    _normal_(lm.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, BIAS_SCALE, gen)


def _set_exit(module: torch.nn.Module, lm: T5ForConditionalGeneration, gen: torch.Generator) -> None:
    if hasattr(module, "layer"):
        _set_block(module.layer, gen, EXIT_SCALE)
    else:
        head = lm.lm_head.weight
        module.head[-1].weight.copy_(head + torch.randn(head.shape, generator=gen) * VANILLA_NOISE * head.std())


@torch.no_grad()
def lavis_greedy(model: Blip2T5Free, image: torch.Tensor, prompt, max_length: int) -> List[List[int]]:
    """LAVIS 1.0.2's own `Blip2T5.generate(num_beams=1)` with LAVIS's own T5 class (no plugin
    code); generated ids per row after the start token, trimmed after EOS. `prompt`: one string
    or one per row (Blip2T5 accepts both)."""
    lm = model.t5_model
    recorded = {}
    plugin_class = type(lm)

    def generate(*args, **kwargs):
        recorded["out"] = T5ForConditionalGeneration.generate(lm, *args, **kwargs)
        return recorded["out"]

    lm.__class__ = T5ForConditionalGeneration
    lm.generate = generate
    try:
        Blip2T5.generate(model, {"image": image, "prompt": prompt}, num_beams=1, max_length=max_length)
    finally:
        del lm.generate
        lm.__class__ = plugin_class
    return [trim_at_eos(row) for row in recorded["out"][:, 1:].tolist()]


@torch.no_grad()
def blip2_encoder_inputs(model, image: torch.Tensor, prompts: Sequence[str]):
    """Blip2T5's encoder input, built here from LAVIS's modules: [queries, prompt tokens], mask."""
    with model.maybe_autocast():
        image_embeds = model.ln_vision(model.visual_encoder(image))
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    query = model.Qformer.bert(query_embeds=model.query_tokens.expand(image.shape[0], -1, -1),
                               encoder_hidden_states=image_embeds, encoder_attention_mask=atts, return_dict=True)
    inputs_t5 = model.t5_proj(query.last_hidden_state)
    prompt_tokens = model.t5_tokenizer(list(prompts), padding="longest", return_tensors="pt")
    encoder_mask = torch.cat([torch.ones(inputs_t5.shape[:2], dtype=torch.long), prompt_tokens.attention_mask], 1)
    return torch.cat([inputs_t5, model.t5_model.encoder.embed_tokens(prompt_tokens.input_ids)], 1), encoder_mask


@torch.no_grad()
def forced_on(model, image: torch.Tensor, prompts: Sequence[str], tokens: torch.Tensor, encoder_inputs=blip2_encoder_inputs):
    """LAVIS's T5 forward over [start, generated tokens but the last] with the encoder input
    built as Blip2T5 builds it, and each exit's own T5Block forward on its layer's output, fed
    block 0's position bias as T5's stack passes it. Returns (TeacherForced, prefix=1): the
    token generated at step t is predicted at decoder column t."""
    lm = model.t5_model
    encoder_embeds, encoder_mask = encoder_inputs(model, image, prompts)
    decoder_ids = torch.cat([torch.full((tokens.shape[0], 1), PAD), tokens[:, :-1]], 1)
    out = lm(inputs_embeds=encoder_embeds, attention_mask=encoder_mask, decoder_input_ids=decoder_ids,
             output_hidden_states=True, use_cache=True, return_dict=True)
    hidden = out.decoder_hidden_states
    keys = [kv[0] for kv in out.past_key_values]
    values = [kv[1] for kv in out.past_key_values]
    decoder = lm.decoder
    self_mask = decoder.get_extended_attention_mask(torch.ones(decoder_ids.shape, dtype=torch.long), decoder_ids.shape)
    cross_mask = decoder.invert_attention_mask(encoder_mask)
    block0 = decoder.block[0](hidden[0], attention_mask=self_mask, encoder_hidden_states=out.encoder_last_hidden_state,
                              encoder_attention_mask=cross_mask, use_cache=False)
    position_bias, cross_bias = block0[1], block0[2]
    exit_logits = []
    for module, layer in zip(model.early_exits.exits, exits_of(model).config.layers):
        exit_input = hidden[layer + 1]
        if hasattr(module, "layer"):
            exit_out = module.layer(exit_input, attention_mask=self_mask, position_bias=position_bias,
                                    encoder_hidden_states=out.encoder_last_hidden_state, encoder_attention_mask=cross_mask,
                                    encoder_decoder_position_bias=cross_bias, use_cache=True)
            keys.append(exit_out[1][0])
            values.append(exit_out[1][1])
            exit_logits.append(lm.lm_head(decoder.final_layer_norm(exit_out[0])))
        else:
            exit_logits.append(module.head(module.norm(exit_input)))
    return TeacherForced(hidden, out.logits, exit_logits, keys, values), 1


def decode_text(model: Blip2T5Free, ids: Sequence[int]) -> str:
    return model.t5_tokenizer.decode(ids, skip_special_tokens=True)


def slot_layers(model: Blip2T5Free) -> list:
    return list(model.t5_model.decoder.block) + [m.layer for m in model.early_exits.exits]


def self_kv(layer: torch.nn.Module, hidden: torch.Tensor, position: int):
    """The self-attention keys/values [H, Dh] `layer` computes from its input `hidden` [D] (no
    position enters them in this family)."""
    attn, x = layer.layer[0].SelfAttention, layer.layer[0].layer_norm(hidden)
    return attn.k(x).view(HEADS, D_KV), attn.v(x).view(HEADS, D_KV)
