"""Correctness oracles of the early-exit engine on a small random OPT (no LAVIS model needed)."""
import numpy as np
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from lavis_free.exits.adapters import adapter_for
from lavis_free.exits.config import ExitConfig, ExitConfigError
from lavis_free.exits.early_exits import EarlyExits
from lavis_free.exits.engine import DecodeOptions, EarlyExitDecoder

EOS, PAD, NEW = 5, 1, 10


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=6, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, eos_token_id=EOS, pad_token_id=PAD,
    )
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky distributions so that greedy outputs vary and exits are confident
        model.lm_head.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def exits(lm):
    torch.manual_seed(1)
    return EarlyExits(adapter_for(lm), ExitConfig.from_dict({"layers": [1, 3], "init": "random"}, 6)).eval()


def prompts(batch, pad_first_row=True):
    torch.manual_seed(2)
    ids = torch.randint(6, 64, (batch, 5))
    mask = torch.ones(batch, 5, dtype=torch.long)
    if batch > 1 and pad_first_row:
        ids[0, :2], mask[0, :2] = PAD, 0
    return ids, mask


class RandomDecisions(EarlyExitDecoder):
    """Exits on a seeded random pattern: exercises the KV-fill paths whatever the confidences."""

    def __init__(self, *args, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(seed)

    def _decide_exits(self, logits, opts, exit_index, rows, step):
        return self.rng.random(logits.shape[0]) < 0.5


@pytest.mark.parametrize("batch", [1, 3])
def test_disabled_exits_equal_full_depth_greedy(lm, exits, batch):
    ids, mask = prompts(batch)
    reference = lm.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=1, do_sample=False,
        eos_token_id=EOS, pad_token_id=PAD,
    )[:, ids.shape[1]:]
    adapter = adapter_for(lm)
    result = EarlyExitDecoder(adapter, exits).generate(
        adapter.embed_tokens(ids), mask, DecodeOptions(NEW, EOS, PAD, exit_threshold=1.5)
    )
    assert torch.equal(result.tokens[:, : reference.shape[1]], reference)
    assert all(n == 6 for row in result.layers_run for n in row)


def _full_prefill(adapter, exits, ids, mask):
    decoder = EarlyExitDecoder(adapter, exits)
    decoder.prefill(adapter.embed_tokens(ids), mask, 1, use_exits=True)
    return decoder.cache


@pytest.mark.parametrize("batch", [1, 3])
def test_recompute_fills_caches_exactly(lm, exits, batch):
    adapter = adapter_for(lm)
    ids, mask = prompts(batch)
    decoder = RandomDecisions(adapter, exits, seed=batch)
    opts = DecodeOptions(NEW, eos_token_id=-1, pad_token_id=PAD, exit_threshold=0.5, kv_policy="recompute")
    result = decoder.generate(adapter.embed_tokens(ids), mask, opts)
    exited = [n for row in result.layers_run for n in row if n < 6]
    assert exited and len(exited) < batch * NEW, "the pattern must mix exits and full-depth tokens"
    last = ids.shape[1] + NEW - 2
    decoder.flush(last)
    full_ids = torch.cat([ids, result.tokens[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones(batch, NEW - 1, dtype=torch.long)], 1)
    reference = _full_prefill(adapter, exits, full_ids, full_mask)
    valid = full_mask.bool()[:, None, :, None]
    for slot in range(reference.keys.shape[0]):
        for got, want in ((decoder.cache.keys, reference.keys), (decoder.cache.values, reference.values)):
            torch.testing.assert_close(
                (got[slot, :, :, : last + 1] * valid), (want[slot, :, :, : last + 1] * valid), atol=1e-5, rtol=1e-4
            )


def test_exited_tokens_are_the_argmax_of_their_exit(lm, exits):
    """With exact caches, a token that left at exit k equals the argmax of exit k's logits in a
    teacher-forced pass over the same sequence."""
    adapter = adapter_for(lm)
    ids, mask = prompts(2)
    decoder = RandomDecisions(adapter, exits, seed=7)
    result = decoder.generate(adapter.embed_tokens(ids), mask, DecodeOptions(NEW, -1, PAD, exit_threshold=0.5))
    full_ids = torch.cat([ids, result.tokens[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones(2, NEW - 1, dtype=torch.long)], 1)
    backbone = exits.backbone_outputs(adapter, adapter.embed_tokens(full_ids), full_mask, torch.zeros_like(full_ids))
    with torch.no_grad():
        outputs = exits.exit_outputs(adapter, backbone)
    layer_to_exit = {layer + 1: k for k, layer in enumerate(exits.config.layers)}
    checked = 0
    for row in range(2):
        for t, depth in enumerate(result.layers_run[row]):
            if depth in layer_to_exit:
                position = ids.shape[1] + t - 1
                predicted = outputs.logits[layer_to_exit[depth]][row, position].argmax()
                assert predicted == result.tokens[row, t]
                checked += 1
    assert checked > 0


def test_propagate_writes_next_layer_kv_exactly(lm, exits):
    """Propagation projects the exited state; for the first skipped layer that is exact."""
    adapter = adapter_for(lm)
    ids, mask = prompts(1)
    decoder = RandomDecisions(adapter, exits, seed=3)
    result = decoder.generate(adapter.embed_tokens(ids), mask, DecodeOptions(NEW, -1, PAD, exit_threshold=0.5, kv_policy="propagate"))
    assert np.all(decoder.cache.filled[:, :6] == ids.shape[1] + NEW - 1)
    assert torch.isfinite(decoder.cache.keys).all()
    first_exit_cols = [ids.shape[1] + t - 1 for t, d in enumerate(result.layers_run[0]) if d == 2]
    assert first_exit_cols
    hidden = decoder.cache.states[:, first_exit_cols]
    positions = decoder.cache.positions[:, first_exit_cols]
    keys, _ = adapter.kv_projection(adapter.layers[2], hidden, positions)
    torch.testing.assert_close(decoder.cache.keys[2][:, :, first_exit_cols], keys)


def test_min_exit_layer_and_stats(lm, exits):
    adapter = adapter_for(lm)
    ids, mask = prompts(2)
    decoder = EarlyExitDecoder(adapter, exits)
    result = decoder.generate(adapter.embed_tokens(ids), mask, DecodeOptions(NEW, -1, PAD, exit_threshold=0.0, min_exit_layer=3))
    # Exit 0 sits after layer 1 (2 layers run): below min_exit_layer, so tokens leave at exit 1 (4 layers).
    assert all(row[0] == 6 and set(row[1:]) == {4} for row in result.layers_run)
    assert all(set(row[1:]) == {1} for row in result.exit_blocks_run)
    assert len(result.layers_run[0]) == NEW


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exit_threshold": -0.1}, "exit_threshold"),
        ({"exit_threshold": float("nan")}, "exit_threshold"),
        ({"kv_policy": "guess"}, "kv_policy"),
        ({"confidence": "vibes"}, "confidence"),
        ({"min_exit_layer": 7}, "min_exit_layer"),
    ],
)
def test_bad_decode_options_are_named(lm, kwargs, match):
    with pytest.raises(ExitConfigError, match=match):
        DecodeOptions(NEW, EOS, PAD, **kwargs).validate(6)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"layers": [5]}, "exits.layers"),
        ({"layers": [3, 1]}, "sorted"),
        ({"layers": [1, 1]}, "sorted"),
        ({"layers": [-1]}, "exits.layers"),
        ({"layers": [1], "init": "middle"}, "exits.init"),
        ({"layers": [1], "layout": "gan"}, "exits.layout"),
        ({"layers": [1], "loss": {"mode": "rl"}}, "exits.loss.mode"),
        ({"layers": [1], "loss": {"adv_weights": 1}}, "exits.loss.adv_weights"),
        ({"layers": [1], "inference": {"exit_threshold": -1}}, "exit_threshold"),
        ({"layer": [1]}, "exits.layer"),
    ],
)
def test_bad_exit_config_is_named(cfg, match):
    with pytest.raises(ExitConfigError, match=match):
        ExitConfig.from_dict(cfg, num_layers=6)
