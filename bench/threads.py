"""How many torch threads to use on a small CPU: exit training and decoding at 1, 2, ... threads.

Why: the README's thread advice must be measured, not assumed. Each thread count runs in a fresh
process (`OMP_NUM_THREADS` and `torch.set_num_threads` set before any work), on the shipped
`shapes_tiny` model with random 64x64 images and shapes-like captions, so no dataset is needed:
  - exit training: the frozen backbone's features (no autograd) + one FREE train step (one
    discriminator step, one generator step, two AdamW optimizers), batch 32, seconds/iteration;
  - decoding: greedy captions at the calibrated threshold, batch 1 and batch 8, ms/caption.
Run it on a quiet machine: other jobs on the same cores change the answer (that is the point).

    python bench/threads.py --threads 1 2 --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

CAPTIONS = [
    "a photo of a small red circle on the top left",
    "a photo of two large blue squares in the middle",
    "a photo of a green triangle on the bottom right and a yellow circle on the top",
    "a photo of three small purple squares",
]


def _median_seconds(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(threads: int, iterations: int) -> Dict[str, float]:
    """The figures for one thread count, in this process."""
    import torch

    torch.set_num_threads(threads)
    import lavis_free
    from lavis_free.runners.optim import parameter_groups
    from lavis_free.tasks.exit_training import train_step

    torch.manual_seed(0)
    model = lavis_free.load_model("blip2_opt_free", "shapes_tiny")
    size = model.visual_encoder.patch_embed.img_size[0]
    batch = {"image": torch.randn(32, 3, size, size), "text_input": [CAPTIONS[i % len(CAPTIONS)] for i in range(32)]}
    model.train()
    optimizers = {
        group: torch.optim.AdamW([p for _, p in params], lr=1e-4) for group, params in parameter_groups(model).items()
    }

    host = lavis_free.exits_of(model)

    def train_iteration() -> None:
        backbone = host.backbone_outputs(batch)
        train_step(host, backbone, optimizers, epoch=0, iteration=0)

    figures = {"train_s_per_iteration": _median_seconds(train_iteration, 2, iterations)}
    model.eval()
    for batch_size in (1, 8):
        images = torch.randn(batch_size, 3, size, size)
        seconds = _median_seconds(lambda: model.generate({"image": images}, num_beams=1, max_length=20), 2, iterations)
        figures[f"decode_ms_per_caption_batch{batch_size}"] = 1000 * seconds / batch_size
    return figures


COLUMNS = (  # (result key, heading, scale to the unit shown)
    ("train_s_per_iteration", "exit training, ms / iteration (batch 32)", 1000),
    ("decode_ms_per_caption_batch1", "decode, ms / caption (batch 1)", 1),
    ("decode_ms_per_caption_batch8", "decode, ms / caption (batch 8)", 1),
)


def markdown(results: Dict[int, Dict[str, float]]) -> str:
    base = results[min(results)]
    lines = [
        f"# Torch threads on this machine ({os.cpu_count()} CPUs)",
        "",
        "| threads | " + " | ".join(heading for _, heading, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for threads, fig in sorted(results.items()):
        cells = [f"{fig[key] * scale:.1f} ({base[key] / fig[key]:.2f}x)" for key, _, scale in COLUMNS]
        lines.append(f"| {threads} | " + " | ".join(cells) + " |")
    lines += ["", f"In brackets: speedup against {min(results)} thread(s). Median of each step's timed repeats."]
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=10, help="timed repeats of each step")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.iterations)))
        return
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for threads in args.threads:
        print(f"threads: measuring {threads} thread(s) ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(threads), "--iterations", str(args.iterations)],
            env=env, check=True, capture_output=True, text=True,
        )
        results[threads] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"threads: {threads}: {results[threads]}", flush=True)
    (out / "threads.json").write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    (out / "threads.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
