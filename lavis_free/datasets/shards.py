"""Train splits read from webdataset tar shards (``--shards N`` of the generator).

Like LAVIS's LAION builder, the builder returns a ``wds.DataPipeline`` over resampled shards: an
endless, shuffled stream that LAVIS's runner wraps in a plain DataLoader. Each shard record holds
one image (``png``) and all its text (``json``); a visit draws one caption (or one dialogue round)
of the image, so over the stream every caption is seen. Being endless, it needs an
iteration-based run (``iters_per_inner_epoch``), as LAVIS's webdataset training does.
"""
from __future__ import annotations

import glob
import json
import os
import random
from typing import Any, Callable, Dict, List, Tuple

import webdataset as wds

from lavis_free.datasets.annotations import dialogue_rounds
from lavis_free.datasets.shapes import GENERATE_HINT

SHARD_KINDS = ("caption", "dialogue")
MEMBERS = ("png", "json")  # what a shard record of the shapes generator holds and a sample reads
SAFE_DECODERS = (wds.imagehandler("pilrgb", extensions=["png"]), wds.handle_extension("json", json.loads))


class _ToSample:
    """Shard record (image, json) -> one training sample; a class so DataLoader workers can pickle it."""

    def __init__(self, kind: str, vis_processor: Callable, text_processor: Callable):
        self.kind, self.vis_processor, self.text_processor = kind, vis_processor, text_processor

    def __call__(self, record: Tuple[Any, Dict[str, Any]]) -> Dict[str, Any]:
        image, meta = record
        sample = {"image": self.vis_processor(image), "image_id": meta["image_id"]}
        if self.kind == "caption":
            sample["text_input"] = self.text_processor(random.choice(meta["captions"]))
        else:
            rounds = dialogue_rounds([{"image": meta["image"], "image_id": meta["image_id"], "dialog": meta["dialog"]}])
            chosen = random.choice(rounds)
            sample["text_input"] = self.text_processor(chosen["context"])
            sample["text_output"] = chosen["answer"]
        return sample


def resolve_shards(spec: str, root: str) -> List[str]:
    """Shard files of ``spec``: a directory (all ``*.tar`` in it), a glob, or a ``{a..b}`` brace pattern.

    Relative specs are taken from the data root. Raises FileNotFoundError with the command that
    writes shards when none exist.
    """
    path = spec if os.path.isabs(spec) else os.path.join(root, spec)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.tar")))
    elif "{" in path:
        import braceexpand

        files = [f for f in braceexpand.braceexpand(path) if os.path.isfile(f)]
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(
            f"no webdataset shards at {path} (build_info.shards = {spec!r}). Write them with\n"
            f"    {GENERATE_HINT.format(out=root)} --shards 4"
        )
    return files


def shard_train_pipeline(kind: str, shard_files: List[str], vis_processor: Callable, text_processor: Callable,
                         shuffle_buffer: int = 1000) -> wds.DataPipeline:
    """An endless, shuffled stream of train samples of ``kind`` ('caption' or 'dialogue')."""
    if kind not in SHARD_KINDS:
        raise ValueError(
            f"webdataset shards are supported for {', '.join(SHARD_KINDS)} training, not {kind!r} "
            "(VQA answer lists need the VQA collater); remove build_info.shards for this dataset"
        )
    return wds.DataPipeline(
        wds.ResampledShards(shard_files),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(shuffle_buffer),
        # Only the members a sample uses, by their own decoders: webdataset's default handlers
        # (which `wds.decode("pilrgb")` keeps) unpickle .pyd/.pickle and torch.load .pth members,
        # so a crafted shard would run code. Other members stay undecoded bytes.
        wds.decode(*SAFE_DECODERS, pre=[], post=[], only=list(MEMBERS), handler=wds.warn_and_continue),
        wds.to_tuple(*MEMBERS, handler=wds.warn_and_continue),
        wds.map(_ToSample(kind, vis_processor, text_processor), handler=wds.warn_and_continue),
    )
