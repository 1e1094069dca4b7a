"""Fail within seconds, naming what is missing, when a real BLIP-2 type's weights cannot be had.

Why: LAVIS 1.0.2 fetches the real types' components inside its constructors: bert-base-uncased
(the Q-Former's tokenizer, config and weights), the EVA ViT-g (or CLIP-L) weights from a LAVIS
URL, facebook/opt-* (the LM and its tokenizer) and the BLIP-2 checkpoint URL. With the hub
switched off that ends in one error about bert-base-uncased; with the hub unreachable and no
switch it ends after about 99 s of retries. The model's component hooks call :func:`require`
before each load: it looks where the loaders look (transformers' hub cache, torch hub's
checkpoint directory, local paths) and, when something is missing while the hub is off or does
not answer, raises :class:`WeightsUnavailableError` naming the files and how to provide them.
When everything is there, or the hub answers, the loaders (not this module) fetch as before.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import requests
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import constants, get_session, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from lavis.common.utils import is_url
from transformers.utils import (
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    is_safetensors_available,
)

PROBE_TIMEOUT_S = 5.0
README_SECTION = 'README.md, section "Real models offline"'

# What transformers' from_pretrained reads as the weights: any one of these (safetensors only
# when the package is installed, as in transformers 4.26).
MODEL_WEIGHT_FILES = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) + (
    (SAFE_WEIGHTS_NAME,) if is_safetensors_available() else ()
)
# The vision weights LAVIS's create_eva_vit_g / create_clip_vit_L download (hard-coded there).
VIT_URLS = {
    "eva_clip_g": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth",
    "clip_L": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/clip_vit_L.pth",
}


class WeightsUnavailableError(OSError):
    """A real model type needs files that are not on this machine and cannot be downloaded now."""


@dataclass(frozen=True)
class Needed:
    """One component's files: a hub repo id (or local directory) with the files its loader reads
    (each entry a tuple of alternatives), or a URL that LAVIS caches in torch hub's directory.
    `how` says how else to provide it (a YAML key), beyond the caches."""

    what: str
    source: str
    files: Tuple[Tuple[str, ...], ...] = ()
    how: str = ""

    def gap(self) -> Optional[str]:
        """What is missing, in words, or None when the loader will find everything locally."""
        if is_url(self.source):
            path = url_cache_path(self.source)
            if os.path.isfile(path):
                return None
            return (
                f"{self.source} is not in torch hub's checkpoint directory ({path}); "
                f"download it there{self.how}"
            )
        if os.path.isdir(self.source):
            return None  # a local directory: transformers reads it and names a missing file
        cache = transformers_hub.TRANSFORMERS_CACHE
        absent = [
            alternatives
            for alternatives in self.files
            if not any(
                isinstance(try_to_load_from_cache(self.source, name, cache_dir=cache), str)
                for name in alternatives
            )
        ]
        if not absent:
            return None
        wanted = " ".join(alternatives[0] for alternatives in self.files)
        return (
            f"{self.source}: {', '.join(' or '.join(a) for a in absent)} not in the Hugging Face "
            f"cache ({cache}); fill it where there is network with `huggingface-cli download "
            f"{self.source} {wanted}` and copy that cache there (or point HF_HOME at a copy)"
            f"{self.how}"
        )


def url_cache_path(url: str) -> str:
    """Where LAVIS's `download_cached_file` keeps `url`: torch hub's `checkpoints/<basename>`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))


@functools.lru_cache(maxsize=None)
def hub_reachable() -> bool:
    """Whether the Hugging Face endpoint answers at all (any HTTP status), asked once per process
    with a short timeout through huggingface_hub's session (its proxies and headers)."""
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except (requests.ConnectionError, requests.Timeout):
        return False
    return True


def require(needed: Needed) -> None:
    """Return when `needed` is local or can be downloaded now; else raise
    :class:`WeightsUnavailableError` naming the missing files and how to provide them.

    Offline (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`) covers LAVIS's URLs too: LAVIS itself
    would download them regardless of the switch.
    """
    gap = needed.gap()
    if gap is None:
        return
    if constants.HF_HUB_OFFLINE:
        reason = "the hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set)"
    elif not is_url(needed.source) and not hub_reachable():
        reason = f"the Hugging Face hub ({constants.ENDPOINT}) does not answer"
    else:
        return
    raise WeightsUnavailableError(
        f"{needed.what}: not on this machine, and {reason}: {gap}. "
        f"Everything the real model types need, and how to provide it: {README_SECTION}."
    )


def hub_model(what: str, repo: str, tokenizer_files: Tuple[str, ...], how: str = "") -> Needed:
    """A hub model's config + weights (+ tokenizer files when it brings its tokenizer)."""
    return Needed(what, repo, tuple((name,) for name in ("config.json",) + tokenizer_files)
                  + (MODEL_WEIGHT_FILES,), how)


# The Q-Former's pieces, hard-coded as bert-base-uncased in LAVIS's Blip2Base.
BERT_TOKENIZER = Needed(
    "bert-base-uncased (the Q-Former's tokenizer)",
    "bert-base-uncased",
    (("vocab.txt",), ("tokenizer_config.json",)),
)
BERT_QFORMER = hub_model("bert-base-uncased (the Q-Former's config and weights)", "bert-base-uncased", ())


def vision_weights(vit_model: str) -> Needed:
    """The pretrained weights LAVIS loads for `model.vit_model`."""
    return Needed(f"the {vit_model} vision weights", VIT_URLS[vit_model])


def hub_lm(key: str, name: str, what: str, tokenizer_files: Tuple[str, ...]) -> Needed:
    """An LM and its tokenizer named by `model.<key>` (a hub id or a local directory); a value
    that is neither (a mistyped path) is a config error, whatever the network."""
    if not os.path.isdir(name):
        try:
            validate_repo_id(name)
        except HFValidationError as err:
            raise ValueError(
                f"model.{key}={name!r} is neither a local directory nor a Hugging Face repo id ({err})"
            ) from None
    return hub_model(
        f"{what} ({name})",
        name,
        tokenizer_files,
        how=f", or set model.{key} to a local directory holding them (model YAML or --options model.{key}=DIR)",
    )


def opt_lm(opt_model: str) -> Needed:
    """The OPT LM and its tokenizer (`model.opt_model`)."""
    return hub_lm("opt_model", opt_model, "the OPT LM and its tokenizer",
                  ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"))


def t5_lm(t5_model: str) -> Needed:
    """The FlanT5 LM and its tokenizer (`model.t5_model`; T5TokenizerFast reads tokenizer.json).
    Sharded weights are checked by their index file, not shard by shard."""
    return hub_lm("t5_model", t5_model, "the FlanT5 LM and its tokenizer",
                  ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))


def checkpoint(url: str, origin: str) -> Needed:
    """A checkpoint URL named by `origin` (the YAML key or argument, e.g. `model.pretrained`)."""
    return Needed(
        f"the checkpoint {origin}",
        url,
        how=f", or set {origin} to a local file (model YAML or --options {origin}=PATH)",
    )
