"""The LAVIS model `blip2_t5_free`: offline types, LAVIS's settings for the real types, training
and inference API. LAVIS's own `Blip2T5.forward` / `generate` serve as oracles."""
import pytest
import torch
from lavis.models import load_model
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from omegaconf import OmegaConf

import lavis_free
from lavis_free.models import weights
from lavis_free.models.blip2_t5_free import Blip2T5Free
from lavis_free.models.weights import WeightsUnavailableError

ARCH_KEYS = ("vit_model", "image_size", "vision", "vit_precision", "num_query_token", "cross_attention_freq",
             "qformer", "t5_config", "prompt", "max_txt_len")


def tiny_config(**overrides):
    return OmegaConf.merge(OmegaConf.load(Blip2T5Free.default_config_path("tiny")).model, overrides)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Blip2T5Free.from_config(tiny_config()).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_tiny_loads_offline_through_lavis_with_lavis_s_attributes():
    model = load_model("blip2_t5_free", "tiny", is_eval=True)
    assert isinstance(model, Blip2T5Free) and isinstance(model, Blip2T5) and not model.training
    for name in ("visual_encoder", "ln_vision", "Qformer", "query_tokens", "t5_model", "t5_proj", "t5_tokenizer"):
        assert hasattr(model, name), name
    assert len(model.t5_model.decoder.block) == 12 and len(model.t5_model.encoder.block) == 4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    config = model.t5_model.config
    assert not config.tie_word_embeddings and config.is_gated_act and config.dense_act_fn == "gelu"  # as Blip2T5 sets it


def test_tiny_and_shapes_tiny_t5_share_the_architecture():
    tiny = OmegaConf.load(Blip2T5Free.default_config_path("tiny"))
    shapes = OmegaConf.load(Blip2T5Free.default_config_path("shapes_tiny_t5"))
    for key in ARCH_KEYS:
        assert tiny.model[key] == shapes.model[key], key
    assert tiny.preprocess == shapes.preprocess


def test_shapes_tiny_t5_exits_match_the_project_that_trains_them():
    shipped = OmegaConf.load(Blip2T5Free.default_config_path("shapes_tiny_t5")).model.exits
    project = OmegaConf.load("projects/free/shapes_caption_t5.yaml").model.exits
    for key in ("layers", "init", "layout", "disc_hidden"):
        assert shipped[key] == project[key], key


@pytest.mark.parametrize("model_type", ["pretrain_flant5xl", "pretrain_flant5xxl", "caption_coco_flant5xl"])
def test_real_types_keep_lavis_download_path_and_settings(model_type):
    ours = OmegaConf.load(Blip2T5Free.default_config_path(model_type)).model
    theirs = OmegaConf.load(Blip2T5.default_config_path(model_type)).model
    for key in ("load_finetuned", "pretrained", "finetuned", "t5_model", "image_size", "vit_precision", "freeze_vit",
                "prompt", "num_query_token"):
        assert ours[key] == theirs[key], key
    assert "t5_config" not in ours and "vision" not in ours


def test_real_t5_offline_fails_fast_naming_the_files_and_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(weights.transformers_hub, "TRANSFORMERS_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError) as err:
        Blip2T5Free.init_t5("google/flan-t5-xl")
    for part in ("google/flan-t5-xl", "tokenizer.json", "pytorch_model.bin", "--options model.t5_model=DIR"):
        assert part in str(err.value)
    with pytest.raises(ValueError, match=r"model.t5_model='/no/such/t5' is neither a local directory nor a Hugging Face repo id"):
        Blip2T5Free.init_t5("/no/such/t5")


def test_bad_t5_config_names_the_key():
    with pytest.raises(ValueError, match=r"model\.t5_config: unknown key\(s\) \['n_layers'\]"):
        Blip2T5Free.from_config(tiny_config(t5_config={"n_layers": 3}))


def test_forward_matches_lavis_blip2t5_and_trains_only_what_is_trainable(images):
    torch.manual_seed(0)
    model = Blip2T5Free.from_config(tiny_config(freeze_vit=False, freeze_lm=False)).eval()  # eval: no dropout draws
    samples = {"image": images, "text_input": ["a photo of", "what colour?", "a"],
               "text_output": ["a red circle", "blue", "two green squares and a star"]}
    ours = model(samples)["loss"]
    theirs = Blip2T5.forward(model, samples)["loss"]
    torch.testing.assert_close(ours, theirs)
    captions = {"image": images, "text_input": ["a red circle", "blue", "two green squares and a star"]}
    torch.testing.assert_close(model(captions)["loss"], Blip2T5.forward(model, {**captions, "text_input": [""] * 3,
                                                                                  "text_output": captions["text_input"]})["loss"])
    ours.backward()
    assert model.t5_model.lm_head.weight.grad is not None and model.t5_proj.weight.grad is not None
    frozen = Blip2T5Free.from_config(tiny_config())
    assert not any(p.requires_grad for p in frozen.t5_model.parameters())


def test_generate_and_predict_answers_match_lavis(tiny_model, images):
    prompts = ["a photo of", "what", "two red circles on the"]
    ours = tiny_model.generate({"image": images, "prompt": prompts}, num_beams=1, max_length=8)
    assert ours == Blip2T5.generate(tiny_model, {"image": images, "prompt": prompts}, num_beams=1, max_length=8)
    assert len(set(ours)) >= 2
    beams = tiny_model.generate({"image": images}, num_beams=3, max_length=8, early_exit=False)
    assert beams == Blip2T5.generate(tiny_model, {"image": images}, num_beams=3, max_length=8)
    questions = {"image": images, "text_input": ["what colour?", "how many?", "where"]}
    answers = tiny_model.predict_answers(questions, num_beams=1, max_len=5, prompt="Question: {} Short answer:")
    theirs = Blip2T5.predict_answers(tiny_model, dict(questions), num_beams=1, max_len=5, prompt="Question: {} Short answer:")
    assert answers == theirs


def test_min_length_counts_generated_tokens_like_max_length(tiny_model, images):
    """min_length=6 gives at least 6 generated tokens before EOS, in the engine and the
    full-depth path alike, as max_length counts generated tokens; LAVIS 1.0.2's Blip2T5.generate
    passes min_length to Hugging Face, which also counts the decoder start token there, so its
    min_length=7 gives the same captions (README "Lengths")."""
    ours, stats = tiny_model.generate({"image": images}, num_beams=1, max_length=8, min_length=6, return_exit_stats=True)
    assert ours == Blip2T5.generate(tiny_model, {"image": images}, num_beams=1, max_length=8, min_length=7)
    assert min(len(row) for row in stats["exit_layers"]) >= 7  # 6 tokens, then EOS or the 8th
    beams = tiny_model.generate({"image": images}, num_beams=2, max_length=8, min_length=6, early_exit=False)
    assert beams == Blip2T5.generate(tiny_model, {"image": images}, num_beams=2, max_length=8, min_length=7)


def test_load_model_default_type_and_zoo():
    from lavis.models import model_zoo

    assert "blip2_t5_free" in str(model_zoo)
    assert Blip2T5Free.default_model_type() == "shapes_tiny_t5"  # its weights ship in the package
    assert isinstance(lavis_free.load_model("blip2_t5_free"), Blip2T5Free)


def test_predict_answers_lemmatizes_as_lavis_s_t5_when_configured(tiny_model, images, monkeypatch):
    """`apply_lemmatizer: True` (LAVIS's OK-VQA configs): answers go through the host's own
    `_lemmatize`, with exits as without."""
    questions = {"image": images, "text_input": ["what?", "how many?", "where"]}
    plain = tiny_model.predict_answers(questions, num_beams=1, max_len=4)
    monkeypatch.setattr(tiny_model, "_apply_lemmatizer", True)
    monkeypatch.setattr(tiny_model, "_lemmatize", lambda answers: [a.upper() + "!" for a in answers], raising=False)
    assert tiny_model.predict_answers(questions, num_beams=1, max_len=4) == [a.upper() + "!" for a in plain]
    lemmatized, stats = tiny_model.predict_answers(questions, num_beams=1, max_len=4, return_exit_stats=True)
    assert lemmatized == [a.upper() + "!" for a in plain] and len(stats["exit_layers"]) == 3
