"""Does compiling the per-layer step pay? `torch.compile` on the adapter's decoder-layer call.

The engine calls `DecoderAdapter.forward_layer` once per layer and step, on windows whose width
and cache length change every step, so the compiled function is built with `dynamic=True`
(one graph for all lengths; layers and exits are its inputs). Batch-1 captions of the shipped
default are decoded eager and compiled, at full depth and at a threshold; reported: ms per
caption (after a warm-up that includes compiling), the one-off compile time, and whether the
captions are the same (exactness). CUDA graphs need a GPU; this measures CPU only.

    OMP_NUM_THREADS=1 python bench/compile_step.py --num-samples 40 --out bench/results/frozen_lm/compile_step
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch._dynamo
from PIL import Image

import lavis_free  # noqa: F401  (registers the plugin before LAVIS is used)
from lavis.models import load_model_and_preprocess
from lavis_free.hosts import exits_of


def decode_all(model, images: List[torch.Tensor], threshold: Optional[float], max_length: int) -> Tuple[List[str], float]:
    """Captions of every image at batch 1, and the ms per caption."""
    options = dict(exit_threshold=threshold) if threshold is not None else dict(early_exit=False)
    start = time.perf_counter()
    captions = [c for image in images for c in model.generate({"image": image}, num_beams=1, max_length=max_length, **options)]
    return captions, 1000 * (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="shapes_frozen_lm")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--num-samples", type=int, default=40)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/frozen_lm/compile_step"))
    args = parser.parse_args()
    model, vis, _ = load_model_and_preprocess("blip2_opt_free", args.model_type, is_eval=True)
    adapter_class = type(exits_of(model).adapter)
    rows = json.loads((args.data / "annotations" / "caption_test.json").read_text())[: args.num_samples]
    images = [vis["eval"](Image.open(args.data / r["image"]).convert("RGB"))[None] for r in rows]
    settings = {"full depth": None, f"threshold {args.threshold}": args.threshold}
    results: Dict[str, Dict[str, object]] = {}
    eager = adapter_class.forward_layer
    for mode in ("eager", "compiled"):
        compile_s = 0.0
        if mode == "compiled":
            torch._dynamo.config.cache_size_limit = 64  # every layer and window width shares the budget
            adapter_class.forward_layer = torch.compile(eager, dynamic=True)
            start = time.perf_counter()
            for threshold in settings.values():
                decode_all(model, images[:4], threshold, args.max_length)
            compile_s = time.perf_counter() - start
        try:
            for name, threshold in settings.items():
                decode_all(model, images[:4], threshold, args.max_length)  # warm-up
                captions, ms = decode_all(model, images, threshold, args.max_length)
                results[f"{name}, {mode}"] = {"ms_per_caption": ms, "captions": captions, "compile_seconds": compile_s}
        finally:
            adapter_class.forward_layer = eager
    lines = ["| setting | eager ms / caption | compiled ms / caption | compiled / eager | same captions | compile time (s) |",
             "|---|---|---|---|---|---|"]
    for name in settings:
        e, c = results[f"{name}, eager"], results[f"{name}, compiled"]
        same = sum(a == b for a, b in zip(e["captions"], c["captions"]))
        lines.append(f"| {name} | {e['ms_per_caption']:.1f} | {c['ms_per_caption']:.1f} | "
                     f"{c['ms_per_caption'] / e['ms_per_caption']:.2f}x | {same} of {len(images)} | {c['compile_seconds']:.0f} |")
    meta = {"model_type": args.model_type, "num_images": len(images), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / "compile_step.md").write_text(json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
