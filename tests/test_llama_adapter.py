"""The LLaMA decoder adapter of the exits core, against Hugging Face's own `LlamaForCausalLM`.

Skipped where transformers has no LLaMA (the default stack, 4.26); runs on the second stack
(transformers 4.33.2: `STACK=lavis-main bash run_scripts/test.sh`).

The model: a tiny random `LlamaForCausalLM` with 6 layers, 64 wide, 4 query heads over 2 key/value
heads (grouped-query attention), a 300-token vocabulary, and weights *set* (seeded) as
tests/varied_lm.py does for OPT: each token has a random successor, about one in six is an "end"
token followed by EOS (rows stop at different lengths), and the attention is sharp enough that
rotary positions change tokens. Inputs follow LAVIS main's Vicuna at generation: a row is
[image queries | left padding | prompt] (prompts of 1, 2, 4 and 6 tokens: 5, 4, 2 and 0 pads) and
positions are cumsum(mask) - 1, so positions and columns disagree by the pads *between* real
columns (a rotary taken at columns shows). Exits after layers 1 and 3 are fresh `new_layer()`s with
random weights at the backbone's scale (`perturb_exits`), so they disagree with the final head.

References never use the adapter or the engine: HF's forward (`output_hidden_states`,
`past_key_values`, which hold rotated, un-repeated K/V heads), HF's `generate(num_beams=1)`, each
exit layer's own `LlamaDecoderLayer.forward`, and transformers' `apply_rotary_pos_emb`.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import List, NamedTuple

import numpy as np
import pytest
import torch

from lavis_free.compat.transformers_version import HAS_LLAMA, TRANSFORMERS_VERSION

from lavis_free.exits.adapters import adapter_for
from lavis_free.exits.config import ExitConfig
from lavis_free.exits.early_exits import EarlyExits
from lavis_free.exits.engine import DecodeOptions, EarlyExitDecoder
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.options import FULL_DEPTH, ExitOptions

if HAS_LLAMA:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb

    from lavis_free.exits.adapters.llama import LlamaAdapter

pytestmark = pytest.mark.skipif(
    not HAS_LLAMA,
    reason=f"transformers {TRANSFORMERS_VERSION} has no LlamaForCausalLM (needs >= 4.28; the second stack, "
    "STACK=lavis-main, has 4.33.2)",
)

VOCAB, HIDDEN, HEADS, KV_HEADS, FFN = 300, 64, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
NUM_LAYERS = 6
EXIT_LAYERS = (1, 3)  # exits after layers 1 and 3: tokens leaving there run 2 and 4 layers
PAD, BOS, EOS = 0, 1, 2
SPECIAL = (PAD, BOS, EOS)
NUM_QUERIES = 4  # "image queries" before the padding, as in LAVIS main's Vicuna
PROMPT_LENGTHS = (1, 2, 4, 6)  # prompt tokens per row (left padding 5, 4, 2, 0)
BATCH = len(PROMPT_LENGTHS)
NEW = 20  # max_new_tokens
THRESHOLD = 0.9  # max_prob; strictly inside (0, 1): tokens leave at each exit, others run full depth
SEED = 10  # a seed where the properties the test_varied_llama_* tests assert hold
END_SHARE = 0.15  # share of tokens whose successor is EOS
QK_SCALE = 2.0  # query/key weight scale: sharp attention, so rotary positions change tokens
EXIT_SCALE = 1.0  # exits' attention output and MLP output, at the backbone layers' scale


def llama_config(**overrides) -> "LlamaConfig":
    cfg = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _normal_(weight: torch.Tensor, std: float, gen: torch.Generator) -> None:
    weight.copy_(torch.randn(weight.shape, generator=gen) * std)


def _scaled(linear: torch.nn.Linear, gen: torch.Generator, scale: float = 1.0) -> None:
    _normal_(linear.weight, scale / math.sqrt(linear.in_features), gen)


@torch.no_grad()
def build_lm(seed: int = SEED, **config) -> LlamaForCausalLM:
    """The tiny LLaMA with weights set as the module docstring says (eval mode, float32)."""
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(llama_config(**config)).eval()
    gen = torch.Generator().manual_seed(seed)
    end_direction = torch.randn(HIDDEN, generator=gen)
    end_direction /= end_direction.norm()
    embeddings = torch.randn(VOCAB, HIDDEN, generator=gen)
    ends = torch.rand(VOCAB, generator=gen) < END_SHARE
    ends[list(SPECIAL)] = False
    embeddings[ends] += 3.0 * math.sqrt(HIDDEN) * end_direction
    lm.model.embed_tokens.weight.copy_(embeddings)
    head = torch.randn(VOCAB, HIDDEN, generator=gen)  # untied: a random successor per token
    head[EOS] = 6.0 * end_direction
    head[[PAD, BOS]] = 0.0
    lm.lm_head.weight.copy_(head)
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _scaled(attn.q_proj, gen, QK_SCALE)
        _scaled(attn.k_proj, gen, QK_SCALE)
        for linear in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            _scaled(linear, gen)
    return lm


@torch.no_grad()
def perturb_exits(early_exits: EarlyExits, seed: int = 2) -> None:
    """Fresh exit layers with the backbone's attention sharpness and output scale."""
    gen = torch.Generator().manual_seed(seed)
    for module in early_exits.exits:
        attn, mlp = module.layer.self_attn, module.layer.mlp
        _scaled(attn.q_proj, gen, QK_SCALE)
        _scaled(attn.k_proj, gen, QK_SCALE)
        _scaled(attn.v_proj, gen)
        _scaled(attn.o_proj, gen, EXIT_SCALE)
        _scaled(mlp.down_proj, gen, EXIT_SCALE)


def build_exits(lm, init: str = "random") -> EarlyExits:
    adapter = adapter_for(lm)
    config = ExitConfig.from_dict({"layers": list(EXIT_LAYERS), "init": init}, adapter.num_layers)
    torch.manual_seed(SEED)
    early_exits = EarlyExits(adapter, config).eval()
    perturb_exits(early_exits)
    return early_exits


# -- inputs: [queries | left padding | prompt], positions = cumsum(mask) - 1 -------------------


class Prefix(NamedTuple):
    inputs_embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T]
    ids: torch.Tensor  # [B, T - NUM_QUERIES] left-padded prompt ids
    queries: torch.Tensor  # [B, NUM_QUERIES, D]


@torch.no_grad()
def prefix_inputs(lm, prompt_lengths=PROMPT_LENGTHS, num_queries: int = NUM_QUERIES, seed: int = 1) -> Prefix:
    gen = torch.Generator().manual_seed(seed)
    batch, width = len(prompt_lengths), max(prompt_lengths)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    prompt_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(prompt_lengths):
        ids[row, width - n :] = torch.randint(len(SPECIAL), VOCAB, (n,), generator=gen)
        ids[row, width - n] = BOS
        prompt_mask[row, width - n :] = 1
    queries = torch.randn(batch, num_queries, HIDDEN, generator=gen)
    embeds = torch.cat([queries, lm.model.embed_tokens(ids)], 1)
    mask = torch.cat([torch.ones(batch, num_queries, dtype=torch.long), prompt_mask], 1)
    return Prefix(embeds, mask, ids, queries)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """What HF's LLaMA `prepare_inputs_for_generation` (and LAVIS main's Vicuna) computes."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def trim_at_eos(row: List[int]) -> List[int]:
    return row[: row.index(EOS) + 1] if EOS in row else row


def lengths(tokens: torch.Tensor) -> List[int]:
    return [len(trim_at_eos(row)) for row in tokens.tolist()]


# -- references (no adapter, no engine) --------------------------------------------------------


class TeacherForced(NamedTuple):
    hidden: tuple  # HF's hidden_states: [i] = input of layer i, [-1] final-normed
    final_logits: torch.Tensor  # [B, T, V]
    exit_logits: List[torch.Tensor]  # per exit
    keys: List[torch.Tensor]  # per slot (backbone layers, then exit layers), [B, KV_HEADS, T, Dh], rotated
    values: List[torch.Tensor]
    positions: torch.Tensor  # [B, T] HF's position ids


@torch.no_grad()
def teacher_forced(lm, early_exits, embeds: torch.Tensor, mask: torch.Tensor) -> TeacherForced:
    """HF's forward over `embeds` (positions as HF's generation computes them) and each exit
    layer's own LlamaDecoderLayer.forward on its layer's output."""
    positions = hf_positions(mask)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True,
             use_cache=True, return_dict=True)
    hidden = out.hidden_states
    keys = [kv[0] for kv in out.past_key_values]
    values = [kv[1] for kv in out.past_key_values]
    attn_mask = lm.model._prepare_decoder_attention_mask(mask, mask.shape, embeds, 0)
    exit_logits = []
    for module, layer in zip(early_exits.exits if early_exits is not None else [], EXIT_LAYERS):
        exit_out, present = module.layer(hidden[layer + 1], attention_mask=attn_mask, position_ids=positions, use_cache=True)
        keys.append(present[0])
        values.append(present[1])
        exit_logits.append(lm.lm_head(lm.model.norm(exit_out)))
    return TeacherForced(hidden, out.logits, exit_logits, keys, values, positions)


def forced_on(lm, early_exits, prefix: Prefix, tokens: torch.Tensor):
    """Teacher-forced pass over [prefix, generated tokens but the last]: the token generated at
    step t is predicted at column T + t - 1 (T = prefix width)."""
    embeds = torch.cat([prefix.inputs_embeds, lm.model.embed_tokens(tokens[:, :-1])], 1)
    mask = torch.cat([prefix.attention_mask, torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.long)], 1)
    return teacher_forced(lm, early_exits, embeds, mask), prefix.attention_mask.shape[1]


@torch.no_grad()
def hf_generate(lm, prefix: Prefix, new: int = NEW, use_ids: bool = False) -> List[List[int]]:
    """HF's own greedy `generate(num_beams=1)`, from inputs_embeds (as LAVIS main's Vicuna calls it)
    or from ids; the new tokens per row, trimmed after EOS. (From inputs_embeds, transformers
    4.33 starts its output with a dummy BOS column that was never fed to the model: dropped.)"""
    common = dict(attention_mask=prefix.attention_mask, num_beams=1, do_sample=False, max_new_tokens=new,
                  eos_token_id=EOS, pad_token_id=PAD)
    if use_ids:
        out = lm.generate(input_ids=prefix.ids, **common)[:, prefix.ids.shape[1]:]
    else:
        out = lm.generate(inputs_embeds=prefix.inputs_embeds, **common)
        assert (out[:, 0] == BOS).all()
        out = out[:, 1:]
    return [trim_at_eos(row) for row in out.tolist()]


def reference_rotated_kv(layer, hidden: torch.Tensor, position: int):
    """Keys (rotated at `position` with transformers' apply_rotary_pos_emb) and values [KV_HEADS, Dh]
    `layer` computes from its input `hidden` [D], through its own modules."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)[None, None]
    key = attn.k_proj(x).view(1, 1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    value = attn.v_proj(x).view(KV_HEADS, HEAD_DIM)
    cos, sin = attn.rotary_emb(value, seq_len=position + 1)
    _, key = apply_rotary_pos_emb(key, key, cos, sin, torch.tensor([[position]]))
    return key.view(KV_HEADS, HEAD_DIM), value


# -- the one engine-level helper ----------------------------------------------------------------


def engine_decode(lm, early_exits, prefix: Prefix, new: int = NEW, **exit_options):
    """EarlyExitDecoder.generate on the prefix; `exit_options` (none = full depth). Returns (decoder, result)."""
    adapter = adapter_for(lm)
    exits = ExitOptions(early_exit=True, **exit_options) if exit_options else FULL_DEPTH
    opts = DecodeOptions(max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD, exits=exits)
    decoder = EarlyExitDecoder(adapter, early_exits)
    return decoder, decoder.generate(LMBatch(prefix.inputs_embeds, prefix.attention_mask), opts)


def exit_mix(result, tokens) -> Counter:
    """Counter of layers run over the tokens after the first (always full depth), up to EOS."""
    return Counter(n for row, m in zip(result.layers_run, lengths(tokens)) for n in row[1:m])


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return build_lm()


@pytest.fixture(scope="module")
def prefix(lm):
    return prefix_inputs(lm)


@pytest.fixture(scope="module")
def exits(lm):
    return build_exits(lm)


@pytest.fixture(scope="module")
def reference(lm, prefix):
    """HF's greedy tokens per row, each row alone (its padding columns removed)."""
    out = []
    for row in range(BATCH):
        keep = prefix.attention_mask[row].bool()
        single = Prefix(prefix.inputs_embeds[row : row + 1, keep], prefix.attention_mask[row : row + 1, keep],
                        prefix.ids[row : row + 1], prefix.queries[row : row + 1])
        out.append(hf_generate(lm, single)[0])
    return out


def full_tokens(reference) -> torch.Tensor:
    tokens = torch.full((BATCH, NEW), PAD)
    for i, row in enumerate(reference):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens


# -- registration, shapes, errors ---------------------------------------------------------------


def test_adapter_is_registered_for_llama_and_reads_its_config(lm):
    adapter = adapter_for(lm)
    assert type(adapter) is LlamaAdapter
    assert (adapter.num_layers, adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (
        NUM_LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM,
    )
    assert adapter.final_norm_module() is lm.model.norm and adapter.head_modules() == [lm.lm_head]
    layer = adapter.new_layer()
    assert type(layer) is LlamaDecoderLayer and layer.self_attn.k_proj.out_features == KV_HEADS * HEAD_DIM
    assert layer.self_attn.q_proj.weight.dtype == torch.float32
    half = build_lm().to(torch.bfloat16)
    assert adapter_for(half).new_layer().mlp.down_proj.weight.dtype == torch.bfloat16


def test_adapter_errors_are_clear(lm):
    adapter = adapter_for(lm)
    hidden, positions = torch.zeros(1, 1, HIDDEN), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="decoder-only"):
        adapter.forward_layer(adapter.layers[0], hidden, positions, None, lambda k, v: (k, v), encoder=object())
    with pytest.raises(ValueError, match="rotary positions"):
        adapter.embed(hidden, torch.full((1, 1), 128))
    with pytest.raises(NotImplementedError, match="dynamic"):
        adapter_for(build_lm(rope_scaling={"type": "dynamic", "factor": 2.0}))


# -- the model is not degenerate ----------------------------------------------------------------


def test_varied_llama_outputs_differ_per_row_and_stop_at_different_lengths(lm, prefix, reference):
    assert len({tuple(row) for row in reference}) == BATCH, reference
    assert len({len(row) for row in reference}) >= 3, reference
    assert sum(row[-1] == EOS and len(row) < NEW for row in reference) >= 2, reference
    assert all(len(set(row)) >= 3 for row in reference), reference
    queries = torch.randn(prefix.queries.shape, generator=torch.Generator().manual_seed(5))
    other = prefix._replace(inputs_embeds=torch.cat([queries, prefix.inputs_embeds[:, NUM_QUERIES:]], 1), queries=queries)
    assert hf_generate(lm, other) != hf_generate(lm, prefix), "the queries must matter"


def test_varied_llama_exits_disagree_with_the_final_head(lm, prefix, exits, reference):
    """On the full-depth tokens each exit's argmax differs from the final head's on >= 30% of
    them, and its max_prob confidence spreads on both sides of THRESHOLD."""
    tokens = full_tokens(reference)
    forced, width = forced_on(lm, exits, prefix, tokens)
    cols = torch.arange(width - 1, width + NEW - 1)
    valid = torch.tensor([[t < len(row) for t in range(NEW)] for row in reference])
    final = forced.final_logits[:, cols].argmax(-1)
    assert torch.equal(final[valid], tokens[valid]), "teacher forcing must reproduce HF's greedy tokens"
    for k, logits in enumerate(forced.exit_logits):
        disagree = (logits[:, cols].argmax(-1) != final)[valid].float().mean().item()
        assert disagree >= 0.3, (k, disagree)
        confident = (torch.softmax(logits[:, cols], -1).amax(-1) >= THRESHOLD)[valid].float().mean().item()
        assert 0.2 <= confident <= 0.8, (k, confident)


def test_positions_matter_beyond_columns(lm, prefix):
    """The model is position-sensitive where positions and columns disagree: rotating at columns
    (what a rotary-at-column bug would do) changes HF's own greedy tokens on padded rows."""
    mask = prefix.attention_mask
    columns = torch.arange(mask.shape[1]).expand_as(mask)
    with torch.no_grad():
        at_positions = lm(inputs_embeds=prefix.inputs_embeds, attention_mask=mask, position_ids=hf_positions(mask)).logits
        at_columns = lm(inputs_embeds=prefix.inputs_embeds, attention_mask=mask, position_ids=columns).logits
    padded = [row for row in range(BATCH) if not mask[row].all()]
    assert (at_positions[padded, -1].argmax(-1) != at_columns[padded, -1].argmax(-1)).any()


# -- teacher forcing: the adapter's layers equal HF's forward ------------------------------------


def test_teacher_forced_hidden_states_and_logits_equal_hf_forward(lm, prefix, reference):
    """adapter.hidden_states (every layer's output) and the head equal HF's forward with
    output_hidden_states, on every real column of rows with different left padding between the
    queries and the prompt; padding-free pure token rows too."""
    adapter = adapter_for(lm)
    tokens = full_tokens(reference)
    embeds = torch.cat([prefix.inputs_embeds, lm.model.embed_tokens(tokens[:, :-1])], 1)
    mask = torch.cat([prefix.attention_mask, torch.ones(BATCH, NEW - 1, dtype=torch.long)], 1)
    forced = teacher_forced(lm, None, embeds, mask)
    with torch.no_grad():
        outputs = adapter.hidden_states(embeds, mask)
        logits = adapter.logits(outputs[-1])
    real = mask.bool()
    assert len(outputs) == NUM_LAYERS
    for i in range(NUM_LAYERS - 1):  # hidden_states[i + 1] is layer i's output (the last one is final-normed)
        torch.testing.assert_close(outputs[i][real], forced.hidden[i + 1][real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter.final_norm(outputs[-1])[real], forced.hidden[-1][real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[real], forced.final_logits[real], atol=1e-4, rtol=1e-4)
    assert not mask.all(), "some rows are padded"


@pytest.mark.parametrize("config", [{"pretraining_tp": 2}, {"rope_scaling": {"type": "linear", "factor": 2.0}},
                                    {"num_key_value_heads": HEADS}], ids=["pretraining_tp", "linear_rope", "no_gqa"])
def test_config_variants_teacher_forced_equal_hf_forward(config):
    """HF's sliced projections (`pretraining_tp`), linearly scaled rotary tables and plain
    multi-head attention give the adapter the same layer outputs as HF's forward."""
    lm = build_lm(**config)
    prefix = prefix_inputs(lm)
    adapter = adapter_for(lm)
    forced = teacher_forced(lm, None, prefix.inputs_embeds, prefix.attention_mask)
    with torch.no_grad():
        outputs = adapter.hidden_states(prefix.inputs_embeds, prefix.attention_mask)
    real = prefix.attention_mask.bool()
    for i in range(NUM_LAYERS - 1):
        torch.testing.assert_close(outputs[i][real], forced.hidden[i + 1][real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter.logits(outputs[-1])[real], forced.final_logits[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["last", "random"])
def test_exit_layers_teacher_forced_equal_their_own_forward(lm, prefix, reference, init):
    """Exit logits as exit training computes them (backbone_outputs -> exit_outputs) equal the
    exit layer's own LlamaDecoderLayer.forward (HF positions and mask) through the final norm and head."""
    early_exits = build_exits(lm, init)
    adapter = adapter_for(lm)
    tokens = full_tokens(reference)
    embeds = torch.cat([prefix.inputs_embeds, lm.model.embed_tokens(tokens[:, :-1])], 1)
    mask = torch.cat([prefix.attention_mask, torch.ones(BATCH, NEW - 1, dtype=torch.long)], 1)
    with torch.no_grad():
        backbone = early_exits.backbone_outputs(adapter, LMBatch(embeds, mask))
        outputs = early_exits.exit_outputs(adapter, backbone)
    forced = teacher_forced(lm, early_exits, embeds, mask)
    real = mask.bool()
    for k in range(len(EXIT_LAYERS)):
        torch.testing.assert_close(outputs.logits[k][real], forced.exit_logits[k][real], atol=1e-4, rtol=1e-4)


# -- generation: exits off equals HF's generate ---------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("source", ["embeds", "ids"])
def test_engine_full_depth_equals_hf_generate(lm, exits, batch, source):
    """Exits off (no exits, and exits switched off) gives exactly the tokens of HF's
    generate(num_beams=1), padding after EOS: from [queries | pads | prompt] embeddings (LAVIS
    main's Vicuna) and from left-padded ids; at batch 1 and 4."""
    prefix = prefix_inputs(lm, PROMPT_LENGTHS[-batch:])
    if source == "ids":
        prefix = Prefix(lm.model.embed_tokens(prefix.ids).detach(), prefix.attention_mask[:, NUM_QUERIES:], prefix.ids, prefix.queries)
    want = hf_generate(lm, prefix, use_ids=source == "ids")
    assert batch == 1 or len({len(row) for row in want}) >= 2
    for early_exits in (None, exits):
        _, result = engine_decode(lm, early_exits, prefix)
        for row, expected in zip(result.tokens.tolist(), want):
            assert row[: len(expected)] == expected and row[len(expected):] == [PAD] * (NEW - len(expected))
        assert all(set(row) == {NUM_LAYERS} for row in result.layers_run)


# -- exits on --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recompute(lm, prefix, exits):
    return engine_decode(lm, exits, prefix, exit_threshold=THRESHOLD, kv_policy="recompute")


def test_each_exited_token_is_its_exits_argmax(lm, prefix, exits, recompute):
    """recompute at a threshold inside (0, 1): a token that left after layer e equals the argmax
    of that exit's logits in a teacher-forced pass over the same tokens (HF's forward + the exit
    layer's own forward), a full-depth token the final head's; the decisions are the rule's."""
    _, result = recompute
    tokens = result.tokens
    mix = exit_mix(result, tokens)
    assert all(mix[layer + 1] >= 3 for layer in EXIT_LAYERS) and mix[NUM_LAYERS] >= 3, mix
    forced, width = forced_on(lm, exits, prefix, tokens)
    logits_after = {layer + 1: logits for layer, logits in zip(EXIT_LAYERS, forced.exit_logits)}
    logits_after[NUM_LAYERS] = forced.final_logits
    confidence_after = {n: torch.softmax(logits, -1).amax(-1) for n, logits in logits_after.items()}
    for row, n in enumerate(lengths(tokens)):
        for t in range(n):
            left_after, col = result.layers_run[row][t], width + t - 1
            assert logits_after[left_after][row, col].argmax().item() == tokens[row, t].item(), (row, t, left_after)
            if t == 0:
                continue
            passed = [layer + 1 for layer in EXIT_LAYERS if layer + 1 < left_after]
            assert all(confidence_after[k][row, col] < THRESHOLD for k in passed), (row, t, left_after)
            if left_after < NUM_LAYERS:
                assert confidence_after[left_after][row, col] >= THRESHOLD, (row, t, left_after)


def test_recompute_caches_equal_a_full_depth_pass(lm, prefix, exits):
    """After decoding with exits and `flush`, every backbone layer's and exit layer's keys
    (rotated at HF's positions) and values equal HF's full-depth teacher-forced pass, on every
    column the row used; the cache holds num_key_value_heads heads (GQA: un-repeated)."""
    decoder, result = engine_decode(lm, exits, prefix, exit_threshold=THRESHOLD, kv_policy="recompute")
    tokens = result.tokens
    assert len(exit_mix(result, tokens)) == len(EXIT_LAYERS) + 1 and len(set(lengths(tokens))) >= 2
    width = prefix.attention_mask.shape[1]
    last = width + NEW - 2
    decoder.flush(last)
    forced, _ = forced_on(lm, exits, prefix, tokens)
    used = torch.zeros(BATCH, last + 1, dtype=torch.bool)
    used[:, :width] = prefix.attention_mask.bool()
    for row, n in enumerate(lengths(tokens)):
        used[row, width : width + n - 1] = True  # columns of the tokens fed back in
    num_slots = NUM_LAYERS + len(EXIT_LAYERS)
    assert decoder.cache.keys.shape[:3] == (num_slots, BATCH, KV_HEADS) == (len(forced.keys),) + forced.keys[0].shape[:2]
    for slot in range(num_slots):
        for got, want in ((decoder.cache.keys, forced.keys), (decoder.cache.values, forced.values)):
            got, want = got[slot, :, :, : last + 1], want[slot][:, :, : last + 1]
            torch.testing.assert_close(got.transpose(1, 2)[used], want.transpose(1, 2)[used], atol=1e-5, rtol=1e-4)


def test_propagate_writes_each_skipped_layers_rotated_projection(lm, prefix, exits, monkeypatch):
    """For each exited token, every deeper backbone layer and deeper exit layer holds, at that
    column, its own key (rotated at the token's position) and value projection of its own
    input_layernorm of the exited hidden state; the exit's own slot ties that state to what the
    exit read. For a row's first exited token, the next layer's keys/values equal HF's pass."""
    widths = []  # every decode-step call runs one column (or the prefill's): pending ones are projected
    mask_of = EarlyExitDecoder._mask
    monkeypatch.setattr(EarlyExitDecoder, "_mask", lambda self, win: widths.append(win.last - win.first + 1) or mask_of(self, win))
    decoder, result = engine_decode(lm, exits, prefix, exit_threshold=THRESHOLD, kv_policy="propagate")
    assert widths and set(widths) <= {1, prefix.attention_mask.shape[1]}, sorted(set(widths))
    lazy = decoder.cache.filled.copy()
    decoder.flush(prefix.attention_mask.shape[1] + NEW - 2)  # propagate projects lazily, when a slot next runs for the row
    tokens, cache = result.tokens, decoder.cache
    width = prefix.attention_mask.shape[1]
    slot_layers = list(lm.model.layers) + [module.layer for module in exits.exits]
    slot_depth = list(range(NUM_LAYERS)) + [layer + 0.5 for layer in EXIT_LAYERS]
    forced, _ = forced_on(lm, exits, prefix, tokens)
    checked, first_checked = Counter(), 0
    for row, n in enumerate(lengths(tokens)):
        for t in range(1, n):
            layers_run = result.layers_run[row][t]
            if layers_run == NUM_LAYERS:
                continue
            exit_layer, col = layers_run - 1, width + t - 1
            hidden, position = cache.states[row, col], int(forced.positions[row, col])
            assert position != col or prefix.attention_mask[row].all()
            skipped = [slot for slot, depth in enumerate(slot_depth) if depth > exit_layer + 0.5]
            own = slot_depth.index(exit_layer + 0.5)
            for slot in skipped + [own]:
                keys, values = reference_rotated_kv(slot_layers[slot], hidden, position)
                torch.testing.assert_close(cache.keys[slot, row, :, col], keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(cache.values[slot, row, :, col], values, atol=1e-5, rtol=1e-4)
            if all(r == NUM_LAYERS for r in result.layers_run[row][:t]):  # the row's first exited token
                nxt = exit_layer + 1
                for got, want in ((cache.keys, forced.keys), (cache.values, forced.values)):
                    torch.testing.assert_close(got[nxt, row, :, col], want[nxt][row, :, col], atol=1e-5, rtol=1e-4)
                first_checked += 1
            checked[(row, exit_layer)] += 1
    assert {exit_layer for _, exit_layer in checked} == set(EXIT_LAYERS), checked
    assert len({row for row, _ in checked}) >= 2 and first_checked >= 2, (checked, first_checked)
    for row, n in enumerate(lengths(tokens)):
        assert np.all(cache.filled[row] >= width + n - 1), "flush fills every pending column"
    assert (lazy < cache.filled).any(), "generate left exited columns for the slots' next calls (or flush)"


def test_exit_training_step_reaches_only_the_exits(lm, prefix, reference):
    """One generator step on the LLaMA backbone: gradients reach every exit layer's attention
    and MLP, and no backbone parameter."""
    early_exits = build_exits(lm).train()
    adapter = adapter_for(lm)
    tokens = full_tokens(reference)
    embeds = torch.cat([prefix.inputs_embeds, lm.model.embed_tokens(tokens[:, :-1]).detach()], 1)
    mask = torch.cat([prefix.attention_mask, torch.ones(BATCH, NEW - 1, dtype=torch.long)], 1)
    labels = torch.full_like(mask, -100)
    width = prefix.attention_mask.shape[1]
    labels[:, width - 1 :] = tokens  # aligned: column width - 1 + t predicts token t
    for param in lm.parameters():
        param.requires_grad_(False)
    try:
        backbone = early_exits.backbone_outputs(adapter, LMBatch(embeds, mask, labels=labels))
        outputs = early_exits.exit_outputs(adapter, backbone)
        loss, logs = early_exits.generator_loss(adapter, outputs, backbone)
        loss.backward()
    finally:
        for param in lm.parameters():
            param.requires_grad_(True)
    assert math.isfinite(loss.item()) and "loss_adv" in logs
    for module in early_exits.exits:
        for param in (module.layer.self_attn.q_proj.weight, module.layer.self_attn.k_proj.weight, module.layer.mlp.gate_proj.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(param.grad is None for param in lm.parameters())
