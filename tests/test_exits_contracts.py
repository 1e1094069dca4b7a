"""Contracts of the exits core that no oracle pins: whole error messages (they name the key, the
value and what is allowed), the discriminator's function, OPT's `project_in`, the exit layer's
dtype. Mutation testing found each of these unpinned."""
import pytest
import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from lavis_free.exits.adapters import adapter_for
from lavis_free.exits.attention import decode_mask
from lavis_free.exits.config import ExitConfig, ExitConfigError
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.confidence import get_confidence
from lavis_free.exits.discriminator import FeatureClassifier
from lavis_free.exits.engine import DecodeOptions, EarlyExitDecoder
from lavis_free.exits.early_exits import EarlyExits
from lavis_free.exits.feature_cache import sample_keys

LAYERS = 6  # exits may sit after layers 0..4 (layer 5 is the model's own output)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"layers": [5]}, "exits.layers=[5] is invalid: each exit layer must be in [0, 4] (0-based; the last layer 5 "
                          "is the model's own output)"),
        ({"layers": "2"}, "exits.layers='2' is invalid: expected a list of decoder layer indices (integers)"),
        ({"layers": [3, 1]}, "exits.layers=[3, 1] is invalid: exit layers must be sorted and unique"),
        ({"layers": [1], "init": "middle"}, "exits.init='middle' is invalid: allowed values are last, next, random"),
        ({"layers": [1], "disc_hidden": 0}, "exits.disc_hidden=0 is invalid: expected a positive integer"),
        ({"layers": [1], "disc_hidden": True}, "exits.disc_hidden=True is invalid: expected a positive integer"),
        ({"layers": [1], "disc_hidden": -3}, "exits.disc_hidden=-3 is invalid: expected a positive integer"),
        ({"layers": [1], "loss": {"token_weight": -1}}, "exits.loss.token_weight=-1 is invalid: expected a number in [0.0, inf]"),
        ({"layers": [1], "loss": {"kd_temperature": 0}}, "exits.loss.kd_temperature=0 is invalid: expected a number in [0.001, inf]"),
        ({"layers": [1], "loss": {"disc_steps": 0}}, "exits.loss.disc_steps=0 is invalid: expected an integer >= 1"),
        ({"layers": [1], "loss": {"adv_weights": 1}}, "exits.loss.adv_weights='?' is invalid: unknown key; known keys are "
                                                      "adv_weight, disc_steps, kd_temperature, mode, token_weight"),
        ({"layers": [1], "inference": {"kv_policy": "guess"}},
         "exits.inference.kv_policy='guess' is invalid: allowed values are recompute, propagate"),
        ({"layers": [1], "inference": {"confidence": "vibes"}},
         "exits.inference.confidence='vibes' is invalid: allowed values are max_prob, margin, entropy, learned"),
        ({"layers": [1], "inference": {"min_exit_layer": 7}},
         "exits.inference.min_exit_layer=7 is invalid: expected an integer in [0, 6] (decoder layers run before an exit)"),
        ({"layers": [1], "inference": {"exit_threshold": -1}},
         "exits.inference.exit_threshold=-1 is invalid: expected a confidence in [0, 1] (early_exit=False for full depth)"),
            ({"layers": [1], "inference": {"early_exit": True}},
             "exits.inference.early_exit=True is invalid: exits are on but no exit_threshold is set: pass exit_threshold= "
             "(a confidence in [0, 1]; python -m lavis_free.evaluation.calibrate chooses one) or early_exit=False"),
        ({"layer": [1]}, "exits.layer=[1] is invalid: unknown key; known keys are disc_hidden, inference, init, layers, layout, loss"),
    ],
)
def test_exit_config_errors_name_the_key_the_value_and_what_is_allowed(cfg, message):
    with pytest.raises(ExitConfigError) as err:
        ExitConfig.from_dict(cfg, num_layers=LAYERS)
    assert str(err.value) == message


def test_the_smallest_valid_settings_are_accepted():
    cfg = ExitConfig.from_dict({"layers": [0, 4], "disc_hidden": 1, "loss": {"disc_steps": 1, "adv_weight": 0}}, LAYERS)
    assert (cfg.layers, cfg.disc_hidden, cfg.loss.disc_steps) == ((0, 4), 1, 1)


def test_decode_option_errors_name_the_option_and_what_is_allowed():
    with pytest.raises(ExitConfigError) as err:
        get_confidence("vibes")
    assert str(err.value) == "confidence='vibes' is invalid here: allowed values are max_prob, margin, entropy"
    with pytest.raises(ValueError, match=r"^max_new_tokens=0 is invalid: expected an integer >= 1$"):
        DecodeOptions(max_new_tokens=0, eos_token_id=2, pad_token_id=1).validate(LAYERS)


def test_decode_mask_needs_key_validity_for_several_queries():
    assert decode_mask(None, 4, 4) is None
    with pytest.raises(ValueError, match="^key_valid is required for a window of several queries$"):
        decode_mask(None, 2, 4)


def test_sample_keys_need_one_text_per_image():
    with pytest.raises(ValueError, match=r"^batch has 2 images for 3 text_input entries$"):
        sample_keys({"image": torch.zeros(2, 3, 4, 4), "text_input": ["a", "b", "c"]})


def test_the_discriminator_is_linear_gelu_linear_gelu_linear():
    torch.manual_seed(0)
    disc = FeatureClassifier(feature_dim=5, hidden_dim=7)
    first, second, last = (m for m in disc.net if isinstance(m, nn.Linear))
    x = torch.randn(2, 3, 5)
    gelu = nn.functional.gelu
    expected = last(gelu(second(gelu(first(x))))).squeeze(-1)
    torch.testing.assert_close(disc(x), expected)
    assert disc(x).shape == (2, 3)


def _opt(std: float = 0.05, **config):
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=LAYERS, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                    tie_word_embeddings=False, **config)
    lm = OPTForCausalLM(cfg).eval()
    torch.manual_seed(10)  # again: building the model draws differently on transformers 4.26 and 4.33
    with torch.no_grad():  # weights at a scale where every norm and projection moves the argmax
        for name, param in lm.named_parameters():
            if "layer_norm" in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)
            elif param.dim() == 2:
                param.normal_(0.0, std)
    return lm


@pytest.mark.parametrize("config", [{"word_embed_proj_dim": 16, "std": 0.3}, {"do_layer_norm_before": False, "std": 0.05}],
                         ids=["project_in", "post_layer_norm"])
def test_opt_variants_decode_like_hf_with_exits_off(config):
    """OPT-350m's two differences from the other sizes: embeddings narrower than the decoder
    (`project_in` / `project_out`) and post-layer-norm blocks (`do_layer_norm_before=False`)."""
    lm = _opt(**config)
    adapter = adapter_for(lm)
    exits = EarlyExits(adapter, ExitConfig.from_dict({"layers": [1, 3]}, LAYERS))
    prompt = torch.tensor([[2, 11, 25, 7, 30]])
    embeds = lm.get_input_embeddings()(prompt)
    options = DecodeOptions(max_new_tokens=6, eos_token_id=2, pad_token_id=1).validate(LAYERS)
    result = EarlyExitDecoder(adapter, exits).generate(LMBatch(embeds, torch.ones_like(prompt)), options)
    expected = lm.generate(prompt, max_new_tokens=6, do_sample=False, num_beams=1, min_length=0,
                           eos_token_id=2, pad_token_id=1)[:, prompt.shape[1]:]
    assert len(set(expected[0].tolist())) >= 3, "the reference must not repeat one token"
    assert result.tokens[:, : expected.shape[1]].tolist() == expected.tolist()


@pytest.mark.parametrize("init", ["random", "last", "next"])
def test_exits_take_the_dtype_of_a_half_precision_lm(init):
    """LAVIS loads OPT in fp16 on GPU: a freshly built (`random`) exit layer must be cast too."""
    lm = _opt().half()
    exits = EarlyExits(adapter_for(lm), ExitConfig.from_dict({"layers": [1, 3], "init": init}, LAYERS))
    assert {p.dtype for p in exits.exits.parameters()} == {torch.float16}


def test_the_few_rows_head_path_gives_the_linear_layers_logits():
    """The head's `W @ x.T` path for 2-3 rows (adapters/base.py, a CPU BLAS speed-up) computes
    what the nn.Linear computes, with and without bias, and is taken only where it was measured."""
    from lavis_free.exits.adapters.base import _few_rows_linear, _is_few_rows_vocab_projection

    torch.manual_seed(0)
    for bias in (False, True):
        head = torch.nn.Linear(16, 9000, bias=bias)
        for shape in ((2, 16), (3, 16), (1, 3, 16)):
            x = torch.randn(*shape)
            with torch.no_grad():
                assert _is_few_rows_vocab_projection(head, x)
                torch.testing.assert_close(_few_rows_linear(head, x), head(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not _is_few_rows_vocab_projection(head, torch.randn(4, 16))
        assert not _is_few_rows_vocab_projection(head, torch.randn(1, 16))
        assert not _is_few_rows_vocab_projection(torch.nn.Linear(16, 512), torch.randn(2, 16))
    assert not _is_few_rows_vocab_projection(head, torch.randn(2, 16))  # training: autograd keeps the plain path
