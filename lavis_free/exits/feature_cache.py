"""An optional on-disk cache of what exit training reads from the frozen backbone.

Why: with the backbone frozen, the hidden states at the exit layers and the final features of a
training sample never change, so every epoch after the first can read them instead of running
the vision encoder, the Q-Former and the whole LM again. One file per sample holds only its
valid (unpadded) positions; batches are re-padded on load, which gives the exit layers the
inputs of a fresh computation (padding columns are masked as keys, and losses skip them). Equal
up to float rounding: a fresh computation itself differs in the last bits from batch to batch
(matmul and attention reductions depend on the padded width), so training with the cache follows
the same path as without it only until such differences grow.

When it is worth it: small models and datasets, where the backbone pass is a large part of an
iteration and the cache fits on a local disk. shapes_tiny (12 layers, hidden 128, 3 exits) on the
10k training captions: 420 MB in float32 (230 MB in float16); on one CPU thread an epoch after
the first took 59 s instead of 101 s (the first, which fills it, 120 s instead of 113 s). When it
is not: large backbones on large datasets. BLIP-2 OPT-2.7B on COCO captions stores (exits + 1) x 2560 values
per token; with 4 exits, ~47 tokens per caption (32 queries + prompt + caption) and 566k training
captions that is 47 x 2560 x 5 x 2 bytes = 1.2 MB per caption in fp16, about 680 GB in all.
Reading that back is no faster than the frozen forward pass on a GPU.

Samples are keyed by a digest of the processed image and the text, so the directory may be
shared by runs on other data, and randomly augmented images (random crops) just miss: use a
deterministic train `vis_processor` (e.g. `blip_image_eval`) for the cache to help. The backbone,
the exit layers and the tokenisation settings are recorded in a manifest; a run with others is
an error rather than a silent reuse.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from lavis_free.common.files import write_atomically
from lavis_free.common.safe_load import CheckpointLoadError, load_torch_file
from lavis_free.exits.adapters.base import EncoderContext
from lavis_free.exits.early_exits import BackboneOutputs

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ENTRY_KEYS = {"features", "labels"}
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class FeatureCacheError(ValueError):
    """A feature cache that cannot serve this run (other backbone, settings or samples)."""


FINGERPRINT_SAMPLES = 4096  # values per parameter tensor in `backbone_fingerprint`


def backbone_fingerprint(model: nn.Module, trainable_prefix: str = "early_exits.") -> str:
    """A digest of the frozen parameters: each one's name, shape and the exact float16 bytes of
    up to `FINGERPRINT_SAMPLES` evenly spaced values. Exact values rather than sums, so that the
    digest cannot depend on a device's summation order; float16, so that a backbone and its
    float16 copy (LAVIS loads OPT and the ViT in fp16 on GPU) share a digest; a sample, so that
    it stays cheap for billions of parameters (training changes every value of a tensor, so a
    retrained or other backbone differs in its sample). Checkpoints holding exits record it (see
    `AttachedExits.exit_metadata`), as does the feature cache's manifest."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(trainable_prefix):
                continue
            values = param.detach().reshape(-1)
            stride = max(1, values.numel() // FINGERPRINT_SAMPLES)
            sample = values[::stride][:FINGERPRINT_SAMPLES].to(device="cpu", dtype=torch.float16)
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def sample_keys(samples: Mapping[str, Any]) -> List[str]:
    """One key per sample: a digest of its processed image and the LM text it is trained on
    (`text_input`, and the target `text_output` when the batch has one: an instruction is the
    same for every caption of an image).

    Keyed by content rather than by image id, so a cache directory cannot serve features of
    another dataset with colliding ids, and randomly augmented images simply miss."""
    images, texts = samples["image"], list(samples["text_input"])
    if images.shape[0] != len(texts):
        raise FeatureCacheError(f"batch has {images.shape[0]} images for {len(texts)} text_input entries")
    if "text_output" in samples:
        texts = [f"{text}\n{target}" for text, target in zip(texts, samples["text_output"])]
    return [f"{digest}\n{text}" for digest, text in zip(image_digests(images), texts)]


def image_digests(images: torch.Tensor) -> List[str]:
    """A content digest per processed image of a batch [B, ...]."""
    return [hashlib.sha1(image.detach().contiguous().cpu().numpy().tobytes()).hexdigest() for image in images]


class FeatureCache:
    """Backbone outputs per sample under `root`, written once and read in later epochs."""

    def __init__(self, root: str, dtype: str, fingerprint: Mapping[str, Any]):
        if dtype not in CACHE_DTYPES:
            raise FeatureCacheError(f"run.exit_feature_cache_dtype={dtype!r}: allowed values are {sorted(CACHE_DTYPES)}")
        self.root = Path(root).expanduser()
        self.dtype = CACHE_DTYPES[dtype]
        self.fingerprint = {**fingerprint, "dtype": dtype}
        self.hits = 0
        self.misses = 0
        self._check_manifest()

    def _check_manifest(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / MANIFEST
        if path.is_file():
            stored = json.loads(path.read_text())
            differing = sorted(k for k in set(stored) | set(self.fingerprint) if stored.get(k) != self.fingerprint.get(k))
            if differing:
                raise FeatureCacheError(
                    f"run.exit_feature_cache={str(self.root)!r} was filled for another backbone or settings "
                    f"(differs in {differing}); delete it or choose another directory"
                )
            return
        manifest = json.dumps(self.fingerprint, indent=1, sort_keys=True)
        write_atomically(path, lambda partial: partial.write_text(manifest))

    def _path(self, key: str) -> Path:
        name = hashlib.sha1(key.encode()).hexdigest()
        return self.root / name[:2] / f"{name}.pt"

    def load(self, keys: Sequence[str], device: torch.device, dtype: torch.dtype) -> Optional[BackboneOutputs]:
        """The batch re-padded on the right, or None unless every sample is cached."""
        paths = [self._path(k) for k in keys]
        if not all(p.is_file() for p in paths):
            self.misses += 1
            return None
        items = [self._read(path) for path in paths]
        if any(item is None for item in items):
            self.misses += 1
            return None
        self.hits += 1
        return _pad_batch(items, device, dtype)

    def _read(self, path: Path) -> Optional[Dict[str, torch.Tensor]]:
        """One entry, or None with a warning naming it when it is unusable (a run killed while
        writing to a shared disk, a full disk, bit rot): the batch is then recomputed and
        `store` replaces the entry, so a damaged cache costs time, not the run."""
        try:
            item = load_torch_file(str(path), "run.exit_feature_cache entry")
        except CheckpointLoadError as error:
            logger.warning("exit feature cache: recomputing an unusable entry: %s", error)
            return None
        if not ENTRY_KEYS <= item.keys():
            logger.warning("exit feature cache: recomputing %s: it lacks %s", path, sorted(ENTRY_KEYS - item.keys()))
            return None
        return item

    def store(self, keys: Sequence[str], outputs: BackboneOutputs) -> None:
        """Writes each sample's valid positions (atomically, so ranks may share the directory)."""
        stacked = torch.stack([*outputs.exit_inputs, outputs.final_features], dim=1)  # [B, K+1, T, D]
        for row, key in enumerate(keys):
            valid = outputs.attention_mask[row].bool()
            item = {
                "features": stacked[row][:, valid].to("cpu", self.dtype).clone(),
                "labels": outputs.labels[row][valid].to("cpu", torch.int64).clone(),
            }
            if outputs.encoder is not None:  # encoder-decoder LMs: what the exits cross-attend to
                encoder_valid = outputs.encoder.mask[row].bool()
                item["encoder_states"] = outputs.encoder.states[row][encoder_valid].to("cpu", self.dtype).clone()
            path = self._path(key)
            path.parent.mkdir(exist_ok=True)
            write_atomically(path, lambda partial: torch.save(item, partial))


def _pad_batch(items: List[Dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype) -> BackboneOutputs:
    lengths = [item["labels"].shape[0] for item in items]
    length = max(lengths)
    num_tensors, _, hidden = items[0]["features"].shape
    features = torch.zeros(len(items), num_tensors, length, hidden, dtype=dtype)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, (item, n) in enumerate(zip(items, lengths)):
        features[row, :, :n] = item["features"].to(dtype)
        labels[row, :n] = item["labels"]
        mask[row, :n] = 1
    features = features.to(device)
    return BackboneOutputs(
        exit_inputs=[features[:, k] for k in range(num_tensors - 1)],
        final_features=features[:, -1],
        attention_mask=mask.to(device),
        labels=labels.to(device),
        encoder=_pad_encoder(items, device, dtype),
    )


def _pad_encoder(items: List[Dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype) -> Optional[EncoderContext]:
    """The encoder states of the batch, right-padded and masked (None for decoder-only LMs)."""
    if "encoder_states" not in items[0]:
        return None
    lengths = [item["encoder_states"].shape[0] for item in items]
    states = torch.zeros(len(items), max(lengths), items[0]["encoder_states"].shape[-1], dtype=dtype)
    mask = torch.zeros(len(items), max(lengths), dtype=torch.long)
    for row, (item, n) in enumerate(zip(items, lengths)):
        states[row, :n] = item["encoder_states"].to(dtype)
        mask[row, :n] = 1
    return EncoderContext(states.to(device), mask.to(device))
