"""The T5 (FlanT5) decoder adapter of the exits core, against LAVIS's own T5 and independent references.

The model: `build_t5` (LAVIS's modeling_t5, cache-fixed) with 6 decoder blocks, d_kv 12 x 4 heads
(inner width 48, not d_model 64), 8 causal relative-position buckets up to distance 20 (so
distance matters inside a caption) and weights *set* (seeded) so that greedy outputs differ per
row, depend on the encoder (rows with 0, 2, 5 and 7 encoder pads) and on positions, and stop at
EOS at different lengths, like tests/varied_lm.py does for OPT. Exits after decoder layers 1 and
3 start as copies of the last block (which owns no bias table) and are then perturbed, so they
disagree with the final head and depend on the bias (`perturb_exits`). `test_varied_t5_*` pin
those properties.

References never use the adapter or the engine: LAVIS's T5 forward (`output_hidden_states`,
`past_key_values`), LAVIS's `generate`, and for exit layers LAVIS's `T5Block.forward` given block
0's bias (what T5's own stack passes every block). Engine-level use is one helper,
`engine_decode`.
"""
from __future__ import annotations

import filecmp
import math
import os
from collections import Counter
from typing import List, NamedTuple

import numpy as np
import pytest
import torch
from lavis.models.blip2_models.modeling_t5 import T5Block
from lavis.models.blip2_models.modeling_t5 import T5ForConditionalGeneration as LavisT5
from transformers import T5TokenizerFast

from lavis_free.datasets.shapes import iter_items
from lavis_free.exits.adapters import adapter_for
from lavis_free.exits.adapters.base import EncoderContext
from lavis_free.exits.adapters.t5 import T5Adapter
from lavis_free.exits.config import ExitConfig
from lavis_free.exits.early_exits import EarlyExits
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.models.t5_lm import CachedT5ForConditionalGeneration
from lavis_free.models.tiny import build_t5, load_t5_tokenizer
from lavis_free.models.tokenizers import main as tokenizers_main
from lavis_free.models.tokenizers import t5_tiny_tokenizer_path

PAD, EOS, UNK = 0, 1, 2  # T5: pad is also the decoder start token
D_MODEL, D_KV, HEADS, D_FF = 64, 12, 4, 128
NUM_LAYERS = 6  # decoder blocks
EXIT_LAYERS = (1, 3)
BUCKETS, MAX_DISTANCE = 8, 20
ENC_LENGTH = 10
ENC_REAL = (10, 8, 5, 3)  # real encoder positions per row (right padding, as LAVIS's tokenizer pads)
BATCH = len(ENC_REAL)
NEW = 20  # max_new_tokens
THRESHOLD = 0.8  # max_prob; strictly inside (0, 1): some tokens leave at each exit, some run full depth
SEED = 0
END_SHARE = 0.15  # share of tokens whose successor is EOS
BIAS_STD = 3.0  # relative position bias table (T5's init is tiny: a bias bug would not show)
EXIT_QUERY_SCALE = 0.2  # exits' self-attention queries: weak, so their attention follows the bias
EXIT_VALUE_SCALE = 2.0  # exits' self-attention values and output: strong, so the bias moves their tokens
VANILLA_NOISE = 0.5  # noise added to the vanilla exits' copy of the head, relative to its std


def t5_config(**overrides) -> dict:
    cfg = dict(
        d_model=D_MODEL, d_kv=D_KV, d_ff=D_FF, num_layers=2, num_decoder_layers=NUM_LAYERS, num_heads=HEADS,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        relative_attention_num_buckets=BUCKETS, relative_attention_max_distance=MAX_DISTANCE,
    )
    cfg.update(overrides)
    return cfg


def _normal_(weight: torch.Tensor, std: float, gen: torch.Generator) -> None:
    weight.copy_(torch.randn(weight.shape, generator=gen) * std)


def _scaled(linear: torch.nn.Linear, gen: torch.Generator, scale: float = 1.0) -> None:
    _normal_(linear.weight, scale / math.sqrt(linear.in_features), gen)


def _dense_linears(block) -> list:
    dense = block.layer[-1].DenseReluDense
    return [getattr(dense, name) for name in ("wi", "wi_0", "wi_1", "wo") if hasattr(dense, name)]


@torch.no_grad()
def build_varied(tied: bool = False, feed_forward_proj: str = "gated-gelu", seed: int = SEED) -> LavisT5:
    """The tiny T5 with weights set as the module docstring says (eval mode, float32)."""
    torch.manual_seed(seed)
    lm = build_t5(t5_config(tie_word_embeddings=tied, feed_forward_proj=feed_forward_proj), load_t5_tokenizer()).eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = lm.config.vocab_size
    end_direction = torch.randn(D_MODEL, generator=gen)
    end_direction /= end_direction.norm()
    embeddings = torch.randn(vocab, D_MODEL, generator=gen)
    ends = torch.rand(vocab, generator=gen) < END_SHARE
    ends[[PAD, EOS, UNK]] = False
    embeddings[ends] += 3.0 * math.sqrt(D_MODEL) * end_direction
    lm.shared.weight.copy_(embeddings)
    if not tied:  # a random successor per token; "end" tokens are followed by EOS
        head = torch.randn(vocab, D_MODEL, generator=gen)
        head[EOS] = 6.0 * end_direction
        head[[PAD, UNK]] = 0.0
        lm.lm_head.weight.copy_(head)
    for block in lm.decoder.block:
        self_attn, cross = block.layer[0].SelfAttention, block.layer[1].EncDecAttention
        attention = (self_attn.q, self_attn.k, self_attn.v, self_attn.o, cross.q, cross.k, cross.v, cross.o)
        for linear in attention + tuple(_dense_linears(block)):
            _scaled(linear, gen)
    _normal_(lm.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, BIAS_STD, gen)
    return lm


def encoder_inputs(lm, seed: int = 1):
    """Random encoder input embeddings (like BLIP-2's projected queries + prompt), right-padded
    per ENC_REAL; returns (inputs_embeds, attention_mask, encoder output)."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(BATCH, ENC_LENGTH, D_MODEL, generator=gen)
    mask = torch.zeros(BATCH, ENC_LENGTH, dtype=torch.long)
    for row, n in enumerate(ENC_REAL):
        mask[row, :n] = 1
    with torch.no_grad():
        states = lm.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return embeds, mask, states


def perturb_exits(early_exits: EarlyExits, seed: int = 2) -> None:
    """Exits start as LM blocks; new projections make them disagree with the final head, and
    make their self-attention (weak queries, strong values) follow the relative bias, so an
    exit block run without block 0's bias emits other tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in early_exits.exits:
            if not hasattr(module, "layer"):  # vanilla: its copy of the head, plus noise
                head = module.head[-1].weight
                head.add_(torch.randn(head.shape, generator=gen) * VANILLA_NOISE * head.std())
                continue
            block = module.layer
            attn = block.layer[0].SelfAttention
            _scaled(attn.q, gen, EXIT_QUERY_SCALE)
            _scaled(attn.v, gen, EXIT_VALUE_SCALE)
            _scaled(attn.o, gen, EXIT_VALUE_SCALE)
            _scaled(block.layer[1].EncDecAttention.o, gen)
            _scaled(block.layer[-1].DenseReluDense.wo, gen)


def build_exits(lm, init: str = "last", layout: str = "free") -> EarlyExits:
    adapter = adapter_for(lm)
    config = ExitConfig.from_dict({"layers": list(EXIT_LAYERS), "layout": layout, "init": init}, adapter.num_layers)
    torch.manual_seed(SEED)
    early_exits = EarlyExits(adapter, config).eval()
    perturb_exits(early_exits)
    return early_exits


def trim_at_eos(row: List[int]) -> List[int]:
    return row[: row.index(EOS) + 1] if EOS in row else row


def lengths(tokens: torch.Tensor) -> List[int]:
    return [len(trim_at_eos(row)) for row in tokens.tolist()]


# -- references (no adapter, no engine) ------------------------------------------------------


class TeacherForced(NamedTuple):
    hidden: tuple  # LAVIS's decoder_hidden_states: [i] = input of block i, [-1] final-normed
    final_logits: torch.Tensor  # [B, T, V]
    exit_logits: List[torch.Tensor]  # per exit
    keys: List[torch.Tensor]  # per slot (backbone blocks, then exit blocks), [B, H, T, Dh]
    values: List[torch.Tensor]


def block0_bias(lm, length: int) -> torch.Tensor:
    """[1, H, T, T]: the bias LAVIS's decoder block 0 computes and its stack hands every block."""
    return lm.decoder.block[0].layer[0].SelfAttention.compute_bias(length, length)


@torch.no_grad()
def reference_block(lm, block, hidden, enc_states, enc_mask, with_bias: bool = True):
    """LAVIS's T5Block.forward on a whole decoder sequence, given block 0's bias + causal mask as
    T5Stack passes it (`with_bias=False`: the mask alone, what a block with no table computes);
    returns (output, self keys, self values)."""
    batch, length, _ = hidden.shape
    causal = lm.decoder.get_extended_attention_mask(torch.ones(batch, length, dtype=torch.long), (batch, length))
    bias = block0_bias(lm, length) if with_bias else torch.zeros(1, HEADS, length, length)
    out = block(
        hidden,
        attention_mask=causal,
        position_bias=bias + causal,
        encoder_hidden_states=enc_states,
        encoder_attention_mask=lm.decoder.invert_attention_mask(enc_mask),
        use_cache=True,
    )
    return out[0], out[1][0], out[1][1]


def lm_logits(lm, features: torch.Tensor) -> torch.Tensor:
    """LAVIS's head: the d_model ** -0.5 rescale only with tied embeddings."""
    if lm.config.tie_word_embeddings:
        features = features * lm.model_dim ** -0.5
    return lm.lm_head(features)


@torch.no_grad()
def teacher_forced(lm, early_exits, enc_states, enc_mask, decoder_ids, exit_bias: bool = True) -> TeacherForced:
    out = lm(
        encoder_outputs=(enc_states,), attention_mask=enc_mask, decoder_input_ids=decoder_ids,
        output_hidden_states=True, use_cache=True, return_dict=True,
    )
    hidden = out.decoder_hidden_states
    keys = [kv[0] for kv in out.past_key_values]
    values = [kv[1] for kv in out.past_key_values]
    exit_logits = []
    for module, layer in zip(early_exits.exits if early_exits is not None else [], EXIT_LAYERS):
        if not hasattr(module, "layer"):  # vanilla: own norm and head on the layer's output, no cache
            exit_logits.append(module.head(module.norm(hidden[layer + 1])))
            continue
        exit_out, k, v = reference_block(lm, module.layer, hidden[layer + 1], enc_states, enc_mask, exit_bias)
        keys.append(k)
        values.append(v)
        exit_logits.append(lm_logits(lm, lm.decoder.final_layer_norm(exit_out)))
    return TeacherForced(hidden, out.logits, exit_logits, keys, values)


def hf_generate(lm, cls, enc_embeds, enc_mask, new=NEW, num_beams=1, **kwargs) -> torch.Tensor:
    """`generate(num_beams=1, do_sample=False)` of class `cls` on these weights, from the encoder's
    inputs_embeds (as LAVIS's Blip2T5.generate calls it)."""
    own = type(lm)
    lm.__class__ = cls
    try:
        with torch.no_grad():
            return lm.generate(
                inputs_embeds=enc_embeds, attention_mask=enc_mask, num_beams=num_beams, do_sample=False, max_new_tokens=new, **kwargs
            )
    finally:
        lm.__class__ = own


def as_engine_tokens(generated: torch.Tensor, new: int = NEW) -> torch.Tensor:
    """HF's output without its leading decoder start token, padded to `new` columns."""
    tokens = torch.full((generated.shape[0], new), PAD, dtype=torch.long)
    tokens[:, : generated.shape[1] - 1] = generated[:, 1:]
    return tokens


# -- the one engine-level helper ---------------------------------------------------------------


def engine_decode(lm, early_exits, enc_states, enc_mask, new=NEW, min_length=0, **exit_options):
    """EarlyExitDecoder.generate from the decoder start token; `exit_options` are the
    early-exit options (exit_threshold, kv_policy; none = full depth). Returns (decoder, result)."""
    from lavis_free.exits.engine import DecodeOptions, EarlyExitDecoder
    from lavis_free.exits.options import FULL_DEPTH, ExitOptions

    adapter = adapter_for(lm)
    start = adapter.embed_tokens(torch.full((BATCH, 1), lm.config.decoder_start_token_id, dtype=torch.long))
    batch = LMBatch(
        inputs_embeds=start,
        attention_mask=torch.ones(BATCH, 1, dtype=torch.long),
        encoder=EncoderContext(enc_states, enc_mask),
        prompt_length=1,  # HF's min_length counts the decoder start token
    )
    exits = ExitOptions(early_exit=True, **exit_options) if exit_options else FULL_DEPTH
    opts = DecodeOptions(max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD, min_length=min_length, exits=exits)
    decoder = EarlyExitDecoder(adapter, early_exits)
    return decoder, decoder.generate(batch, opts)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return build_varied()


@pytest.fixture(scope="module")
def encoded(lm):
    return encoder_inputs(lm)


@pytest.fixture(scope="module")
def exits(lm):
    return build_exits(lm)


@pytest.fixture(scope="module")
def reference(lm, encoded):
    """LAVIS's own (uncached) greedy generate, each row's tokens up to EOS."""
    embeds, mask, _ = encoded
    return [trim_at_eos(row) for row in as_engine_tokens(hf_generate(lm, LavisT5, embeds, mask)).tolist()]


def forced_on(lm, early_exits, encoded, tokens, exit_bias: bool = True):
    """Teacher-forced pass over [start, tokens but the last]: token t is predicted at column t."""
    _, mask, states = encoded
    ids = torch.cat([torch.full((BATCH, 1), PAD, dtype=torch.long), tokens[:, :-1]], 1)
    return teacher_forced(lm, early_exits, states, mask, ids, exit_bias)


# -- tokenizer and builder ---------------------------------------------------------------------


def test_t5_tokenizer_has_t5_layout_and_round_trips():
    tok = T5TokenizerFast.from_pretrained(t5_tiny_tokenizer_path())
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD, EOS, UNK)
    assert tok.additional_special_tokens == []  # no <extra_id_*> sentinels
    assert 200 <= len(tok) <= 400
    captions = [c for item in iter_items(7, "val", 40) for c in item.text.captions]
    for text in captions + ["Question: what color is the circle? Answer:"]:
        ids = tok(text).input_ids
        assert ids[-1] == EOS and UNK not in ids and ids.count(EOS) == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok("a large red circle in the top left corner").input_ids) == 10  # one token per word + </s>
    assert UNK not in tok("Zebra 42!").input_ids and tok.decode(tok("Zebra 42!").input_ids, skip_special_tokens=True) == "Zebra 42!"
    batch = tok(["a", "a photo of"], padding="longest", return_tensors="pt")
    assert batch.input_ids[0].tolist() == [tok("a").input_ids[0], EOS, PAD, PAD]
    assert batch.attention_mask[0].tolist() == [1, 1, 0, 0]


def test_t5_and_llama_tokenizer_rebuilds_are_deterministic_and_match_shipped(tmp_path, capsys, monkeypatch):
    """The module's CLI rebuilds all four tokenizers (OPT's and BERT's are checked, and slow to
    train, in test_tokenizers.py: stubbed here), the T5 and LLaMA ones byte for byte as shipped."""
    import lavis_free.models.tokenizers as tokenizers

    for name in ("build_opt_tokenizer", "build_bert_vocab"):
        monkeypatch.setattr(tokenizers, name, lambda texts, out_dir, *args: os.makedirs(out_dir))
    tokenizers_main(["--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["bert_tiny", "llama_tiny", "opt_tiny", "t5_tiny"]
    llama = ["tokenizer.model", "tokenizer_config.json"]
    _, mismatch, errors = filecmp.cmpfiles(tokenizers.llama_tiny_tokenizer_path(), str(tmp_path / "llama_tiny"), llama, shallow=False)
    assert mismatch == [] and errors == [], (mismatch, errors)
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    match, mismatch, errors = filecmp.cmpfiles(t5_tiny_tokenizer_path(), str(tmp_path / "t5_tiny"), names, shallow=False)
    assert mismatch == [] and errors == [], (mismatch, errors)
    assert sum(os.path.getsize(os.path.join(t5_tiny_tokenizer_path(), n)) for n in names) < 64 * 1024
    assert "t5_tiny" in capsys.readouterr().out


def test_build_t5_takes_ids_from_the_tokenizer_and_checks_its_section():
    tok = load_t5_tokenizer()
    lm = build_t5(t5_config(), tok)
    assert type(lm) is CachedT5ForConditionalGeneration and isinstance(lm, LavisT5)
    assert lm.shared.weight.dtype == torch.float32
    config = lm.config
    assert (config.vocab_size, config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (len(tok), PAD, EOS, PAD)
    assert (len(lm.encoder.block), len(lm.decoder.block)) == (2, NUM_LAYERS)
    assert config.is_gated_act and not config.tie_word_embeddings
    required = ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads")
    plain = build_t5({k: v for k, v in t5_config().items() if k in required}, tok)
    assert plain.config.tie_word_embeddings and not plain.config.is_gated_act  # T5Config's defaults
    assert set(lm.state_dict()) == set(LavisT5(config).state_dict())  # LAVIS's keys
    bad = [
        ({k: v for k, v in t5_config().items() if k != "d_kv"}, "model.t5_config: missing key(s) ['d_kv']"),
        (t5_config(d_modle=3), "model.t5_config: unknown key(s) ['d_modle']"),
        (t5_config(vocab_size=10), "model.t5_config: ['vocab_size'] are taken from the shipped tokenizer"),
        (t5_config(num_heads=0), "model.t5_config.num_heads=0 is invalid"),
        (t5_config(feed_forward_proj="swish"), "model.t5_config.feed_forward_proj='swish' is invalid"),
        (t5_config(tie_word_embeddings="no"), "model.t5_config.tie_word_embeddings='no' is invalid"),
        (t5_config(dropout_rate=1.5), "model.t5_config.dropout_rate=1.5 is invalid"),
    ]
    for cfg, message in bad:
        with pytest.raises(ValueError) as err:
            build_t5(cfg, tok)
        assert message in str(err.value)


# -- the adapter on its own --------------------------------------------------------------------


def test_adapter_is_picked_for_lavis_hf_and_cached_t5(lm):
    import transformers

    hf = transformers.T5ForConditionalGeneration(lm.config)
    for model in (lm, hf, LavisT5(lm.config)):
        adapter = adapter_for(model)
        assert type(adapter) is T5Adapter and adapter.is_encoder_decoder
    adapter = adapter_for(lm)
    assert (adapter.num_layers, adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads) == (NUM_LAYERS, D_MODEL, HEADS, HEADS)
    assert adapter.head_dim == D_KV != D_MODEL // HEADS
    assert adapter.layers is lm.decoder.block  # exits sit on decoder blocks, not encoder blocks
    assert adapter.final_norm_module() is lm.decoder.final_layer_norm
    ids = torch.tensor([[PAD, 5, 7]])
    assert torch.equal(adapter.embed_tokens(ids), lm.shared(ids))
    embeds = torch.randn(1, 3, D_MODEL)
    assert torch.equal(adapter.embed(embeds, torch.arange(3)[None]), embeds)  # no positions added


def _decoder_ids(seed: int = 3, length: int = NEW) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 270, (BATCH, length), generator=gen)
    ids[:, 0] = PAD
    return ids


@pytest.mark.parametrize("variant", ["untied-gated", "tied-relu", "hf-untied-gated"])
def test_teacher_forced_states_and_logits_equal_the_lms_forward(variant):
    """adapter.hidden_states (with an EncoderContext) and adapter.logits equal the LM's own forward
    (decoder_input_ids, encoder_outputs, encoder mask): every block's output and the logits, tied
    head (d_model ** -0.5 rescale) and untied (none), LAVIS's class and HF's."""
    tied = variant.startswith("tied")
    lm = build_varied(tied=tied, feed_forward_proj="relu" if tied else "gated-gelu")
    assert lm.config.tie_word_embeddings == tied and lm.config.is_gated_act == (not tied)
    if variant.startswith("hf"):
        import transformers

        hf = transformers.T5ForConditionalGeneration(lm.config).eval()
        hf.load_state_dict(lm.state_dict())
        lm = hf
    _, mask, states = encoder_inputs(lm)
    ids = _decoder_ids()
    with torch.no_grad():
        out = lm(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=ids, output_hidden_states=True)
        adapter = adapter_for(lm)
        hidden = adapter.hidden_states(adapter.embed_tokens(ids), torch.ones_like(ids), EncoderContext(states, mask))
        logits = adapter.logits(hidden[-1])
    want = out.decoder_hidden_states
    assert len(hidden) == NUM_LAYERS and len(want) == NUM_LAYERS + 1
    for i in range(NUM_LAYERS - 1):  # want[i + 1] is block i's output ...
        torch.testing.assert_close(hidden[i], want[i + 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.final_norm(hidden[-1]), want[-1], atol=1e-5, rtol=1e-5)  # ... but the last is final-normed
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-5)
    rescale = [type(m).__name__ for m in adapter.head_modules()]
    assert rescale == (["_TiedHeadRescale", "Linear"] if tied else ["Linear"])
    block_params = sum(p.numel() for p in adapter.layers[0].parameters())
    assert adapter.head_cost_in_layers() == lm.lm_head.weight.numel() / block_params  # the rescale costs nothing


def test_left_padded_decoder_rows_match_the_lms_forward_and_the_row_alone(lm, encoded):
    """Rows of a left-padded decoder prefix (0, 3, 6, 9 pads): on real columns the adapter equals
    LAVIS's forward with decoder_attention_mask and each row run alone without padding (the
    relative bias is taken between columns, so distances between real tokens stay put)."""
    _, mask, states = encoded
    length = 16
    ids = _decoder_ids(length=length)
    dec_mask = torch.ones(BATCH, length, dtype=torch.long)
    for row, pads in enumerate((0, 3, 6, 9)):
        dec_mask[row, :pads] = 0
        ids[row, :pads] = PAD
        ids[row, pads] = PAD  # each row starts with the decoder start token
    with torch.no_grad():
        out = lm(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=dec_mask)
        adapter = adapter_for(lm)
        logits = adapter.logits(adapter.hidden_states(adapter.embed_tokens(ids), dec_mask, EncoderContext(states, mask))[-1])
        real = dec_mask.bool()
        torch.testing.assert_close(logits[real], out.logits[real], atol=1e-4, rtol=1e-5)
        for row in range(BATCH):
            alone_ids = ids[row : row + 1, real[row]]
            alone = adapter.logits(adapter.hidden_states(
                adapter.embed_tokens(alone_ids), torch.ones_like(alone_ids), EncoderContext(states[row : row + 1], mask[row : row + 1])
            )[-1])
            torch.testing.assert_close(logits[row, real[row]], alone[0], atol=1e-4, rtol=1e-5)


def test_relative_bias_and_encoder_padding_matter(lm, encoded):
    """The model is sensitive to the traps: without block 0's bias, or with encoder padding
    attended, greedy tokens of the teacher-forced pass change on many columns."""
    _, mask, states = encoded
    ids = _decoder_ids()
    with torch.no_grad():
        base = lm(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=ids).logits.argmax(-1)
        unmasked = lm(encoder_outputs=(states,), attention_mask=torch.ones_like(mask), decoder_input_ids=ids).logits.argmax(-1)
        table = lm.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        saved = table.clone()
        table.zero_()
        try:
            no_bias = lm(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=ids).logits.argmax(-1)
        finally:
            table.copy_(saved)
    assert (no_bias != base).float().mean() >= 0.3
    padded_rows = [row for row, n in enumerate(ENC_REAL) if n < ENC_LENGTH]
    assert (unmasked[padded_rows] != base[padded_rows]).float().mean() >= 0.2
    attn = lm.decoder.block[0].layer[0].SelfAttention
    distances = -torch.arange(NEW)
    buckets = attn._relative_position_bucket(distances, bidirectional=False, num_buckets=BUCKETS, max_distance=MAX_DISTANCE)
    assert len(set(buckets.tolist())) == BUCKETS  # every bucket is used within NEW tokens


def test_fp16_is_refused_bf16_matches_lavis(encoded):
    lm16 = build_varied().half()
    with pytest.raises(TypeError, match="float16"):
        adapter_for(lm16)
    lm = build_varied()
    adapter = adapter_for(lm)
    _, mask, states = encoded
    with pytest.raises(TypeError, match="float16"):
        adapter.forward_layer(adapter.layers[0], torch.zeros(1, 1, D_MODEL, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.long),
                              None, lambda k, v: (k, v), EncoderContext(states[:1].half(), mask[:1]))
    lm_bf16 = build_varied().to(torch.bfloat16)
    states_bf16 = states.to(torch.bfloat16)
    ids = _decoder_ids()
    with torch.no_grad():
        want = lm_bf16(encoder_outputs=(states_bf16,), attention_mask=mask, decoder_input_ids=ids).logits
        adapter = adapter_for(lm_bf16)
        context = EncoderContext(states_bf16, mask)
        got = adapter.logits(adapter.hidden_states(adapter.embed_tokens(ids), torch.ones_like(ids), context)[-1])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)  # bf16 tolerances; the same math in the same order as LAVIS's


def test_forward_layer_without_encoder_is_an_error(lm):
    adapter = adapter_for(lm)
    positions = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="EncoderContext"):
        adapter.forward_layer(adapter.layers[1], torch.zeros(1, 1, D_MODEL), positions, None, lambda k, v: (k, v))
    with pytest.raises(ValueError, match="EncoderContext"):
        adapter.hidden_states(torch.zeros(1, 2, D_MODEL), torch.ones(1, 2, dtype=torch.long))


@pytest.mark.parametrize("init", ["last", "random"])
def test_exit_layers_get_block0_bias_and_cross_attend(lm, encoded, init):
    """Exit features (teacher-forced, as exit training computes them) equal LAVIS's T5Block
    forward of the exit block given block 0's bias: exit blocks copied from the last block and
    fresh `new_layer()` blocks own no bias table and still use block 0's."""
    _, mask, states = encoded
    early_exits = build_exits(lm, init)
    adapter = adapter_for(lm)
    for module in early_exits.exits:
        assert type(module.layer) is T5Block and len(module.layer.layer) == 3  # self, cross, FF
        assert not module.layer.layer[0].SelfAttention.has_relative_attention_bias
    fresh = adapter.new_layer()
    assert type(fresh) is T5Block and not hasattr(fresh.layer[0].SelfAttention, "relative_attention_bias")
    assert fresh.layer[0].SelfAttention.q.weight.dtype == torch.float32 and fresh.is_decoder
    ids = _decoder_ids()
    batch = LMBatch(adapter.embed_tokens(ids), torch.ones_like(ids), encoder=EncoderContext(states, mask))
    with torch.no_grad():
        backbone = early_exits.backbone_outputs(adapter, batch)
        outputs = early_exits.exit_outputs(adapter, backbone)
    forced = teacher_forced(lm, early_exits, states, mask, ids)
    for k in range(len(EXIT_LAYERS)):
        torch.testing.assert_close(outputs.logits[k], forced.exit_logits[k], atol=1e-4, rtol=1e-5)


# -- the model is not degenerate -----------------------------------------------------------------


def test_varied_t5_outputs_differ_per_row_and_stop_at_different_lengths(reference):
    assert len({tuple(row) for row in reference}) == BATCH, reference
    assert len({len(row) for row in reference}) >= 3, reference
    assert sum(row[-1] == EOS and len(row) < NEW for row in reference) >= 2, reference
    assert all(len(set(row)) >= 3 for row in reference), reference


def test_varied_t5_exits_disagree_with_the_final_head_and_need_the_bias(lm, encoded, exits, reference):
    """On the full-depth tokens each exit's argmax differs from the final head's on >= 30% of
    them, its max_prob confidence spreads on both sides of THRESHOLD, and without block 0's
    bias its argmax changes on >= 10% of the tokens confident enough to leave there."""
    tokens = torch.full((BATCH, NEW), PAD)
    for i, row in enumerate(reference):
        tokens[i, : len(row)] = torch.tensor(row)
    forced = forced_on(lm, exits, encoded, tokens)
    unbiased = forced_on(lm, exits, encoded, tokens, exit_bias=False)
    valid = torch.tensor([[t < len(row) for t in range(NEW)] for row in reference])
    final = forced.final_logits.argmax(-1)
    assert torch.equal(final[valid], tokens[valid]), "teacher forcing must reproduce LAVIS's greedy tokens"
    for k, (logits, no_bias) in enumerate(zip(forced.exit_logits, unbiased.exit_logits)):
        disagree = (logits.argmax(-1) != final)[valid].float().mean().item()
        assert disagree >= 0.3, (k, disagree)
        confident = (torch.softmax(logits, -1).amax(-1) >= THRESHOLD) & valid
        assert 0.2 <= confident.sum().item() / valid.sum().item() <= 0.8, k
        moved = (no_bias.argmax(-1) != logits.argmax(-1))[confident].float().mean().item()
        assert moved >= 0.1, (k, moved)


# -- generation ------------------------------------------------------------------------------------


def test_cached_generate_reuses_its_cache_and_equals_lavis_uncached(lm, encoded, reference):
    """LAVIS 1.0.2's T5 drops its cache (decoder input lengths 1, 2, 3, ... per step); the
    cached class feeds one token per step and gives LAVIS's tokens."""
    embeds, mask, _ = encoded
    lengths_seen = []
    hook = lm.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: lengths_seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        lavis_out = hf_generate(lm, LavisT5, embeds, mask)
        lavis_lengths, lengths_seen[:] = list(lengths_seen), []
        cached_out = hf_generate(lm, CachedT5ForConditionalGeneration, embeds, mask)
    finally:
        hook.remove()
    steps = lavis_out.shape[1] - 1
    assert lavis_lengths == list(range(1, steps + 1))
    assert lengths_seen == [1] * steps
    assert torch.equal(cached_out, lavis_out)
    assert [trim_at_eos(row) for row in as_engine_tokens(cached_out).tolist()] == reference
    # beam search reorders the cache it now really uses (LAVIS's _reorder_cache)
    beams = [hf_generate(lm, cls, embeds, mask, num_beams=3) for cls in (LavisT5, CachedT5ForConditionalGeneration)]
    assert torch.equal(beams[0], beams[1]) and not torch.equal(beams[0], lavis_out)


@pytest.mark.parametrize("min_length", [0, 9])
def test_engine_full_depth_equals_generate(lm, encoded, exits, reference, min_length):
    """The engine from the decoder start token (no exits, and exits switched off) gives exactly
    the tokens of CachedT5ForConditionalGeneration.generate, padding after EOS (HF's output
    starts with the start token); min_length counts the start token as HF does."""
    embeds, mask, states = encoded
    want = as_engine_tokens(hf_generate(lm, CachedT5ForConditionalGeneration, embeds, mask, min_length=min_length))
    assert len(set(lengths(want))) >= 2 and any(n < NEW for n in lengths(want))
    if min_length:  # it blocks an EOS of the unconstrained decode
        assert min(lengths(want)) >= min_length - 1 > min(len(row) for row in reference)
    for early_exits in (None, exits):
        _, result = engine_decode(lm, early_exits, states, mask, min_length=min_length)
        assert torch.equal(result.tokens, want), (result.tokens, want)
        assert all(set(row) == {NUM_LAYERS} for row in result.layers_run)


def exit_mix(result, tokens) -> Counter:
    return Counter(n for row, m in zip(result.layers_run, lengths(tokens)) for n in row[1:m])


@pytest.mark.parametrize("layout", ["free", "vanilla"])
def test_each_exited_token_is_its_exits_argmax(lm, encoded, exits, layout):
    """recompute, at a threshold inside (0, 1): a token that left after layer e equals the argmax
    of that exit's logits in a teacher-forced pass over the same tokens (LAVIS's forward + the
    exit's T5Block; vanilla: its own norm and head), a full-depth token the final head's argmax."""
    _, mask, states = encoded
    exits = exits if layout == "free" else build_exits(lm, layout=layout)
    _, result = engine_decode(lm, exits, states, mask, exit_threshold=THRESHOLD, kv_policy="recompute")
    tokens = result.tokens
    mix = exit_mix(result, tokens)
    assert all(mix[layer + 1] >= 3 for layer in EXIT_LAYERS) and mix[NUM_LAYERS] >= 3, mix
    forced = forced_on(lm, exits, encoded, tokens)
    logits_after = {layer + 1: logits for layer, logits in zip(EXIT_LAYERS, forced.exit_logits)}
    logits_after[NUM_LAYERS] = forced.final_logits
    for row, n in enumerate(lengths(tokens)):
        for t in range(n):
            layers_run = result.layers_run[row][t]
            assert logits_after[layers_run][row, t].argmax().item() == tokens[row, t].item(), (row, t, layers_run)


def used_columns(tokens: torch.Tensor, last: int) -> torch.Tensor:
    """[B, last + 1]: the start column and the columns of tokens fed back in, per row."""
    used = torch.zeros(BATCH, last + 1, dtype=torch.bool)
    used[:, 0] = True
    for row, n in enumerate(lengths(tokens)):
        used[row, 1:n] = True
    return used


def test_recompute_caches_equal_a_full_depth_pass(lm, encoded, exits):
    """After decoding with exits and `flush`, every backbone block's and every exit block's
    self-attention keys/values equal LAVIS's full-depth teacher-forced pass on every column the
    row used."""
    _, mask, states = encoded
    decoder, result = engine_decode(lm, exits, states, mask, exit_threshold=THRESHOLD, kv_policy="recompute")
    tokens = result.tokens
    assert len(exit_mix(result, tokens)) == len(EXIT_LAYERS) + 1 and len(set(lengths(tokens))) >= 2
    last = NEW - 1
    decoder.flush(last)
    forced = forced_on(lm, exits, encoded, tokens)
    used = used_columns(tokens, last)
    num_slots = NUM_LAYERS + len(EXIT_LAYERS)
    assert decoder.cache.keys.shape[0] == len(forced.keys) == num_slots
    for slot in range(num_slots):
        for got, want in ((decoder.cache.keys, forced.keys), (decoder.cache.values, forced.values)):
            got, want = got[slot, :, :, : last + 1], want[slot][:, :, : last + 1]
            torch.testing.assert_close(got.transpose(1, 2)[used], want.transpose(1, 2)[used], atol=1e-5, rtol=1e-4)


def test_propagate_fills_skipped_slots_with_their_projections(lm, encoded, exits, monkeypatch):
    """For each exited token, every deeper backbone block and deeper exit block holds its own
    k/v projection of its own self-attention norm of the exited hidden state; for a row's first
    exited token (every earlier token ran full depth) the next block's keys/values equal the
    full-depth teacher-forced pass exactly."""
    from lavis_free.exits.engine import EarlyExitDecoder

    _, mask, states = encoded
    widths = []  # every decode-step call runs one column: pending ones are projected, not run
    mask_of = EarlyExitDecoder._mask
    monkeypatch.setattr(EarlyExitDecoder, "_mask", lambda self, win: widths.append(win.last - win.first + 1) or mask_of(self, win))
    decoder, result = engine_decode(lm, exits, states, mask, exit_threshold=THRESHOLD, kv_policy="propagate")
    assert widths and set(widths) == {1}, sorted(set(widths))
    lazy = decoder.cache.filled.copy()
    decoder.flush(NEW - 1)  # propagate projects lazily, when a slot next runs for the row
    tokens, cache = result.tokens, decoder.cache
    slot_layers = list(lm.decoder.block) + [module.layer for module in exits.exits]
    slot_depth = list(range(NUM_LAYERS)) + [layer + 0.5 for layer in EXIT_LAYERS]
    forced = forced_on(lm, exits, encoded, tokens)
    checked, first_checked = Counter(), 0
    for row, n in enumerate(lengths(tokens)):
        for t in range(1, n):
            layers_run = result.layers_run[row][t]
            if layers_run == NUM_LAYERS:
                continue
            exit_layer, col = layers_run - 1, t
            hidden = cache.states[row, col]
            skipped = [slot for slot, depth in enumerate(slot_depth) if depth > exit_layer + 0.5]
            own = slot_depth.index(exit_layer + 0.5)
            for slot in skipped + [own]:
                block = slot_layers[slot].layer[0]
                x = block.layer_norm(hidden)
                for got, proj in ((cache.keys, block.SelfAttention.k), (cache.values, block.SelfAttention.v)):
                    torch.testing.assert_close(got[slot, row, :, col], proj(x).view(HEADS, D_KV), atol=1e-5, rtol=1e-4)
            if all(r == NUM_LAYERS for r in result.layers_run[row][:t]):  # the row's first exited token
                nxt = exit_layer + 1
                for got, want in ((cache.keys, forced.keys), (cache.values, forced.values)):
                    torch.testing.assert_close(got[nxt, row, :, col], want[nxt][row, :, col], atol=1e-5, rtol=1e-4)
                first_checked += 1
            checked[(row, exit_layer)] += 1
    assert {exit_layer for _, exit_layer in checked} == set(EXIT_LAYERS), checked
    assert len({row for row, _ in checked}) >= 2 and first_checked >= 2, (checked, first_checked)
    for row, n in enumerate(lengths(tokens)):
        assert np.all(cache.filled[row] >= n), "flush fills every pending column"
    assert (lazy < cache.filled).any(), "generate left exited columns for the slots' next calls (or flush)"


@pytest.mark.parametrize("kv_policy", ["recompute", "propagate"])
def test_cross_attention_keys_values_are_computed_once_per_layer(lm, encoded, exits, kv_policy):
    """Every backbone block's and exit block's cross-attention k/v projection runs once per
    decode, on the whole batch's encoder output, while queries run every step."""
    _, mask, states = encoded
    blocks = list(lm.decoder.block) + [module.layer for module in exits.exits]
    calls = {name: Counter() for name in ("k", "v", "q")}
    hooks = []
    for i, block in enumerate(blocks):
        cross = block.layer[1].EncDecAttention
        for name in calls:
            hooks.append(getattr(cross, name).register_forward_hook(
                lambda module, args, out, i=i, name=name: calls[name].update({i: args[0].shape[0]})
            ))
    try:
        _, result = engine_decode(lm, exits, states, mask, exit_threshold=THRESHOLD, kv_policy=kv_policy)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(exit_mix(result, result.tokens)) == len(EXIT_LAYERS) + 1
    for name in ("k", "v"):
        assert calls[name] == Counter({i: BATCH for i in range(len(blocks))}), (name, calls[name])  # once each, all rows
    assert all(calls["q"][i] > BATCH for i in range(len(blocks))), calls["q"]


def test_exit_training_step_reaches_exit_cross_attention(lm, encoded):
    """Exit training on a T5 backbone (backbone_outputs -> exit_outputs -> generator loss): the
    gradient reaches every exit block's parameters, cross-attention k/v included (training never
    memoizes them), and no backbone parameter."""
    _, mask, states = encoded
    early_exits = build_exits(lm).train()
    adapter = adapter_for(lm)
    ids = _decoder_ids()
    labels = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], 1)  # aligned: column t predicts token t + 1
    batch = LMBatch(adapter.embed_tokens(ids), torch.ones_like(ids), labels=labels, encoder=EncoderContext(states, mask))
    for param in lm.parameters():
        param.requires_grad_(False)
    backbone = early_exits.backbone_outputs(adapter, batch)
    outputs = early_exits.exit_outputs(adapter, backbone)
    loss, logs = early_exits.generator_loss(adapter, outputs, backbone)
    loss.backward()
    assert math.isfinite(loss.item()) and "loss_adv" in logs
    for module in early_exits.exits:
        cross = module.layer.layer[1].EncDecAttention
        for param in (cross.k.weight, cross.v.weight, module.layer.layer[0].SelfAttention.q.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(param.grad is None for param in lm.parameters())
