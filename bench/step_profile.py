"""Where a batch-1 caption's time goes: image side, prefill, backbone layers, exit checks, bookkeeping.

The engine's methods are wrapped with wall-clock timers (about 1 us per call, small against the
hundreds of microseconds a layer call takes on CPU) while test captions are decoded at batch 1:
  image        ViT + Q-Former + projection and the decoder prefix (host binding's decode_batch)
  prefill      the prefix through every layer (and the exits' caches)
  layer_call   the adapter's decoder-layer call of a backbone layer in a decode step (the arithmetic
               and its per-op overhead)
  layer_book   the rest of running a backbone layer: window, mask, cache reads/writes, commits
  exit_check   an exit: its layer (with its window and cache) and its check (`_exit_check`: the
               confidence, with the frozen head when the confidence reads logits, and the
               decision with its host sync); with `confidence: learned` the head of a token
               leaving through the LM's head runs in the step's one head call (engine)
  engine       everything else of a decode step: embedding the last token, the head call at
               the step's end, the logits constraints (suppressed ids, min length), bookkeeping
Per-layer figures divide by the backbone layer calls of decode steps.

    python bench/step_profile.py --model-type shapes_frozen_lm --num-samples 50 --out bench/results/step_profile
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator

import torch
from PIL import Image

import lavis_free  # noqa: F401
from lavis.models import load_model_and_preprocess

from lavis_free.exits.engine import EarlyExitDecoder
from lavis_free.hosts import exits_of


@contextlib.contextmanager
def timed_engine(totals: Dict[str, float], counts: Dict[str, int]) -> Iterator[None]:
    """Wrap the engine's steps with timers that add into `totals` (seconds) and `counts`."""
    originals = {name: getattr(EarlyExitDecoder, name) for name in ("prefill", "_run_layer", "_run_exit", "_exit_check", "generate")}
    state = {"in_prefill": False, "in_exit": False}

    def wrap(name, key):
        original = originals[name]

        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                totals[key(self)] += time.perf_counter() - start
                counts[key(self)] += 1
        return timed

    adapter_call = {}

    def layer(self, *args, **kwargs):
        if state["in_prefill"]:
            return originals["_run_layer"](self, *args, **kwargs)
        forward = self.adapter.forward_layer
        if self not in adapter_call:
            def counted(*a, **k):
                start = time.perf_counter()
                try:
                    return forward(*a, **k)
                finally:
                    totals["layer_call"] += time.perf_counter() - start
                    counts["layer_call"] += 1
            adapter_call[self] = counted
        start = time.perf_counter()
        self.adapter.forward_layer = adapter_call[self]
        try:
            return originals["_run_layer"](self, *args, **kwargs)
        finally:
            del self.adapter.forward_layer
            totals["layer_total"] += time.perf_counter() - start

    def prefill(self, *args, **kwargs):
        state["in_prefill"] = True
        start = time.perf_counter()
        try:
            return originals["prefill"](self, *args, **kwargs)
        finally:
            state["in_prefill"] = False
            totals["prefill"] += time.perf_counter() - start

    def run_exit(self, *args, **kwargs):
        if state["in_prefill"]:
            return originals["_run_exit"](self, *args, **kwargs)
        return wrap("_run_exit", lambda s: "exit_layer")(self, *args, **kwargs)

    EarlyExitDecoder.prefill = prefill
    EarlyExitDecoder._run_layer = layer
    EarlyExitDecoder._run_exit = run_exit
    EarlyExitDecoder._exit_check = wrap("_exit_check", lambda s: "exit_decide")
    EarlyExitDecoder.generate = wrap("generate", lambda s: "generate")
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(EarlyExitDecoder, name, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="blip2_opt_free")
    parser.add_argument("--model-type", default="shapes_frozen_lm")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--num-samples", type=int, default=50)
    parser.add_argument("--thresholds", type=float, nargs="+", default=None, help="default: the model's calibrated one, and full depth")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_profile"))
    args = parser.parse_args()
    model, vis, _ = load_model_and_preprocess(args.model, args.model_type, is_eval=True)
    calibrated = exits_of(model).config.inference.exit_threshold
    settings = {"full depth": dict(early_exit=False)}
    for t in args.thresholds or [calibrated]:
        settings[f"threshold {t}"] = dict(exit_threshold=t)
    rows = json.loads((args.data / "annotations" / "caption_test.json").read_text())[:args.num_samples]
    images = [vis["eval"](Image.open(args.data / r["image"]).convert("RGB"))[None] for r in rows]
    model.generate({"image": images[0]}, num_beams=1, max_length=args.max_length)  # warm-up
    report = {}
    for name, options in settings.items():
        totals, counts = defaultdict(float), defaultdict(int)
        tokens = 0
        with timed_engine(totals, counts), torch.no_grad():
            start = time.perf_counter()
            for image in images:
                _, stats = model.generate({"image": image}, num_beams=1, max_length=args.max_length,
                                          return_exit_stats=True, **options)
                tokens += len(stats["exit_layers"][0])
            wall = time.perf_counter() - start
        exit_check = totals["exit_layer"] + totals["exit_decide"]
        split = {
            "image": wall - totals["generate"],
            "prefill": totals["prefill"],
            "layer_call": totals["layer_call"],
            "layer_book": totals["layer_total"] - totals["layer_call"],
            "exit_check": exit_check,
            "engine": totals["generate"] - totals["prefill"] - totals["layer_total"] - exit_check,
        }
        layer_calls = max(counts["layer_call"], 1)
        report[name] = {
            "ms_per_caption": 1000 * wall / len(images), "tokens": tokens,
            "ms_per_caption_split": {k: 1000 * v / len(images) for k, v in split.items()},
            "us_per_layer_call": 1e6 * totals["layer_call"] / layer_calls,
            "us_per_decode_layer": 1e6 * (totals["layer_total"]) / layer_calls,
            "us_per_exit_check": 1e6 * exit_check / max(counts["exit_layer"], 1),
            "backbone_layer_calls_per_token": counts["layer_call"] / max(tokens - len(images), 1),
            "exit_checks_per_token": counts["exit_layer"] / max(tokens - len(images), 1),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "model_type": args.model_type, "num_images": len(images), "torch_threads": torch.get_num_threads(),
            "command": " ".join(sys.argv)}
    (args.out / "step_profile.json").write_text(json.dumps({"meta": meta, "settings": report}, indent=1))
    parts = ("image", "prefill", "layer_call", "layer_book", "exit_check", "engine")
    lines = ["| setting | ms / caption | " + " | ".join(parts) + " | us / layer call | us / decode layer | us / exit check | layers / token | checks / token |",
             "|---" * (len(parts) + 7) + "|"]
    for name, r in report.items():
        s = r["ms_per_caption_split"]
        lines.append(f"| {name} | {r['ms_per_caption']:.1f} | " + " | ".join(f"{s[p]:.1f}" for p in parts)
                     + f" | {r['us_per_layer_call']:.0f} | {r['us_per_decode_layer']:.0f} | {r['us_per_exit_check']:.0f}"
                     f" | {r['backbone_layer_calls_per_token']:.2f} | {r['exit_checks_per_token']:.2f} |")
    (args.out / "step_profile.md").write_text(json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
