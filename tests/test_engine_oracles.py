"""Oracles of the early-exit engine on a model whose outputs vary (tests/varied_lm.py).

Every oracle runs at batch 4 with left padding of different lengths (5, 4, 2, 0 prompt pads),
and its reference is computed without the engine: LAVIS's own `Blip2OPT.generate`, or a
teacher-forced pass of LAVIS's OPT forward and each exit's own modules. The first two tests pin
the model's properties that make the others able to fail.
"""
from collections import Counter

import numpy as np
import pytest
import torch
from varied_lm import EOS, EXIT_LAYERS, NUM_LAYERS, PAD, PROMPTS, build_model, images, lavis_greedy, lm_inputs, teacher_forced, trim_at_eos

from lavis_free.exits.engine import DecodeOptions, EarlyExitDecoder
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.options import ExitOptions
from lavis_free.hosts import exits_of

NEW = 20  # max_length
THRESHOLD = 0.9  # max_prob; strictly inside (0, 1), sends tokens to every exit and to full depth
BATCH = len(PROMPTS)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(layout="free"):
        if layout not in cache:
            cache[layout] = build_model(layout)
        return cache[layout]

    return get


@pytest.fixture(scope="module")
def model(models):
    return models("free")


@pytest.fixture(scope="module")
def image():
    return images(BATCH)


@pytest.fixture(scope="module")
def reference(model, image):
    """LAVIS's greedy tokens per row, each row alone (its own prompt, no padding at all)."""
    return [lavis_greedy(model, image[i : i + 1], prompt, NEW)[0] for i, prompt in enumerate(PROMPTS)]


def decode(model, image, monkeypatch, prompts=PROMPTS, **kwargs):
    """`model.generate` (the plugin's whole path) at batch 4, one prompt per row; returns the
    captions, the stats and the engine's DecodeResult it produced them from."""
    results = []

    host = exits_of(model)
    real = type(host).decode

    def decode_spy(*args):
        results.append(real(host, *args))
        return results[-1]

    monkeypatch.setattr(host, "decode", decode_spy)
    captions, stats = model.generate(
        {"image": image, "prompt": list(prompts)}, num_beams=1, max_length=NEW, return_exit_stats=True, **kwargs
    )
    assert len(results) == 1
    return captions, stats, results[0]


def engine_decode(model, image, **options):
    """The engine alone on the plugin's LM inputs; returns (decoder, result, inputs)."""
    inputs_embeds, mask, ids, query_embeds = lm_inputs(model, image, PROMPTS)
    decoder = EarlyExitDecoder(exits_of(model).adapter, model.early_exits)
    opts = DecodeOptions(NEW, EOS, PAD, min_length=1, exits=ExitOptions(**options))
    return decoder, decoder.generate(LMBatch(inputs_embeds, mask, prompt_length=ids.shape[1]), opts), (mask, ids, query_embeds)


def forced_on(model, image, tokens):
    """Teacher-forced pass over [queries, padded prompts, generated tokens but the last]; the
    token generated at step t is predicted at column `prefix + t - 1`."""
    _, mask, ids, query_embeds = lm_inputs(model, image, PROMPTS)
    full_ids = torch.cat([ids, tokens[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones(BATCH, NEW - 1, dtype=mask.dtype)], 1)
    return teacher_forced(model, query_embeds, full_ids, full_mask), mask.shape[1]


def lengths(tokens):
    return [len(trim_at_eos(row)) for row in tokens.tolist()]


def exit_mix(result, tokens):
    """Counter of layers run over the tokens after the first (which is always full depth), up to EOS."""
    return Counter(n for row, m in zip(result.layers_run, lengths(tokens)) for n in row[1:m])


# -- the model is not degenerate -------------------------------------------------------------


def test_varied_lm_outputs_differ_per_row_and_stop_at_different_lengths(model, image, reference):
    assert len({tuple(row) for row in reference}) == BATCH, reference
    assert len({len(row) for row in reference}) >= 3, reference
    assert sum(row[-1] == EOS and len(row) < NEW for row in reference) >= 2, reference
    assert all(len(set(row)) >= 3 for row in reference), "a row repeats one or two tokens"
    same_prompt = {tuple(lavis_greedy(model, image[i : i + 1], "a photo of", NEW)[0]) for i in range(BATCH)}
    assert len(same_prompt) >= 2, "the image must matter"


def test_exits_disagree_with_the_final_head(models, image, reference):
    """On the full-depth tokens, each exit's argmax differs from the final head's on >= 30% of
    them (so an exited token taken from the wrong logits shows), and its max_prob confidence
    spreads on both sides of THRESHOLD."""
    for layout in ("free", "vanilla"):
        model = models(layout)
        tokens = torch.full((BATCH, NEW), PAD)
        for i, row in enumerate(reference):
            tokens[i, : len(row)] = torch.tensor(row)
        forced, prefix = forced_on(model, image, tokens)
        cols = torch.arange(prefix - 1, prefix + NEW - 1)
        valid = torch.tensor([[t < len(row) for t in range(NEW)] for row in reference])
        final = forced.final_logits[:, cols].argmax(-1)
        assert torch.equal(final[valid], tokens[valid]), "teacher forcing must reproduce LAVIS's greedy tokens"
        for k, logits in enumerate(forced.exit_logits):
            disagree = (logits[:, cols].argmax(-1) != final)[valid].float().mean().item()
            assert disagree >= 0.3, (layout, k, disagree)
            confidence = torch.softmax(logits[:, cols], -1).amax(-1)[valid]
            assert 0.2 <= (confidence >= THRESHOLD).float().mean().item() <= 0.8, (layout, k)


# -- exits off ---------------------------------------------------------------------------------


def test_exits_off_equal_lavis_generate_token_for_token(model, image, reference, monkeypatch):
    """Batch 4 with 5, 4, 2 and 0 pads against LAVIS's Blip2OPT.generate run on each row alone
    (no padding in the reference); after EOS the engine writes padding."""
    captions, stats, result = decode(model, image, monkeypatch, early_exit=False)
    tokens = result.tokens.tolist()
    for row, want in zip(tokens, reference):
        assert row[: len(want)] == want
        assert row[len(want) :] == [PAD] * (NEW - len(want))
    assert stats["exit_layers"] == [[NUM_LAYERS] * len(want) for want in reference]
    assert captions == [model.opt_tokenizer.decode(row, skip_special_tokens=True).strip() for row in reference]


def test_exits_off_equal_lavis_generate_batched(model, image, monkeypatch):
    """LAVIS's own batched call (one prompt for the batch) against the plugin's on the same batch."""
    want = lavis_greedy(model, image, "a photo of", NEW)
    _, _, result = decode(model, image, monkeypatch, prompts=["a photo of"] * BATCH, early_exit=False)
    assert [trim_at_eos(row) for row in result.tokens.tolist()] == want
    assert len({tuple(row) for row in want}) >= 2


# -- exits on ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["free", "no_adversarial", "vanilla"])
def test_each_token_is_the_argmax_of_the_exit_it_left_at(models, image, layout, monkeypatch):
    """Decoded end to end (`model.generate`, recompute) at a threshold inside (0, 1): a token that
    left after layer e equals the argmax of that exit's logits in a teacher-forced pass over
    the same tokens, and a full-depth token the final head's argmax."""
    model = models(layout)
    _, stats, result = decode(model, image, monkeypatch, exit_threshold=THRESHOLD, kv_policy="recompute")
    tokens = result.tokens
    mix = exit_mix(result, tokens)
    assert all(mix[layer + 1] >= 5 for layer in EXIT_LAYERS) and mix[NUM_LAYERS] >= 5, mix  # each exit and full depth
    forced, prefix = forced_on(model, image, tokens)
    logits_after = {layer + 1: logits for layer, logits in zip(exits_of(model).config.layers, forced.exit_logits)}
    logits_after[NUM_LAYERS] = forced.final_logits
    for row, n in enumerate(lengths(tokens)):
        assert stats["exit_layers"][row] == result.layers_run[row][:n]
        for t in range(n):
            predicted = logits_after[result.layers_run[row][t]][row, prefix + t - 1].argmax().item()
            assert predicted == tokens[row, t].item(), (row, t, result.layers_run[row][t])


@pytest.mark.parametrize("layout", ["free", "vanilla"])
def test_recompute_caches_equal_a_full_depth_forward(models, image, layout):
    """After decoding with exits and `flush`, every backbone layer's and every exit transformer's
    keys/values equal LAVIS's full-depth forward over the same prefix, on every column the row
    used (rows of different padding and different generated lengths)."""
    model = models(layout)
    decoder, result, (mask, _, _) = engine_decode(model, image, exit_threshold=THRESHOLD, kv_policy="recompute")
    tokens = result.tokens
    assert len(exit_mix(result, tokens)) == len(EXIT_LAYERS) + 1
    assert len(set(lengths(tokens))) >= 2
    prefix = mask.shape[1]
    last = prefix + NEW - 2
    decoder.flush(last)
    forced, _ = forced_on(model, image, tokens)
    used = torch.zeros(BATCH, last + 1, dtype=torch.bool)
    used[:, :prefix] = mask.bool()
    for row, n in enumerate(lengths(tokens)):
        used[row, prefix : prefix + n - 1] = True  # columns of the tokens fed back in
    num_slots = NUM_LAYERS + (len(EXIT_LAYERS) if layout != "vanilla" else 0)  # vanilla exits have no cache
    assert decoder.cache.keys.shape[0] == len(forced.keys) == num_slots
    for slot in range(num_slots):
        for got, want in ((decoder.cache.keys, forced.keys), (decoder.cache.values, forced.values)):
            got, want = got[slot, :, :, : last + 1], want[slot][:, :, : last + 1]
            torch.testing.assert_close(got.transpose(1, 2)[used], want.transpose(1, 2)[used], atol=1e-5, rtol=1e-4)


def test_propagate_fills_every_skipped_slot_with_its_layer_projection(model, image):
    """For each exited token, every deeper backbone layer and every deeper exit transformer
    holds, at that column, its own k_proj/v_proj of its own pre-attention norm of the exited
    hidden state (the output of the exit's layer), as kv_cache.py defines `propagate`. (No
    teacher-forced reference exists: deep keys/values are approximate by design, so later
    states differ from a full-depth pass.)"""
    decoder, result, (mask, _, _) = engine_decode(model, image, exit_threshold=THRESHOLD, kv_policy="propagate")
    prefix = mask.shape[1]
    exits = dict(enumerate(exits_of(model).config.layers))
    slot_layers = list(model.opt_model.model.decoder.layers) + [module.layer for module in model.early_exits.exits]
    slot_depth = list(range(NUM_LAYERS)) + [exits[k] + 0.5 for k in exits]  # exit k sits between layers[k] and layers[k] + 1
    cache = decoder.cache
    heads, head_dim = cache.keys.shape[2], cache.keys.shape[4]
    checked = Counter()
    for row, n in enumerate(lengths(result.tokens)):
        for t in range(1, n):
            layers_run = result.layers_run[row][t]
            if layers_run == NUM_LAYERS:
                continue
            exit_layer, col = layers_run - 1, prefix + t - 1
            hidden = cache.states[row, col]
            skipped = [slot for slot, depth in enumerate(slot_depth) if depth > exit_layer + 0.5]
            assert skipped
            # the exit's own slot, written by its transformer from the state it really read, ties the
            # stored exited state (the reference of the projections) to the exit's actual input
            own = slot_depth.index(exit_layer + 0.5)
            for slot in skipped + [own]:
                layer = slot_layers[slot]
                x = layer.self_attn_layer_norm(hidden)
                for got, proj in ((cache.keys, layer.self_attn.k_proj), (cache.values, layer.self_attn.v_proj)):
                    torch.testing.assert_close(got[slot, row, :, col], proj(x).view(heads, head_dim), atol=1e-5, rtol=1e-4)
            checked[(row, exit_layer)] += 1
    assert {exit_layer for _, exit_layer in checked} == set(exits.values()), checked
    assert len({row for row, _ in checked}) >= 2, checked
    for row, n in enumerate(lengths(result.tokens)):
        assert np.all(cache.filled[row] >= prefix + n - 1), "propagate leaves no column pending"
