"""A tiny `blip2_opt_free` whose greedy outputs vary, and references that do not use the engine.

Why: a random LM decodes one token over and over and never emits EOS, and random exits agree
with its frozen head most of the time, so oracles run on it hold whatever the engine does. Here
the LM's weights are *set* (seeded, no training, built in a few milliseconds) so that:

- each token has its own random successor (untied head): rows from different prompts or images
  produce different sequences; about one token in six is an "end" token whose successor is EOS,
  so rows stop at different lengths, some well before `max_length`;
- the decoder layers' attention and MLPs write into the residual stream at a scale comparable
  to the token's embedding, so outputs depend on the whole prefix (padding bugs show);
- the image matters (the Q-Former's cross-attention is sharpened: a random one averages the
  image away), and so do positions (a position bug changes tokens, not only the cache);
- the exits are random, at the backbone layers' scale (vanilla: the head plus noise), so an
  exit's argmax differs from the final layer's on most tokens (40-95% here: a token taken from
  the wrong logits shows), and their max_prob confidences spread over (0, 1) (a threshold
  inside it sends tokens to every exit and to full depth).

`tests/test_engine_oracles.py` asserts these properties, so the model cannot silently go
degenerate. API (import as `from varied_lm import ...`; pytest puts `tests/` on the path):

    build_model(layout="free", exit_layers=None, seed=None) -> Blip2OPTFree in eval mode
    images(batch, seed=1)                 -> [batch, 3, 64, 64] float images
    PROMPTS                               -> 4 prompts of 1, 2, 4, 6 tokens (left padding 5, 4, 2, 0)
    lm_inputs(model, images, prompts)     -> (inputs_embeds, attention_mask, prompt_ids, query_embeds)
    lavis_greedy(model, image, prompt, n) -> LAVIS's own Blip2OPT.generate(num_beams=1), as token ids
    teacher_forced(model, query_embeds, ids, mask) -> TeacherForced (LAVIS forward + modules' own forward)
    trim_at_eos(row)                      -> the row's tokens up to and including EOS
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.modeling_opt import OPTForCausalLM
from omegaconf import OmegaConf

from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.hosts import binding_for, exits_of
from lavis_free.hosts.blip2 import image_queries, tokenize

SEED = 12  # a seed where the properties the conformance suite asserts hold (the same weights on both stacks)
NUM_LAYERS, HIDDEN, FFN, HEADS = 6, 64, 128, 4
EXIT_LAYERS = (1, 3)  # exits after layers 1 and 3: tokens leaving there run 2 and 4 layers
EOS = 202  # the tiny tokenizer's "\n", the model's eos_token_id (checked in build_model)
PAD = 1
SPECIAL = (0, 1, 2, 3)  # <s>, <pad>, </s>, <unk>: never generated
END_SHARE = 0.15  # share of tokens whose successor is EOS
VANILLA_NOISE = 0.5  # noise added to the vanilla exits' copy of the head, relative to its std
POSITION_SCALE = 0.3  # std of the learned position embeddings (token embeddings: 1)
QFORMER_SCALE = 2.0  # weight scale of the Q-Former's cross-attention
QUERY_SCALE = 1.0  # weight scale of opt_proj (image queries vs token embeddings)
EXIT_SCALE = 1.0  # weight scale of the exit transformers' attention output and MLP output
# Prompts of different token lengths (with the BOS the tokenizer adds): 1, 2, 4 and 6 tokens.
PROMPTS = ["", "a", "a photo of", "two red circles on the"]
HOSTS = ("plugin", "lavis")  # Blip2OPT is in salesforce-lavis 1.0.2
GENERATE_KWARGS = {}  # the host's generate defaults are greedy-compatible once num_beams=1


def build_model(layout: str = "free", exit_layers: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> Blip2OPTFree:
    """The tiny BLIP-2 OPT (LAVIS classes) with a 6-layer, 64-wide LM set as described above;
    exits after `exit_layers` (default EXIT_LAYERS), `layout` "free", "no_adversarial" or
    "vanilla". Only the default seed is checked to give the properties above."""
    exit_layers = EXIT_LAYERS if exit_layers is None else exit_layers
    seed = SEED if seed is None else seed
    cfg = OmegaConf.merge(
        OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model,
        {
            "opt_config": {"hidden_size": HIDDEN, "ffn_dim": FFN, "num_hidden_layers": NUM_LAYERS, "num_attention_heads": HEADS},
            "exits": {"layers": list(exit_layers), "init": "random", "layout": layout},
        },
    )
    torch.manual_seed(seed)
    model = Blip2OPTFree.from_config(cfg).eval()
    assert model.eos_token_id == EOS and model.opt_model.config.pad_token_id == PAD
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _redraw_after_vision(model, seed)
        _set_lm(model.opt_model, gen)
        set_qformer(model, model.opt_proj, gen)
        for module in model.early_exits.exits:
            _set_exit(module, model.opt_model, gen)
    return model


def _redraw_after_vision(model: Blip2OPTFree, seed: int) -> None:
    """Redraws, from `seed`, every random weight built after the vision encoder (Q-Former, query
    tokens, projection, exits, discriminators) with their own initialisers. Why: transformers
    4.26 initialises a PreTrainedModel nested in another twice (LAVIS's Q-Former BertModel inside
    BertLMHeadModel) and 4.33 once (`_is_hf_initialized`), so from the Q-Former on the global RNG
    stream, and every weight drawn from it, differs between the two supported stacks."""
    torch.manual_seed(seed)
    model.Qformer.apply(model.Qformer._init_weights)  # the Q-Former's own (BERT) initialiser, once
    model.query_tokens.normal_(0.0, model.Qformer.config.initializer_range)  # as LAVIS's init_Qformer
    for module in [model.opt_proj, *model.early_exits.modules()]:  # built with torch's initialisers
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
            module.reset_parameters()


def set_qformer(model, projection: torch.nn.Linear, gen: torch.Generator, instruction: bool = False) -> None:
    """Sharp, strong cross-attention, so that each query reads its own patches (a random
    Q-Former averages the image away), and queries as strong as token embeddings; with the
    `instruction` (InstructBLIP), its self-attention and word embeddings too, so the instruction
    changes the queries. Every family's tiny host sets its Q-Former so."""
    for layer in model.Qformer.bert.encoder.layer:
        for attention in ((layer.attention, layer.crossattention) if instruction else (layer.crossattention,)):
            for linear in (attention.self.query, attention.self.key, attention.self.value, attention.output.dense):
                _normal_(linear.weight, QFORMER_SCALE / math.sqrt(linear.in_features), gen)
    if instruction:
        _normal_(model.Qformer.bert.embeddings.word_embeddings.weight, 1.0, gen)
    _normal_(projection.weight, QUERY_SCALE / math.sqrt(projection.in_features), gen)


def _normal_(weight: torch.Tensor, std: float, gen: torch.Generator) -> None:
    weight.copy_(torch.randn(weight.shape, generator=gen) * std)


def _set_lm(lm: OPTForCausalLM, gen: torch.Generator) -> None:
    vocab, dim = lm.config.vocab_size, lm.config.hidden_size
    end_direction = torch.randn(dim, generator=gen)
    end_direction /= end_direction.norm()
    embeddings = torch.randn(vocab, dim, generator=gen)
    ends = torch.rand(vocab, generator=gen) < END_SHARE
    ends[list(SPECIAL) + [EOS]] = False
    embeddings[ends] += 3.0 * math.sqrt(dim) * end_direction
    lm.model.decoder.embed_tokens.weight.copy_(embeddings)
    # Positions that matter (OPT's init, std 0.02, would let a position bug pass unseen).
    _normal_(lm.model.decoder.embed_positions.weight, POSITION_SCALE, gen)
    head = torch.randn(vocab, dim, generator=gen)  # untied: a random successor per token
    head[EOS] = 6.0 * end_direction
    head[list(SPECIAL)] = 0.0
    lm.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    for layer in lm.model.decoder.layers:
        attn = layer.self_attn
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, layer.fc1):
            _normal_(linear.weight, 1.0 / math.sqrt(dim), gen)
        _normal_(layer.fc2.weight, 1.0 / math.sqrt(layer.fc2.in_features), gen)


def _set_exit(module: torch.nn.Module, lm: OPTForCausalLM, gen: torch.Generator) -> None:
    """Random exit transformers writing at the backbone layers' scale (free, no_adversarial);
    for vanilla, the set head (built before it was set) plus noise."""
    if hasattr(module, "layer"):
        layer = module.layer
        _normal_(layer.self_attn.out_proj.weight, EXIT_SCALE / math.sqrt(layer.self_attn.out_proj.in_features), gen)
        _normal_(layer.fc2.weight, EXIT_SCALE / math.sqrt(layer.fc2.in_features), gen)
    else:
        head = lm.lm_head.weight
        module.head[-1].weight.copy_(head + torch.randn(head.shape, generator=gen) * VANILLA_NOISE * head.std())


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def lm_inputs(model: Blip2OPTFree, image: torch.Tensor, prompts: Sequence[str]):
    """What the plugin hands the engine: [queries, left padding, prompt] embeddings and mask,
    plus the left-padded prompt ids and the query embeddings (for `teacher_forced`)."""
    lm_batch = binding_for(model).decode_batch(model, image, prompts, 1)
    query_embeds, _ = image_queries(model, image, model.opt_proj)
    ids = tokenize(model.opt_tokenizer, prompts, image.device, "left", model.max_txt_len).input_ids
    return lm_batch.inputs_embeds, lm_batch.attention_mask, ids, query_embeds


def trim_at_eos(row: Sequence[int]) -> List[int]:
    row = list(row)
    return row[: row.index(EOS) + 1] if EOS in row else row


@torch.no_grad()
def lavis_greedy(model: Blip2OPTFree, image: torch.Tensor, prompt: str, max_length: int) -> List[List[int]]:
    """LAVIS 1.0.2's own `Blip2OPT.generate(num_beams=1)` on these weights, with LAVIS's own OPT
    class (no plugin code: not the engine, not the cache fix), one prompt for the whole batch;
    returns the generated ids per row, trimmed after EOS."""
    lm = model.opt_model
    recorded = {}
    plugin_class = type(lm)

    def generate(*args, **kwargs):
        recorded["out"] = OPTForCausalLM.generate(lm, *args, **kwargs)
        return recorded["out"]

    lm.__class__ = OPTForCausalLM
    lm.generate = generate
    try:
        Blip2OPT.generate(model, {"image": image, "prompt": prompt}, num_beams=1, max_length=max_length)
    finally:
        del lm.generate
        lm.__class__ = plugin_class
    prompt_length = len(model.opt_tokenizer(prompt).input_ids)
    return [trim_at_eos(row) for row in recorded["out"][:, prompt_length:].tolist()]


@dataclass
class TeacherForced:
    """One teacher-forced pass over [queries, padding, prompt, tokens], columns as the engine's."""

    hidden: tuple  # LAVIS's output_hidden_states: hidden[i] = input of layer i, hidden[-1] final-normed
    final_logits: torch.Tensor  # [B, T, V]
    exit_logits: List[torch.Tensor]  # per exit, [B, T, V]
    keys: List[torch.Tensor]  # per slot (backbone layers, then exit transformers), [B, H, T, Dh]
    values: List[torch.Tensor]


@torch.no_grad()
def teacher_forced(model: Blip2OPTFree, query_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> TeacherForced:
    """LAVIS's OPT forward (hidden states and KV cache) and each exit's own modules' forward on
    it; `mask` covers queries + ids. Independent of the engine, the adapter and the KV cache."""
    lm = model.opt_model
    out = lm(input_ids=ids, query_embeds=query_embeds, attention_mask=mask, output_hidden_states=True, use_cache=True, return_dict=True)
    hidden = out.hidden_states
    keys = [kv[0] for kv in out.past_key_values]
    values = [kv[1] for kv in out.past_key_values]
    decoder = lm.model.decoder
    attn_mask = decoder._prepare_decoder_attention_mask(mask, mask.shape, hidden[0], 0)
    exit_logits = []
    for module, layer in zip(model.early_exits.exits, exits_of(model).config.layers):
        exit_input = hidden[layer + 1]  # output of decoder layer `layer`
        if hasattr(module, "layer"):
            exit_out, present = module.layer(exit_input, attention_mask=attn_mask, use_cache=True)
            keys.append(present[0])
            values.append(present[1])
            exit_logits.append(lm.lm_head(decoder.final_layer_norm(exit_out)))
        else:
            exit_logits.append(module.head(module.norm(exit_input)))
    return TeacherForced(hidden, out.logits, exit_logits, keys, values)


@torch.no_grad()
def forced_on(model: Blip2OPTFree, image: torch.Tensor, prompts: Sequence[str], tokens: torch.Tensor):
    """Teacher-forced pass over [queries, padded prompts, generated tokens but the last]; returns
    (TeacherForced, prefix): the token generated at step t is predicted at column prefix + t - 1."""
    _, mask, ids, query_embeds = lm_inputs(model, image, prompts)
    full_ids = torch.cat([ids, tokens[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=mask.dtype)], 1)
    return teacher_forced(model, query_embeds, full_ids, full_mask), mask.shape[1]


def decode_text(model: Blip2OPTFree, ids: Sequence[int]) -> str:
    return model.opt_tokenizer.decode(ids, skip_special_tokens=True).strip()


def slot_layers(model: Blip2OPTFree) -> list:
    return list(model.opt_model.model.decoder.layers) + [m.layer for m in model.early_exits.exits]


def self_kv(layer: torch.nn.Module, hidden: torch.Tensor, position: int):
    """The self-attention keys/values [H, Dh] `layer` computes from its input `hidden` [D] (no
    position enters them in this family)."""
    x = layer.self_attn_layer_norm(hidden)
    return layer.self_attn.k_proj(x).view(HEADS, HIDDEN // HEADS), layer.self_attn.v_proj(x).view(HEADS, HIDDEN // HEADS)
