"""Bad inputs to generate / predict_answers / forward and bad image files: each is a named error.

Every case here once ran silently (exits dropped for beam search, a misspelt keyword ignored, a
truncated image decoded grey-padded) or failed deep inside torch/PIL with a raw traceback.
"""
import os
import warnings

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import ImageFile

from lavis_free.datasets.map_datasets import ImageFileError
from lavis_free.datasets.shapes import generate_dataset
from lavis_free.hosts.inputs import check_images

from helpers import tiny_model

IMAGE = r"samples\['image'\]"


def tiny(**overrides):
    return tiny_model(**overrides).eval()


def exit_model():
    """Exits after layers 2, 5, 8 that are on by the config's default (threshold 0.0)."""
    return tiny(exits={"layers": [2, 5, 8], "inference": {"exit_threshold": 0.0}})


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


# ---- every LAVIS decoding setting runs through the exits ----

@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 3, "exit_threshold": 0.0},
        {"num_beams": 1, "use_nucleus_sampling": True, "kv_policy": "propagate", "exit_threshold": 0.0},
        {"num_beams": 1, "repetition_penalty": 1.3, "confidence": "margin", "exit_threshold": 0.0},
        {"num_beams": 2, "num_captions": 2, "min_exit_layer": 3, "exit_threshold": 0.0},
        {"num_beams": 1, "no_repeat_ngram_size": 2, "top_k": 5, "exit_threshold": 0.0},
    ],
)
def test_exit_options_apply_to_beams_sampling_and_processors(images, kwargs):
    """What used to fall back to full depth (beams, sampling, processors) now leaves at the exits."""
    _, stats = exit_model().generate({"image": images}, max_length=4, return_exit_stats=True, **kwargs)
    assert {n for row in stats["exit_layers"] for n in row[1:]} == {3}


def test_lavis_s_default_generate_uses_the_model_s_exits_without_a_warning(images):
    """LAVIS's own `generate(samples)` (beam search, num_beams=5) decodes with the calibrated exits."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stats = exit_model().generate({"image": images}, max_length=4, return_exit_stats=True)
    assert len(stats["exit_layers"]) == 5 * len(images)
    assert min(n for row in stats["exit_layers"] for n in row) == 3


def test_exits_asked_of_a_model_without_exits_are_refused(model, images):
    with pytest.raises(ValueError, match="exit_threshold=0.5 asks for early exits.*model.exits.layers is empty"):
        model.generate({"image": images}, num_beams=1, max_length=4, exit_threshold=0.5)


# ---- predict_answers keywords ----

def test_predict_answers_names_unknown_keywords_with_a_close_match(model, images):
    samples = {"image": images, "text_input": ["what?", "where?"]}
    with pytest.raises(TypeError, match="'exit_treshold' \\(did you mean 'exit_threshold'\\?\\)"):
        model.predict_answers(samples, num_beams=1, exit_treshold=0.5)
    with pytest.raises(TypeError, match="'max_length' \\(did you mean 'max_len'\\?\\)"):
        model.predict_answers(samples, num_beams=1, max_length=3)
    # what LAVIS's VQA tasks pass, plus generate's options
    answers = model.predict_answers(
        samples, answer_list=["red"], inference_method="generate", num_beams=1, max_len=3, min_len=1,
        num_ans_candidates=128, prompt="Q: {} A:", repetition_penalty=1.0, early_exit=False,
    )
    assert len(answers) == 2


# ---- samples["image"] tensors ----

@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda x: x[0], r"shape \(3, 64, 64\).*unsqueeze\(0\)"),
        (lambda x: x.permute(0, 2, 3, 1), r"shape \(2, 64, 64, 3\).*channels last"),
        (lambda x: x[:, :1], r"shape \(2, 1, 64, 64\).*expected a floating-point tensor \[B, 3, 64, 64\]"),
        (lambda x: x[:, :, :32, :32], r"\(2, 3, 32, 32\).*must be 64x64"),
        (lambda x: x[:0], r"shape \(0, 3, 64, 64\).*B >= 1"),
        (lambda x: (x * 50).clamp(0, 255).to(torch.uint8), r"dtype torch.uint8.*integer pixels"),
        (lambda x: x.masked_fill(x > 1, float("nan")), "NaN or infinite"),
        (lambda x: x.masked_fill(x > 1, float("inf")), "NaN or infinite"),
        (lambda x: x.to("meta"), "device meta, the model is on cpu"),
        (lambda x: list(x), "is a list; expected a floating-point tensor"),
    ],
)
def test_bad_image_tensors_are_named(model, images, bad, match):
    image = bad(images)
    with pytest.raises((TypeError, ValueError), match=f"{IMAGE}.*{match}"):
        model.generate({"image": image}, num_beams=1, max_length=4)
    with pytest.raises((TypeError, ValueError), match=f"{IMAGE}.*{match}"):
        model.predict_answers({"image": image, "text_input": "what?"}, num_beams=1, max_len=3)
    with pytest.raises((TypeError, ValueError), match=f"{IMAGE}.*{match}"):
        model({"image": image, "text_input": ["a", "b"]})


def test_a_clip_style_encoder_is_checked_by_its_own_input_size(images):
    """LAVIS's CLIP ViT (`vit_model: clip_L`) has `conv1` and `input_resolution`, no `patch_embed`."""
    clip_like = tiny()
    clip_like.visual_encoder = torch.nn.Module()
    clip_like.visual_encoder.conv1 = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
    clip_like.visual_encoder.input_resolution = 32
    assert check_images(clip_like, images[:, :, :32, :32]).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=rf"{IMAGE}.*\(2, 3, 64, 64\).*must be 32x32"):
        check_images(clip_like, images)


def test_training_text_is_one_string_per_image_or_one_for_all(model, images):
    assert torch.isfinite(model({"image": images, "text_input": "a caption"})["loss"])
    with pytest.raises(ValueError, match=r"samples\['text_input'\] has 3 entries for 2 images"):
        model({"image": images, "text_input": ["a", "b", "c"]})


def test_other_floating_dtypes_are_cast_to_the_encoder(model, images):
    expected = model.generate({"image": images}, num_beams=1, max_length=4)
    assert model.generate({"image": images.double()}, num_beams=1, max_length=4) == expected


# ---- samples["prompt"] / samples["text_input"] and lengths ----

@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x: m.generate(x, num_beams=1), TypeError, "samples is a Tensor; expected a dict"),
        (lambda m, x: m.generate({"images": x}, num_beams=1), KeyError, "samples has no 'image'.*'images'"),
        (lambda m, x: m.generate({"image": x, "prompt": 3}, num_beams=1), TypeError, r"samples\['prompt'\] is a int"),
        (lambda m, x: m.generate({"image": x, "prompt": ["a"]}, num_beams=1), ValueError,
         r"samples\['prompt'\] has 1 entries for 2 images"),
        (lambda m, x: m.generate({"image": x, "prompt": ["a", None]}, num_beams=1), TypeError,
         r"samples\['prompt'\]\[1\] is a NoneType"),
        (lambda m, x: m.predict_answers({"image": x, "text_input": ["q"]}, num_beams=1), ValueError,
         r"samples\['text_input'\] has 1 entries for 2 images"),
        (lambda m, x: m.predict_answers({"image": x}, num_beams=1), KeyError, "samples has no 'text_input'"),
        (lambda m, x: m.predict_answers({"image": x, "text_input": "q"}, prompt="Q: {} {}"), ValueError,
         "one '{}' where the question goes"),
        (lambda m, x: m.predict_answers({"image": x, "text_input": "q"}, prompt="Q: {} {x}"), ValueError,
         "cannot be filled.*doubled"),
        (lambda m, x: m.generate({"image": x}, num_beams=1, max_length=4, min_length=10), ValueError,
         "min_length=10 can never be reached: it counts at most 4 generated tokens"),
        (lambda m, x: m.predict_answers({"image": x, "text_input": "q"}, num_beams=1, max_len=3, min_len=30), ValueError,
         "min_length=30 can never be reached.*min_len"),
        (lambda m, x: m.generate({"image": x}, num_beams=1, max_length=500), ValueError,
         "max_length=500 is too long.*128 positions.*max_length <= 119"),
        (lambda m, x: m.generate({"image": x}, num_beams=1, max_length=0), ValueError, "max_length=0 is invalid"),
        (lambda m, x: m.generate({"image": x}, num_beams=0), ValueError, "num_beams=0 is invalid"),
        (lambda m, x: m.generate({"image": x}, num_beams=1, num_captions=2), ValueError,
         "num_captions=2 needs num_beams >= 2"),
    ],
)
def test_bad_texts_and_lengths_are_named(model, images, call, error, match):
    with pytest.raises(error, match=match):
        call(model, images)


# ---- image files ----

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_images")
    generate_dataset(str(out), seed=0, sizes={"train": 2, "val": 2, "test": 1}, progress=False)
    return str(out)


def _dataset(name, split, root):
    builder = registry.get_builder_class(name)
    cfg = OmegaConf.load(builder.default_config_path()).datasets[name]
    cfg.build_info.storage = root
    return builder(cfg).build_datasets()[split]


@pytest.mark.parametrize("name, split, row", [
    ("shapes_caption", "train", 1), ("shapes_caption", "val", 1), ("shapes_vqa", "train", 1),
    ("shapes_vqa", "val", 1), ("shapes_dialogue", "train", 0), ("shapes_dialogue", "val", 0),
])
@pytest.mark.parametrize("damage, error, reason", [
    (lambda data: data[: len(data) // 2], ImageFileError, r"truncated or corrupt \(image file is truncated\)"),
    (lambda data: b"not an image", ImageFileError, r"truncated or corrupt \(cannot identify image file .*\)"),
    (None, FileNotFoundError, "no such file"),
], ids=["truncated", "not_an_image", "missing"])
def test_bad_image_files_name_the_file_and_the_annotation(data_dir, name, split, row, damage, error, reason):
    dataset = _dataset(name, split, data_dir)
    path = os.path.join(dataset.vis_root, dataset.annotation[1]["image"])
    with open(path, "rb") as f:
        data = f.read()
    try:
        if damage is None:
            os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(damage(data))
        with pytest.raises(error, match=f"{path}: {reason}; it is the image of row {row} of .*{split}.json"):
            dataset[1]
    finally:
        with open(path, "wb") as f:
            f.write(data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "LAVIS's process-wide setting is left as it was"
    assert dataset[1]["image"].shape == (3, 64, 64)


@pytest.mark.parametrize("setting, match", [
    ({"use_nucleus_sampling": True, "top_p": 1.5}, r"top_p=1.5 is invalid: expected a number in \(0, 1\]"),
    ({"use_nucleus_sampling": True, "temperature": 0}, r"temperature=0 is invalid"),
    ({"repetition_penalty": float("nan")}, r"repetition_penalty=nan is invalid"),
    ({"no_repeat_ngram_size": "2"}, r"no_repeat_ngram_size='2' is invalid: expected an integer >= 0"),
    ({"top_k": -1}, r"top_k=-1 is invalid"),
    ({"bad_words_ids": [1, 2]}, r"bad_words_ids=\[1, 2\] is invalid: expected a list of token id lists"),
    ({"num_beams": 2, "num_captions": 3}, r"num_captions=3 needs num_beams >= 3"),
])
def test_decoding_settings_are_checked_before_any_work(images, setting, match):
    """Hugging Face skips some of these silently (top_p above 1) and fails deep on others."""
    with pytest.raises(ValueError, match=match):
        exit_model().generate({"image": images}, **{"num_beams": 1, "max_length": 4, **setting})
