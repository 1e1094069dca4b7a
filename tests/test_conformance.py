"""The conformance suite: the engine's oracles, for every LM family and every host.

Families: OPT (decoder-only, tests/varied_lm.py), T5 (encoder-decoder, tests/varied_t5.py),
InstructBLIP FlanT5 (tests/varied_instruct_t5.py) and Vicuna (tests/varied_vicuna.py, the second stack),
each a tiny BLIP-2 whose weights are set so outputs vary per row, rows stop at EOS at different
lengths and exits disagree with the final head. Hosts: the plugin's model (`blip2_opt_free`,
`blip2_t5_free`) and LAVIS's own class (`Blip2OPT`, `Blip2T5`, built offline from the same parts
by `as_lavis_model`, with LAVIS's own LM class) with the same exits attached by `attach_exits`.
Every oracle runs at batch 4 with prompts of 1-6 tokens (left padding for OPT's decoder, right
padding of T5's encoder) and a threshold inside (0, 1); references are computed without the
engine: LAVIS's own `generate(num_beams=1)`, or a teacher-forced pass of LAVIS's LM forward and
each exit's own modules. Adding an LM family means adding its `varied_<family>.py` (same API)
to FAMILIES; adding a host, to HOSTS.
"""
from collections import Counter

import numpy as np
import pytest
import torch
import varied_instruct_t5
import varied_lm
import varied_t5

try:
    import varied_vicuna
except ImportError as missing:  # transformers without LLaMA: the default stack
    varied_vicuna, VICUNA_MISSING = None, str(missing)

from lavis_free.exits.engine import BeamSettings, DecodeOptions, EarlyExitDecoder
from lavis_free.exits.options import ExitOptions
from lavis_free.exits.processors import token_choice
from lavis_free.hosts import attach_exits, binding_for, exits_of
from lavis_free.models.lavis_parts import as_lavis_model

FAMILIES = {"opt": varied_lm, "t5": varied_t5, "instruct_t5": varied_instruct_t5, "vicuna": varied_vicuna}
HOSTS = ("plugin", "lavis")
NEW = 20  # max_length
THRESHOLD = 0.9  # max_prob; strictly inside (0, 1), sends tokens to every exit and to full depth
BATCH = 4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    if FAMILIES[request.param] is None:
        pytest.skip(VICUNA_MISSING)
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def models(family):
    cache = {}

    def get(layout="free"):
        if layout not in cache:
            cache[layout] = family.build_model(layout)
        return cache[layout]

    return get


def on_host(family, model, host):
    """The plugin model itself, or LAVIS's own class from its parts with its exits attached."""
    if host not in family.HOSTS:
        pytest.skip(f"no LAVIS class of this family in salesforce-lavis 1.0.2 (hosts: {family.HOSTS})")
    if host == "plugin":
        return model
    lavis = as_lavis_model(model)
    attach_exits(lavis, exits_of(model).config)
    lavis.early_exits.load_state_dict(model.early_exits.state_dict())
    return lavis


@pytest.fixture(scope="module")
def model(models):
    return models("free")


@pytest.fixture(scope="module")
def image(family):
    return family.images(BATCH)


@pytest.fixture(scope="module")
def reference(family, model, image):
    """LAVIS's greedy tokens per row, each row alone (its own prompt, no padding at all)."""
    return [family.lavis_greedy(model, image[i : i + 1], prompt, NEW)[0] for i, prompt in enumerate(family.PROMPTS)]


def decode(model, image, monkeypatch, prompts, **kwargs):
    """`model.generate` (the whole attached path) at batch 4, one prompt per row; returns the
    captions, the stats, the engine's DecodeResult and its LMBatch."""
    host = exits_of(model)
    real = type(host).decode
    calls = []

    def decode_spy(lm_batch, options):
        calls.append((real(host, lm_batch, options), lm_batch))
        return calls[-1][0]

    monkeypatch.setattr(host, "decode", decode_spy)
    captions, stats = model.generate(
        {"image": image, "prompt": list(prompts)}, return_exit_stats=True, **{"num_beams": 1, "max_length": NEW, **kwargs}
    )
    assert len(calls) == 1
    return captions, stats, calls[0][0]


def engine_decode(family, model, image, **options):
    """The engine alone on the host binding's prefix; returns (decoder, result, prefix width)."""
    lm_batch = binding_for(model).decode_batch(model, image, family.PROMPTS, NEW)
    decoder = EarlyExitDecoder(exits_of(model).adapter, model.early_exits)
    opts = DecodeOptions(NEW, family.EOS, family.PAD, min_length=1, exits=ExitOptions(**options))
    return decoder, decoder.generate(lm_batch, opts), lm_batch


def lengths(family, tokens):
    return [len(family.trim_at_eos(row)) for row in tokens.tolist()]


def exit_mix(family, result, tokens):
    """Counter of layers run over the tokens after the first (which is always full depth), up to EOS."""
    return Counter(n for row, m in zip(result.layers_run, lengths(family, tokens)) for n in row[1:m])


# -- the models are not degenerate -----------------------------------------------------------


def test_varied_outputs_differ_per_row_and_stop_at_different_lengths(family, model, image, reference):
    assert len({tuple(row) for row in reference}) == BATCH, reference
    assert len({len(row) for row in reference}) >= 3, reference
    assert sum(row[-1] == family.EOS and len(row) < NEW for row in reference) >= 2, reference
    assert all(len(set(row)) >= 3 for row in reference), "a row repeats one or two tokens"
    same_prompt = {tuple(family.lavis_greedy(model, image[i : i + 1], "a photo of", NEW)[0]) for i in range(BATCH)}
    assert len(same_prompt) >= 2, "the image must matter"


def test_exits_disagree_with_the_final_head(family, models, image, reference):
    """On the full-depth tokens, each exit's argmax differs from the final head's on >= 30% of
    them (so an exited token taken from the wrong logits shows), and its max_prob confidence
    spreads on both sides of THRESHOLD."""
    tokens = torch.full((BATCH, NEW), family.PAD)
    for i, row in enumerate(reference):
        tokens[i, : len(row)] = torch.tensor(row)
    valid = torch.tensor([[t < len(row) for t in range(NEW)] for row in reference])
    for layout in ("free", "vanilla"):
        forced, prefix = family.forced_on(models(layout), image, family.PROMPTS, tokens)
        cols = torch.arange(prefix - 1, prefix + NEW - 1)
        final = forced.final_logits[:, cols].argmax(-1)
        assert torch.equal(final[valid], tokens[valid]), "teacher forcing must reproduce LAVIS's greedy tokens"
        for k, logits in enumerate(forced.exit_logits):
            disagree = (logits[:, cols].argmax(-1) != final)[valid].float().mean().item()
            assert disagree >= 0.3, (layout, k, disagree)
            confidence = torch.softmax(logits[:, cols], -1).amax(-1)[valid]
            assert 0.2 <= (confidence >= THRESHOLD).float().mean().item() <= 0.8, (layout, k)


# -- exits off: the host's own LAVIS decoding, token for token --------------------------------


@pytest.mark.parametrize("host", HOSTS)
def test_exits_off_equal_lavis_generate_token_for_token(family, model, image, reference, host, monkeypatch):
    """Batch 4 with prompts of different lengths against LAVIS's own generate run on each row
    alone (no padding in the reference); after EOS the engine writes padding."""
    captions, stats, result = decode(on_host(family, model, host), image, monkeypatch, family.PROMPTS, early_exit=False, **family.GENERATE_KWARGS)
    for row, want in zip(result.tokens.tolist(), reference):
        assert row[: len(want)] == want
        assert row[len(want) :] == [family.PAD] * (len(row) - len(want))  # the host's max_length
    assert stats["exit_layers"] == [[family.NUM_LAYERS] * len(want) for want in reference]
    assert captions == [family.decode_text(model, row) for row in reference]


@pytest.mark.parametrize("host", HOSTS)
def test_exits_off_equal_lavis_generate_batched(family, model, image, host, monkeypatch):
    """LAVIS's own batched call (one prompt for the batch) against the attached path's."""
    want = family.lavis_greedy(model, image, "a photo of", NEW)
    _, _, result = decode(on_host(family, model, host), image, monkeypatch, ["a photo of"] * BATCH, early_exit=False, **family.GENERATE_KWARGS)
    assert [family.trim_at_eos(row) for row in result.tokens.tolist()] == want
    assert len({tuple(row) for row in want}) >= 2


# -- logits processors and sampling: exits off equals Hugging Face's generate -------------------

PROCESSED = {"repetition_penalty": 1.4, "no_repeat_ngram_size": 2}
SAMPLED = {"use_nucleus_sampling": True, "top_p": 0.9, "temperature": 1.2}


def host_reference(model, image, prompts, **settings):
    """The host's own full-depth path (`lavis_generate`: Hugging Face's generate with LAVIS's
    arguments), one row per prompt (or per sample), trimmed at EOS."""
    binding = binding_for(model)
    decoding = {**binding.generate_defaults, "num_beams": 1, "max_length": NEW, **settings}
    return binding.lavis_generate(model, image, list(prompts), **decoding).tolist()


@pytest.mark.parametrize("host", HOSTS)
def test_exits_off_with_processors_equal_the_host_generate(family, model, image, host, monkeypatch):
    """Repetition penalty and no-repeat n-gram (Hugging Face's processors, built as generate
    builds them) at batch 4 with prompts of different lengths: with exits off the engine's tokens
    are generate's, token for token; and the processors matter here (greedy differs)."""
    model = on_host(family, model, host)
    settings = {**family.GENERATE_KWARGS, **PROCESSED}
    _, _, result = decode(model, image, monkeypatch, family.PROMPTS, early_exit=False, **settings)
    want = [family.trim_at_eos(row) for row in host_reference(model, image, family.PROMPTS, **settings)]
    assert [family.trim_at_eos(row) for row in result.tokens.tolist()] == want
    plain = [family.trim_at_eos(row) for row in host_reference(model, image, family.PROMPTS, **family.GENERATE_KWARGS)]
    assert plain != want, "the reference must honour the processors too"
    _, _, greedy = decode(model, image, monkeypatch, family.PROMPTS, early_exit=False, **family.GENERATE_KWARGS)
    assert greedy.tokens.tolist() != result.tokens.tolist()


def test_processors_see_the_host_s_eos(family, model, image, monkeypatch):
    """Hugging Face drops a ban of the EOS id from `bad_words_ids` (generation must end); the
    processors the engine builds know the host's EOS (BLIP-2 OPT's "\\n", not the LM config's)."""
    settings = {**family.GENERATE_KWARGS, "bad_words_ids": [[family.EOS]], "repetition_penalty": 1.2}
    _, _, result = decode(model, image, monkeypatch, family.PROMPTS, early_exit=False, **settings)
    want = [family.trim_at_eos(row) for row in host_reference(model, image, family.PROMPTS, **settings)]
    assert [family.trim_at_eos(row) for row in result.tokens.tolist()] == want
    assert any(row[-1] == family.EOS for row in want)


@pytest.mark.parametrize("num_captions", [1, 2])
def test_exits_off_sampling_equals_the_host_sampling(family, model, image, monkeypatch, num_captions):
    """Nucleus sampling with temperature (and the model's default top-k), `num_captions` samples
    per image: with exits off and the same seed, the engine draws generate's tokens (every row
    sampled at every step, as generate does); other seeds draw other captions."""
    settings = {**family.GENERATE_KWARGS, **SAMPLED, "num_captions": num_captions}
    torch.manual_seed(7)
    _, stats, result = decode(model, image, monkeypatch, family.PROMPTS, early_exit=False, **settings)
    torch.manual_seed(7)
    want = [family.trim_at_eos(row) for row in host_reference(model, image, family.PROMPTS, **settings)]
    assert len(want) == BATCH * num_captions == len(stats["exit_layers"])
    assert [family.trim_at_eos(row) for row in result.tokens.tolist()] == want
    torch.manual_seed(8)
    _, _, other = decode(model, image, monkeypatch, family.PROMPTS, early_exit=False, **settings)
    assert other.tokens.tolist() != result.tokens.tolist()


def test_processed_tokens_leave_where_the_rule_says_on_processed_logits(family, model, image, monkeypatch):
    """With exits at a threshold inside (0, 1) and the processors on: each token is the argmax of
    the *processed* logits (the row's ids so far) of the exit it left at, the confidence on those
    processed logits passes the threshold there and at no exit before."""
    settings = {**family.GENERATE_KWARGS, **PROCESSED}
    _, stats, result = decode(model, image, monkeypatch, family.PROMPTS, exit_threshold=THRESHOLD,
                              kv_policy="recompute", **settings)
    tokens = result.tokens
    mix = exit_mix(family, result, tokens)
    assert len(mix) >= 2, mix
    lm_batch = binding_for(model).decode_batch(model, image, family.PROMPTS, NEW)
    choice = token_choice(exits_of(model).lm, PROCESSED, lm_batch.input_ids.shape[1], NEW, do_sample=False)
    forced, prefix = family.forced_on(model, image, family.PROMPTS, tokens)
    logits_after = {layer + 1: logits for layer, logits in zip(family.EXIT_LAYERS, forced.exit_logits)}
    logits_after[family.NUM_LAYERS] = forced.final_logits
    banned = list(binding_for(model).suppressed_ids(model))
    for row, n in enumerate(lengths(family, tokens)):
        for t in range(n):
            ids = torch.cat([lm_batch.input_ids[row], tokens[row, :t]])[None]

            def processed(layer):
                logits = logits_after[layer][row, prefix + t - 1][None].clone()
                logits[:, banned] = -float("inf")
                if lm_batch.prompt_length + t < 1:  # min_length=1, the host's default
                    logits[:, family.EOS] = -float("inf")
                return choice.process(ids, logits)[0]

            left_after = result.layers_run[row][t]
            assert processed(left_after).argmax().item() == tokens[row, t].item(), (row, t, left_after)
            if t:
                passed = [layer + 1 for layer in family.EXIT_LAYERS if layer + 1 < left_after]
                assert all(torch.softmax(processed(k), -1).max() < THRESHOLD for k in passed), (row, t)
                if left_after < family.NUM_LAYERS:
                    assert torch.softmax(processed(left_after), -1).max() >= THRESHOLD, (row, t)


BEAMS = {"plain": {"num_beams": 3}, "processed": {"num_beams": 3, "length_penalty": 0.0, "num_captions": 2, **PROCESSED}}


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("beams", sorted(BEAMS))
def test_exits_off_beam_search_equals_the_host_beam_search(family, model, image, host, monkeypatch, beams):
    """Beam search through the engine (Hugging Face's BeamSearchScorer, the engine's steps) with
    exits off: the host's own beam search, token for token, with LAVIS's length penalty, several
    returned beams and the processors."""
    model = on_host(family, model, host)
    settings = {**family.GENERATE_KWARGS, **BEAMS[beams]}
    _, stats, result = decode(model, image, monkeypatch, family.PROMPTS, early_exit=False, **settings)
    want = [family.trim_at_eos(row) for row in host_reference(model, image, family.PROMPTS, **settings)]
    assert [family.trim_at_eos(row) for row in result.tokens.tolist()] == want
    assert len(stats["exit_layers"]) == BATCH * 3  # one cost row per beam slot
    if beams == "plain":  # the search matters here: its best beams are not the greedy captions
        _, _, greedy = decode(model, image, monkeypatch, family.PROMPTS, early_exit=False, **family.GENERATE_KWARGS)
        assert [family.trim_at_eos(r) for r in greedy.tokens.tolist()] != want


@pytest.mark.parametrize("kv_policy", ["recompute", "propagate"])
def test_beam_search_with_exits_keeps_each_beam_s_cache(family, model, image, kv_policy):
    """Beam search with exits at a threshold inside (0, 1): beams leave at every exit, and after
    the search (and `flush`) every backbone layer's keys/values of every beam slot equal a
    full-depth forward over that slot's own tokens, so reordering the beams carried their
    caches, pending `recompute` columns included (`propagate` is exact for the layer after the
    exit only, so there only the first layers are compared)."""
    lm_batch = binding_for(model).decode_batch(model, image, family.PROMPTS, NEW)
    decoder = EarlyExitDecoder(exits_of(model).adapter, model.early_exits)
    opts = DecodeOptions(NEW, family.EOS, family.PAD, min_length=1, beams=BeamSettings(3),
                         exits=ExitOptions(exit_threshold=THRESHOLD, kv_policy=kv_policy),
                         suppressed_ids=binding_for(model).suppressed_ids(model))
    result = decoder.generate(lm_batch, opts)
    taken = Counter(n for row in result.layers_run for n in row[1:])
    assert len(taken) == len(family.EXIT_LAYERS) + 1, taken
    fed, prefix = result.extra["fed"], lm_batch.attention_mask.shape[1]
    assert fed.max() >= 3, fed  # (samples that finish early keep their slots: fed differs per sample)
    last = prefix + int(fed.max()) - 1
    decoder.flush(last)
    slots = decoder.tokens[:, : int(fed.max()) + 1]  # each slot's tokens, pad after those it fed
    forced, _ = family.forced_on(model, image.repeat_interleave(3, 0), [p for p in family.PROMPTS for _ in range(3)], slots)
    used = torch.zeros(len(slots), last + 1, dtype=torch.bool)
    used[:, :prefix] = lm_batch.attention_mask.repeat_interleave(3, 0).bool()
    for row, n in enumerate(fed.tolist()):
        used[row, prefix : prefix + n] = True
    compared = range(family.NUM_LAYERS) if kv_policy == "recompute" else range(family.EXIT_LAYERS[0] + 2)
    for slot in compared:
        for got, want in ((decoder.cache.keys, forced.keys), (decoder.cache.values, forced.values)):
            got, want = got[slot, :, :, : last + 1], want[slot][:, :, : last + 1]
            torch.testing.assert_close(got.transpose(1, 2)[used], want.transpose(1, 2)[used], atol=1e-5, rtol=1e-4)


# -- exits on ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("layout", ["free", "no_adversarial", "vanilla"])
def test_each_token_is_the_argmax_of_the_exit_it_left_at(family, models, image, layout, host, monkeypatch):
    """Decoded end to end (`generate`, recompute) at a threshold inside (0, 1): a token that left
    after layer e equals the argmax of that exit's logits in a teacher-forced pass over the same
    tokens, and a full-depth token the final head's argmax; and the decisions are the rule's on
    those logits: confidence >= THRESHOLD at the exit it left at, below it at every exit it
    passed (exited tokens are confident, so their argmax alone would hide exit logits that are
    slightly wrong, e.g. an exit layer without T5's position bias)."""
    model = models(layout)
    _, stats, result = decode(on_host(family, model, host), image, monkeypatch, family.PROMPTS,
                              exit_threshold=THRESHOLD, kv_policy="recompute", **family.GENERATE_KWARGS)
    tokens = result.tokens
    mix = exit_mix(family, result, tokens)
    assert all(mix[layer + 1] >= 5 for layer in family.EXIT_LAYERS) and mix[family.NUM_LAYERS] >= 5, mix
    forced, prefix = family.forced_on(model, image, family.PROMPTS, tokens)
    logits_after = {layer + 1: logits for layer, logits in zip(family.EXIT_LAYERS, forced.exit_logits)}
    logits_after[family.NUM_LAYERS] = forced.final_logits
    confidence_after = {layer: torch.softmax(logits, -1).amax(-1) for layer, logits in logits_after.items()}
    for row, n in enumerate(lengths(family, tokens)):
        assert stats["exit_layers"][row] == result.layers_run[row][:n]
        for t in range(n):
            left_after, col = result.layers_run[row][t], prefix + t - 1
            predicted = logits_after[left_after][row, col].argmax().item()
            assert predicted == tokens[row, t].item(), (row, t, left_after)
            if t == 0:
                continue  # the prefill's token is always full depth
            passed = [layer + 1 for layer in family.EXIT_LAYERS if layer + 1 < left_after]
            assert all(confidence_after[k][row, col] < THRESHOLD for k in passed), (row, t, left_after)
            if left_after < family.NUM_LAYERS:
                assert confidence_after[left_after][row, col] >= THRESHOLD, (row, t, left_after)


@pytest.mark.parametrize("layout", ["free", "vanilla"])
def test_recompute_caches_equal_a_full_depth_forward(family, models, image, layout):
    """After decoding with exits and `flush`, every backbone layer's and every exit transformer's
    keys/values equal LAVIS's full-depth forward over the same prefix, on every column the row
    used (rows of different padding and different generated lengths)."""
    model = models(layout)
    decoder, result, lm_batch = engine_decode(family, model, image, exit_threshold=THRESHOLD, kv_policy="recompute")
    tokens = result.tokens
    assert len(exit_mix(family, result, tokens)) == len(family.EXIT_LAYERS) + 1
    assert len(set(lengths(family, tokens))) >= 2
    mask = lm_batch.attention_mask
    prefix = mask.shape[1]
    last = prefix + NEW - 2
    decoder.flush(last)
    forced, _ = family.forced_on(model, image, family.PROMPTS, tokens)
    used = torch.zeros(BATCH, last + 1, dtype=torch.bool)
    used[:, :prefix] = mask.bool()
    for row, n in enumerate(lengths(family, tokens)):
        used[row, prefix : prefix + n - 1] = True  # columns of the tokens fed back in
    num_slots = family.NUM_LAYERS + (len(family.EXIT_LAYERS) if layout != "vanilla" else 0)  # vanilla exits have no cache
    assert decoder.cache.keys.shape[0] == len(forced.keys) == num_slots
    for slot in range(num_slots):
        for got, want in ((decoder.cache.keys, forced.keys), (decoder.cache.values, forced.values)):
            got, want = got[slot, :, :, : last + 1], want[slot][:, :, : last + 1]
            torch.testing.assert_close(got.transpose(1, 2)[used], want.transpose(1, 2)[used], atol=1e-5, rtol=1e-4)


def test_propagate_fills_every_skipped_slot_with_its_layer_projection(family, model, image, monkeypatch):
    """For each exited token, every deeper backbone layer and every deeper exit transformer
    holds, at that column, its own key/value projection of its own pre-attention norm of the
    exited hidden state (the output of the exit's layer), as kv_cache.py defines `propagate`.
    (No teacher-forced reference exists: deep keys/values are approximate by design.) The
    projections are filled before each slot's call: no decode-step call runs a window of
    several columns (which would run exited columns through the layer, as `recompute` does)."""
    widths = []
    mask_of = EarlyExitDecoder._mask
    monkeypatch.setattr(EarlyExitDecoder, "_mask", lambda self, win: widths.append(win.last - win.first + 1) or mask_of(self, win))
    decoder, result, lm_batch = engine_decode(family, model, image, exit_threshold=THRESHOLD, kv_policy="propagate")
    prefill_width = lm_batch.attention_mask.shape[1]
    assert widths and set(widths) <= {1, prefill_width}, sorted(set(widths))
    prefix = lm_batch.attention_mask.shape[1]
    lazy = decoder.cache.filled.copy()
    decoder.flush(prefix + NEW - 2)  # propagate projects lazily, when a slot next runs for the row
    exits = dict(enumerate(family.EXIT_LAYERS))
    slot_layers = family.slot_layers(model)
    slot_depth = list(range(family.NUM_LAYERS)) + [exits[k] + 0.5 for k in exits]  # exit k sits between layers[k] and layers[k] + 1
    cache = decoder.cache
    checked = Counter()
    for row, n in enumerate(lengths(family, result.tokens)):
        for t in range(1, n):
            layers_run = result.layers_run[row][t]
            if layers_run == family.NUM_LAYERS:
                continue
            exit_layer, col = layers_run - 1, prefix + t - 1
            hidden = cache.states[row, col]
            skipped = [slot for slot, depth in enumerate(slot_depth) if depth > exit_layer + 0.5]
            assert skipped
            # the exit's own slot, written by its transformer from the state it really read, ties the
            # stored exited state (the reference of the projections) to the exit's actual input
            own = slot_depth.index(exit_layer + 0.5)
            for slot in skipped + [own]:
                keys, values = family.self_kv(slot_layers[slot], hidden, cache.positions[row, col])
                torch.testing.assert_close(cache.keys[slot, row, :, col], keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(cache.values[slot, row, :, col], values, atol=1e-5, rtol=1e-4)
            checked[(row, exit_layer)] += 1
    assert {exit_layer for _, exit_layer in checked} == set(exits.values()), checked
    assert len({row for row, _ in checked}) >= 2, checked
    for row, n in enumerate(lengths(family, result.tokens)):
        assert np.all(cache.filled[row] >= prefix + n - 1), "flush fills every pending column"
    assert (lazy < cache.filled).any(), "generate left exited columns for the slots' next calls (or flush)"


# -- scoring answer options (teacher-forced, with exits) ---------------------------------------


def _scored(family, model, image, candidates, **options):
    """The engine scoring `candidates` [BATCH * 2, NEW] (two per prompt row) on the binding's prefix."""
    lm_batch = binding_for(model).decode_batch(model, image, family.PROMPTS, NEW)
    opts = DecodeOptions(NEW, family.EOS, family.PAD, exits=ExitOptions(**options), forced_tokens=candidates, copies=2,
                         suppressed_ids=binding_for(model).suppressed_ids(model))
    return EarlyExitDecoder(exits_of(model).adapter, model.early_exits).generate(lm_batch, opts)


@pytest.mark.parametrize("early_exit", [True, False])
def test_scores_read_each_token_at_the_exit_the_rule_takes(family, model, image, early_exit):
    """Two candidates per prompt, scored in one call (one prefill, repeated): the row's own
    greedy tokens and another row's (tokens the model would not pick). Each token's log-prob is
    the log-softmax, at that token, of the teacher-forced logits of the first exit whose
    confidence on them passes THRESHOLD (else the final head's; always the final head's with exits
    off or for the first token), the layers run say that exit, and nothing is counted after EOS."""
    _, greedy, _ = engine_decode(family, model, image, early_exit=False)
    own, other = greedy.tokens, greedy.tokens.roll(1, dims=0)
    candidates = torch.stack([own, other], dim=1).flatten(0, 1)  # row i's candidates: rows 2i, 2i+1
    result = _scored(family, model, image, candidates, exit_threshold=THRESHOLD, kv_policy="recompute", early_exit=early_exit)
    assert torch.equal(result.tokens, candidates)
    forced, prefix = family.forced_on(model, image.repeat_interleave(2, 0), [p for p in family.PROMPTS for _ in "ab"], candidates)
    banned = list(binding_for(model).suppressed_ids(model))
    logits_after = {layer + 1: logits for layer, logits in zip(family.EXIT_LAYERS, forced.exit_logits)}
    logits_after[family.NUM_LAYERS] = forced.final_logits
    for logits in logits_after.values():
        logits[..., banned] = -float("inf")
    taken = Counter()
    for row, n in enumerate(lengths(family, candidates)):
        assert (result.token_logprobs[row, n:] == 0).all()
        for t in range(n):
            col = prefix + t - 1
            exits = [layer + 1 for layer in family.EXIT_LAYERS] if early_exit and t else []
            layer = next((k for k in exits if torch.softmax(logits_after[k][row, col], -1).max() >= THRESHOLD), family.NUM_LAYERS)
            taken[layer] += 1
            want = torch.log_softmax(logits_after[layer][row, col].float(), -1)[candidates[row, t]]
            assert result.layers_run[row][t] == layer, (row, t)
            torch.testing.assert_close(result.token_logprobs[row, t], want, atol=2e-4, rtol=1e-4)
    assert len(taken) == (len(family.EXIT_LAYERS) + 1 if early_exit else 1), taken
