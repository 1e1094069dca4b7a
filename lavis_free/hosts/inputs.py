"""Checks of what users pass to a BLIP-2-family host: `samples`, images, texts, integers.

Why here: every host binding and `AttachedExits` read the same `samples` dict, and a wrong
entry otherwise fails deep in a ViT, a tokenizer or a position table; each check names the
entry, what it got and what is expected.
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Tuple

import torch
from torch import nn


def samples_entry(samples: Any, key: str) -> Any:
    """`samples[key]`, or an error saying what `samples` must be (LAVIS passes a dict batch)."""
    if not isinstance(samples, Mapping):
        raise TypeError(
            f"samples is a {type(samples).__name__}; expected a dict such as "
            "{'image': tensor [B, 3, H, W], 'prompt': str or [B strings]}"
        )
    if key not in samples:
        raise KeyError(f"samples has no {key!r} (its keys: {sorted(samples)})")
    return samples[key]


def text_batch(texts: Any, key: str, batch: int) -> List[str]:
    """`samples[key]` as one string per image: a single string serves the whole batch."""
    if isinstance(texts, str):
        return [texts] * batch
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"samples[{key!r}] is a {type(texts).__name__}; expected a string or a list of {batch} strings")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"samples[{key!r}][{index}] is a {type(text).__name__}; expected a string")
    if len(texts) != batch:
        raise ValueError(f"samples[{key!r}] has {len(texts)} entries for {batch} images; expected one per image")
    return list(texts)


def check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {low}")


def check_number(name: str, value: Any, low: float, high: float = float("inf"), low_open: bool = True) -> None:
    """A real number in (low, high] (or [low, high] with `low_open=False`)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name}={value!r} is invalid: expected a number in {bounds}")


def check_decoding(decoding: Mapping[str, Any]) -> None:
    """LAVIS's decoding settings and the Hugging Face extras, before any work (Hugging Face
    skips some silently, e.g. top_p above 1, and fails deep on others, e.g. a string n-gram size)."""
    for name, low in (("num_beams", 1), ("num_captions", 1), ("max_length", 1), ("min_length", 0)):
        check_int(name, decoding[name], low)
    check_number("top_p", decoding["top_p"], 0.0, 1.0)
    check_number("temperature", decoding["temperature"], 0.0)
    check_number("repetition_penalty", decoding["repetition_penalty"], 0.0)
    check_number("length_penalty", decoding["length_penalty"], -1e9, 1e9, low_open=False)
    for name in ("no_repeat_ngram_size", "top_k"):
        if name in decoding:
            check_int(name, decoding[name], 0)
    bad = decoding.get("bad_words_ids")
    if bad is not None and not (isinstance(bad, (list, tuple)) and bad and all(
            isinstance(ids, (list, tuple)) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
            for ids in bad)):
        raise ValueError(f"bad_words_ids={bad!r} is invalid: expected a list of token id lists, e.g. [[12], [7, 9]]")


def check_images(model: nn.Module, image: Any) -> torch.Tensor:
    """`samples["image"]` checked against what the vision encoder takes, cast to its dtype.

    Why: a wrong tensor otherwise fails deep in the ViT (an assert on the size, a dtype or
    device error in a convolution) and non-finite pixels decode into captions without a word.
    Raises TypeError/ValueError naming samples['image'], what it got and what is expected."""
    channels, height, width, weight = vision_input(model)
    expected = (
        f"expected a floating-point tensor [B, {channels}, {height}, {width}] with B >= 1 on "
        f"{weight.device} (the model's vis_processors give [{channels}, {height}, {width}] per image)"
    )
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"samples['image'] is a {type(image).__name__}; {expected}")
    got = f"samples['image'] has shape {tuple(image.shape)}, dtype {image.dtype}, device {image.device}"
    if image.dim() == 3 and image.shape[0] == channels:
        raise ValueError(f"{got}: one image without the batch dimension (use image.unsqueeze(0)); {expected}")
    if image.dim() != 4 or image.shape[0] == 0 or image.shape[1] != channels:
        hint = " (channels last? use image.permute(0, 3, 1, 2))" if image.dim() == 4 and image.shape[-1] == channels else ""
        raise ValueError(f"{got}{hint}; {expected}")
    if tuple(image.shape[2:]) != (height, width):
        raise ValueError(f"{got}: images must be {height}x{width} for this model (resize with its vis_processors); {expected}")
    if not image.is_floating_point():
        raise ValueError(f"{got}: integer pixels are not normalised (use the model's vis_processors); {expected}")
    if image.device != weight.device:
        raise ValueError(f"{got}, the model is on {weight.device}: move one to the other (image.to(...)); {expected}")
    if not torch.isfinite(image).all():
        raise ValueError(f"{got}: it holds NaN or infinite values; {expected} with finite values")
    return image.to(weight.dtype)

def vision_input(model: nn.Module) -> Tuple[int, int, int, torch.Tensor]:
    """(channels, height, width, first conv's weight) of the vision encoder's input: LAVIS's
    EVA ViTs patch-embed through `patch_embed`, its CLIP ViT through `conv1`."""
    encoder = model.visual_encoder
    if hasattr(encoder, "patch_embed"):
        (height, width), conv = encoder.patch_embed.img_size, encoder.patch_embed.proj
    else:
        height = width = encoder.input_resolution
        conv = encoder.conv1
    return conv.in_channels, height, width, conv.weight
