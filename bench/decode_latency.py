"""Caption latency, throughput, peak memory and quality: LAVIS generate vs the early-exit engine.

Rows (same weights, same images, greedy decoding, timed in one process after a warm-up):
  lavis_as_shipped  LAVIS 1.0.2's own `generate(num_beams=1)` (`Blip2OPT` / `Blip2T5`) on LAVIS's
                    own class built from the same parts (`as_lavis_model`), whose LM under
                    transformers 4.26 drops the KV cache (every step re-runs what came before)
  lavis             the same LAVIS code path with the cache working (the plugin's Cached* LM)
  engine_full       our engine with exits off (early_exit=False)
  engine_<policy>   our engine at the threshold, each KV policy
Targets (issue 4): engine_<policy> >= 2x faster than `lavis` at batch 1 with <= 1% relative
CIDEr drop; engine_full within 5% of `lavis`.

    python bench/decode_latency.py --data data/shapes --out bench/results
    python bench/decode_latency.py --model blip2_t5_free --model-type shapes_tiny_t5 --out bench/results/t5
    python bench/decode_latency.py --model instructblip_free --model-type shapes_tiny_flant5 --out bench/results/flant5
(for InstructBLIP, which has no LAVIS class in 1.0.2, `lavis` is the host binding's own
full-depth path, LAVIS main's generate call, and there is no `lavis_as_shipped` row)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import psutil
import torch
from PIL import Image
from tqdm import tqdm

import lavis_free  # noqa: F401  (registers the plugin before LAVIS is used)
from lavis.models import load_model_and_preprocess

from lavis_free.hosts import exits_of
from lavis_free.models.lavis_parts import as_lavis_model, lavis_class
from lavis_free.tasks.caption_metrics import caption_metrics


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few milliseconds (CPU);
    on CUDA, torch's own peak allocation counter."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        process = psutil.Process()
        self.base = process.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss - self.base)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()


def load_split(data_dir: Path, split: str, limit: int) -> List[dict]:
    path = data_dir / "annotations" / f"caption_{split}.json"
    if not path.is_file():
        sys.exit(f"{path} not found; generate the data: python -m lavis_free.datasets.shapes --out {data_dir} --seed 0")
    return json.loads(path.read_text())[:limit]


def one_pass(decode: Callable[[torch.Tensor], List[str]], images: List[torch.Tensor], batch: int, device):
    """Wall time of one pass over all images, its captions, and its peak memory."""
    captions = []
    with PeakRSS(device) as memory:
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            captions += decode(torch.stack(images[i : i + batch]).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, captions, memory.peak


def run_interleaved(configs: Dict[str, Callable], images: List[torch.Tensor], batch: int, device, repeats: int):
    """Each repeat times every config once, in turn, so that drift in machine load hits all
    configs alike; returns per config the median time, the captions and the peak memory."""
    for decode in configs.values():
        decode(torch.stack(images[:batch]).to(device))  # warm-up
    times = {name: [] for name in configs}
    outputs = {}
    for _ in tqdm(range(repeats), desc=f"batch {batch}"):
        for name, decode in configs.items():
            seconds, captions, peak = one_pass(decode, images, batch, device)
            times[name].append(seconds)
            outputs[name] = (captions, max(peak, outputs.get(name, (None, 0))[1]))
    return {name: (statistics.median(times[name]), *outputs[name]) for name in configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="blip2_opt_free", help="blip2_opt_free or blip2_t5_free")
    parser.add_argument("--model-type", default="shapes_tiny")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threshold", type=float, default=None, help="default: the model config's calibrated threshold")
    parser.add_argument("--policies", nargs="+", default=["recompute", "propagate"])
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model, vis, _ = load_model_and_preprocess(args.model, args.model_type, is_eval=True, device=device)
    threshold = args.threshold if args.threshold is not None else exits_of(model).config.inference.exit_threshold
    rows = load_split(args.data, args.split, args.num_samples)
    images = [vis["eval"](Image.open(args.data / r["image"]).convert("RGB")) for r in rows]
    gt_path = args.data / "annotations" / f"caption_{args.split}_gt.json"
    # plain greedy, also for hosts whose generate defaults are not (InstructBLIP: repetition_penalty 1.5)
    greedy = dict(num_beams=1, max_length=args.max_length, repetition_penalty=1.0, use_nucleus_sampling=False)
    host = exits_of(model)

    configs: Dict[str, Callable] = {}
    try:
        lavis_generate = lavis_class(model).generate  # LAVIS's own, on the plugin's cached LM
        shipped = as_lavis_model(model).to(device)  # LAVIS's own class and LM class, same weights
        configs["lavis_as_shipped"] = lambda image: lavis_generate(shipped, {"image": image}, **greedy)
        configs["lavis"] = lambda image: lavis_generate(model, {"image": image}, **greedy)
    except TypeError:  # no LAVIS class in 1.0.2 (InstructBLIP): the host's own full-depth path
        def lavis_path(image):
            prompts = [model.prompt] * len(image)
            decoding = {**host.binding.generate_defaults, **greedy}
            return host.binding.decode_text(model, host.binding.lavis_generate(model, image, prompts, **decoding))

        configs["lavis"] = lavis_path
    configs["engine_full"] = lambda image: model.generate({"image": image}, early_exit=False, **greedy)
    for policy in args.policies:
        configs[f"engine_{policy}"] = lambda image, p=policy: model.generate(
            {"image": image}, exit_threshold=threshold, kv_policy=p, **greedy
        )

    tokenizer = getattr(model, "opt_tokenizer", None) or getattr(model, "t5_tokenizer", None) or model.llm_tokenizer
    results = []
    for batch in args.batch_sizes:
        measured = run_interleaved(configs, images, batch, device, args.repeats)
        for name, (seconds, captions, peak) in measured.items():
            tokens = sum(len(tokenizer(c, add_special_tokens=False).input_ids) + 1 for c in captions)
            predictions = [{"image_id": r["image_id"], "caption": c} for r, c in zip(rows, captions)]
            metrics = caption_metrics(predictions, str(gt_path), scorers=("cider",))
            results.append({
                "batch": batch, "config": name, "ms_per_caption": 1000 * seconds / len(images),
                "tokens_per_s": tokens / seconds, "peak_mem_mb": peak / 2**20, "CIDEr": metrics["CIDEr"],
            })
    for row in results:
        ref = next(r for r in results if r["batch"] == row["batch"] and r["config"] == "lavis")
        row["speedup_vs_lavis"] = ref["ms_per_caption"] / row["ms_per_caption"]
        row["cider_rel_drop_vs_lavis"] = (ref["CIDEr"] - row["CIDEr"]) / max(ref["CIDEr"], 1e-9)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model, "model_type": args.model_type, "threshold": threshold, "num_samples": len(images),
        "max_length": args.max_length, "device": str(device), "torch_threads": torch.get_num_threads(),
        "cpu": os.cpu_count(), "command": " ".join(sys.argv),
    }
    (args.out / "decode_latency.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    # the speedup is per caption (ratio of ms/caption); tokens/s differ by more when captions differ in length
    header = ("| batch | config | ms / caption | tokens/s | peak mem MB | CIDEr | speedup vs lavis per caption "
              "| rel. CIDEr drop |")
    lines = [header, "|" + "---|" * 8]
    for r in results:
        lines.append(
            f"| {r['batch']} | {r['config']} | {r['ms_per_caption']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_mem_mb']:.1f} | {r['CIDEr']:.3f} | {r['speedup_vs_lavis']:.2f}x | {100 * r['cider_rel_drop_vs_lavis']:.2f}% |"
        )
    table = "\n".join(lines)
    (args.out / "decode_latency.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    print(table)
    print(f"written: {args.out / 'decode_latency.json'}, {args.out / 'decode_latency.md'}")


if __name__ == "__main__":
    main()
