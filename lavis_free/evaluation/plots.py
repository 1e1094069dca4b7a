"""PNG plots of the evaluation (matplotlib, Agg backend: no display needed).

    python -m lavis_free.evaluation.plots --sweep DIR/sweep.json --out DIR/sweep.png

`plot_sweep`: quality against layer-count speedup and against wall-clock speedup, one curve per
KV policy, each point labelled with its threshold, the full-depth point as a star.
`plot_exit_histograms`: the share of tokens by decoder layers run, for several decodings side by
side (e.g. the calibrated threshold against the oracle exit).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPEEDUPS = (("layer_speedup", "layer-count speedup (x)"), ("wallclock_speedup", "wall-clock speedup (x)"))


def plot_sweep(table: Mapping[str, Any], path: str, title: Optional[str] = None) -> str:
    """Quality vs speedup from a sweep table (`sweep.run_sweep`); returns `path`."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    full = table["full_depth"]
    policies = sorted({row["kv_policy"] for row in table["rows"]}, key=[r["kv_policy"] for r in table["rows"]].index)
    for ax, (key, label) in zip(axes, SPEEDUPS):
        for policy in policies:
            rows = sorted((r for r in table["rows"] if r["kv_policy"] == policy), key=lambda r: r["exit_threshold"])
            xs, ys = [r[key] for r in rows], [r["quality"] for r in rows]
            ax.plot(xs, ys, marker="o", label=policy)
            for row, x, y in zip(rows, xs, ys):
                ax.annotate(f"{row['exit_threshold']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.plot([full[key]], [full["quality"]], marker="*", markersize=14, color="black", linestyle="none", label="full depth")
        ax.set_xlabel(label)
        ax.set_ylabel(table["metric"])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title or f"{table['metric']} vs speedup on {table['split']} ({table['num_samples']} samples; labels: threshold)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_exit_histograms(histograms: Mapping[str, Sequence[int]], path: str, title: str = "") -> str:
    """Grouped bars: share of tokens by decoder layers run (index = layers), one group per label."""
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(histograms)
    depth = max(len(h) for h in histograms.values()) - 1
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        counts = list(histograms[label])
        total = sum(counts) or 1
        xs = [layer + (i - (len(labels) - 1) / 2) * width for layer in range(1, len(counts))]
        ax.bar(xs, [c / total for c in counts[1:]], width=width, label=label)
    ax.set_xticks(range(1, depth + 1))
    ax.set_xlabel("decoder layers run for the token")
    ax.set_ylabel("share of tokens")
    ax.set_title(title or "Exit layers")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description="Plot a sweep table (sweep.json) as quality vs speedup.")
    parser.add_argument("--sweep", required=True, help="sweep.json written by lavis_free.evaluation.sweep")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)
    with open(args.sweep) as f:
        table: Dict[str, Any] = json.load(f)
    path = plot_sweep(table, args.out)
    print(f"plot written to {path}")
    return path


if __name__ == "__main__":
    main()
