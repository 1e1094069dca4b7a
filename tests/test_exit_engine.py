"""The early-exit engine on a small random Hugging Face OPT (no LAVIS model needed): exits off
equals HF's own greedy `generate`, `min_exit_layer`, option and config errors. The oracles on a
model whose outputs vary (exit argmax, recompute and propagate caches, layouts) are in
test_engine_oracles.py."""
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from lavis_free.exits.adapters import adapter_for
from lavis_free.exits.config import ExitConfig, ExitConfigError
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.options import ExitOptions
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


@pytest.mark.parametrize("batch", [1, 3])
def test_disabled_exits_equal_full_depth_greedy(lm, exits, batch):
    ids, mask = prompts(batch)
    reference = lm.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=1, do_sample=False,
        eos_token_id=EOS, pad_token_id=PAD,
    )[:, ids.shape[1]:]
    adapter = adapter_for(lm)
    result = EarlyExitDecoder(adapter, exits).generate(
        LMBatch(adapter.embed_tokens(ids), mask), DecodeOptions(NEW, EOS, PAD, exits=ExitOptions(early_exit=False))
    )
    assert torch.equal(result.tokens[:, : reference.shape[1]], reference)
    assert all(n == 6 for row in result.layers_run for n in row)


def test_min_exit_layer_and_stats(lm, exits):
    adapter = adapter_for(lm)
    ids, mask = prompts(2)
    decoder = EarlyExitDecoder(adapter, exits)
    result = decoder.generate(LMBatch(adapter.embed_tokens(ids), mask), DecodeOptions(NEW, -1, PAD, exits=ExitOptions(exit_threshold=0.0, min_exit_layer=3)))
    # Exit 0 sits after layer 1 (2 layers run): below min_exit_layer, so tokens leave at exit 1 (4 layers).
    assert all(row[0] == 6 and set(row[1:]) == {4} for row in result.layers_run)
    assert all(set(row[1:]) == {1} for row in result.exit_blocks_run)
    assert len(result.layers_run[0]) == NEW


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exit_threshold": -0.1}, "exit_threshold"),
        ({"exit_threshold": 1.5}, "exit_threshold"),
        ({"early_exit": True}, "no exit_threshold"),
        ({"early_exit": "yes", "exit_threshold": 0.5}, "early_exit"),
        ({"exit_threshold": float("nan")}, "exit_threshold"),
        ({"kv_policy": "guess"}, "kv_policy"),
        ({"confidence": "vibes"}, "confidence"),
        ({"min_exit_layer": 7}, "min_exit_layer"),
    ],
)
def test_bad_decode_options_are_named(lm, kwargs, match):
    with pytest.raises(ExitConfigError, match=match):
        DecodeOptions(NEW, EOS, PAD, exits=ExitOptions(**kwargs)).validate(6)


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
