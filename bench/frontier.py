"""The speed-quality frontier, one curve per method, on one backbone and exits layout.

Methods (same weights, same test images, greedy or `--num-beams` beam search, batch 1 unless
--batch, timed in one process after a warm-up, configs interleaved per repeat):
  lavis           LAVIS's own `generate(num_beams=...)` (`Blip2OPT`), the reference of every speedup
  engine          the early-exit engine with exits off (`early_exit=False`): its own cost, and
                  with beams its single prefill, apart from what exits save
  free, no_adversarial, vanilla
                  the engine with each layout's trained exits, one point per threshold
  static          the engine leaving every token at one exit (threshold 0 from that exit on:
                  `min_exit_layer` = its layers run), one point per exit
Per point: CIDEr, per-attribute accuracy, layers run per token (to EOS; with beams, per beam
slot and step: every beam's computation counts), layer-count speedup
(num_layers / that) and wall-clock speedup against `lavis` (ms per caption, whole caption:
ViT, Q-Former, prefill and decode). Written: frontier.json, frontier.md, frontier.png.

    python bench/frontier.py --cfg-path projects/free/shapes_caption_frozen_lm.yaml \\
        --exits lavis_free/models/assets/shapes_frozen_lm --num-samples 100 --out bench/results/frontier
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from PIL import Image
from tqdm import tqdm

import lavis_free  # noqa: F401  (registers the plugin before LAVIS is used)
from lavis.processors import load_processor
from lavis_free.evaluation.plots import OUTSIDE_RIGHT, new_figure, save_figure
from lavis_free.hosts import exits_of
from lavis_free.models.lavis_parts import lavis_class
from lavis_free.reports.exit_quality import build_layout_model, load_config
from lavis_free.tasks.caption_metrics import caption_metrics

LAYOUTS = ("free", "no_adversarial", "vanilla")
THRESHOLDS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
STYLE = {"free": ("tab:red", "o"), "no_adversarial": ("tab:green", "^"), "vanilla": ("tab:orange", "s"),
         "static": ("tab:blue", "D"), "lavis": ("black", "*"), "engine": ("grey", "P")}

Decode = Callable[[torch.Tensor], Tuple[List[str], List[List[int]]]]


def methods(models: Dict[str, torch.nn.Module], thresholds, max_length: int, num_beams: int = 1) -> Dict[Tuple[str, float], Decode]:
    """(method, setting) -> a decode returning (captions, layers run per token)."""
    greedy = dict(num_beams=num_beams, max_length=max_length)
    free = models["free"]
    num_layers = exits_of(free).adapter.num_layers
    generate = lavis_class(free).generate

    def lavis(image):
        return generate(free, {"image": image}, **greedy), None

    def engine(model, **options):
        def decode(image):
            captions, stats = model.generate({"image": image}, return_exit_stats=True, **greedy, **options)
            return captions, stats["exit_layers"]
        return decode

    configs: Dict[Tuple[str, float], Decode] = {("lavis", num_layers): lavis, ("engine", num_layers): engine(free, early_exit=False)}
    for layout, model in models.items():
        for t in thresholds:
            configs[(layout, t)] = engine(model, exit_threshold=t)
    for layer in exits_of(free).config.layers:
        configs[("static", layer + 1)] = engine(free, exit_threshold=0.0, min_exit_layer=layer + 1)
    return configs


def measure(configs: Dict, images: List[torch.Tensor], batch: int, repeats: int):
    for decode in configs.values():
        decode(torch.stack(images[:batch]))  # warm-up
    times = {key: [] for key in configs}
    outputs = {}
    for _ in tqdm(range(repeats), desc="repeats"):
        for key, decode in tqdm(configs.items(), desc="settings", leave=False):
            captions, layers = [], []
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                c, l = decode(torch.stack(images[i:i + batch]))
                captions += c
                layers += l or []
            times[key].append(time.perf_counter() - start)
            outputs[key] = (captions, layers)
    return {key: (statistics.median(times[key]), *outputs[key]) for key in configs}


def frontier_figure(rows: List[dict], num_images: int, num_beams: int = 1):
    fig, axes = new_figure(12.5, 4.4, ncols=2)
    for ax, x, label in zip(axes, ("wall_speedup", "layer_speedup"),
                            ("wall-clock speedup vs LAVIS greedy (per caption)", "layer-count speedup (layers / layers run)")):
        for method in ("lavis", "engine", "static", "vanilla", "no_adversarial", "free"):
            points = sorted((r[x], r["CIDEr"]) for r in rows if r["method"] == method)
            if points:
                color, marker = STYLE[method]
                ax.plot(*zip(*points), color=color, marker=marker, linestyle="-" if len(points) > 1 else "", label=method)
        ax.set_xlabel(label if num_beams == 1 else label.replace("LAVIS greedy", f"LAVIS beam search ({num_beams} beams)"))
        ax.set_ylabel("CIDEr (test)")
        ax.grid(alpha=0.3)
    axes[1].legend(**OUTSIDE_RIGHT)
    decoding = "greedy" if num_beams == 1 else f"beam search, {num_beams} beams"
    fig.suptitle(f"Speed-quality frontier per method ({num_images} test images, batch 1, {decoding})")
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", default="projects/free/shapes_caption_frozen_lm.yaml")
    parser.add_argument("--exits", type=Path, default=Path("lavis_free/models/assets/shapes_frozen_lm"),
                        help="directory with exits_free.pth, exits_no_adversarial.pth, exits_vanilla.pth")
    for layout in LAYOUTS:
        parser.add_argument(f"--{layout.replace('_', '-')}", default=None,
                            help=f"the {layout} exits (inference or runner checkpoint); default: --exits/exits_{layout}.pth")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search for every method (LAVIS's captioning uses 5)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/frontier"))
    args = parser.parse_args()

    config = load_config(args.cfg_path, [f"datasets.shapes_caption.build_info.storage={args.data}"])
    checkpoints = {layout: getattr(args, layout) or str(args.exits / f"exits_{layout}.pth") for layout in LAYOUTS}
    models = {layout: build_layout_model(config.model_cfg, layout, path, "cpu") for layout, path in checkpoints.items()}
    vis = load_processor("blip_image_eval", {"image_size": config.model_cfg.image_size})
    rows_ann = json.loads((args.data / "annotations" / f"caption_{args.split}.json").read_text())[:args.num_samples]
    images = [vis(Image.open(args.data / r["image"]).convert("RGB")) for r in rows_ann]
    gt = str(args.data / "annotations" / f"caption_{args.split}_gt.json")
    num_layers = exits_of(models["free"]).adapter.num_layers

    with torch.no_grad():
        measured = measure(methods(models, args.thresholds, args.max_length, args.num_beams), images, args.batch, args.repeats)
    rows = []
    for (method, setting), (seconds, captions, layers) in measured.items():
        scores = caption_metrics([{"image_id": r["image_id"], "caption": c} for r, c in zip(rows_ann, captions)], gt, scorers=("cider",))
        flat = [l for row in layers for l in row]
        avg = statistics.mean(flat) if flat else num_layers
        rows.append({"method": method, "setting": setting, "ms_per_caption": 1000 * seconds / len(images),
                     "avg_layers": avg, "layer_speedup": num_layers / avg,
                     **{k: v for k, v in scores.items() if k == "CIDEr" or (k.startswith("scene_") and not k.endswith("_n"))}})
    ref = next(r for r in rows if r["method"] == "lavis")
    for r in rows:
        r["wall_speedup"] = ref["ms_per_caption"] / r["ms_per_caption"]
        r["cider_rel_drop"] = (ref["CIDEr"] - r["CIDEr"]) / ref["CIDEr"]

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"config": args.cfg_path, "exits": checkpoints, "num_images": len(images), "batch": args.batch, "num_beams": args.num_beams,
            "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "cpu": os.cpu_count(), "command": " ".join(sys.argv)}
    (args.out / "frontier.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| method | threshold / layers run | CIDEr | rel. drop | layers run per token | layer speedup | ms / caption | wall-clock speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['CIDEr']:.3f} | {100 * r['cider_rel_drop']:.1f}% | {r['avg_layers']:.2f} | "
                     f"{r['layer_speedup']:.2f}x | {r['ms_per_caption']:.1f} | {r['wall_speedup']:.2f}x |")
    (args.out / "frontier.md").write_text(json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n")
    save_figure(frontier_figure(rows, len(images), args.num_beams), args.out / "frontier.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
