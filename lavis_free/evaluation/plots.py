"""PNG plots of the evaluation (matplotlib's object API and Agg canvas: no display, no pyplot state).

    python -m lavis_free.evaluation.plots --sweep DIR/sweep.json --out DIR/sweep.png

(also plots the rows a stopped sweep saved; the sweep itself draws its plot once complete).

`sweep_figure`: quality against layer-count speedup and against wall-clock speedup, one curve per
KV policy, points labelled with their exit threshold where the label has room, the full-depth
point as a star. `exit_histogram_figure`: the share of tokens by decoder layers run, for several
decodings side by side (e.g. the calibrated threshold against the oracle exit). Layers follow the
README's convention: a token that leaves at the exit after layer i (0-based) has run i + 1 layers.
Every figure has a title, axis labels and its legend outside the data; `save_figure` writes it
atomically. The `*_figure` functions return the figure so that tests can inspect it.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from lavis_free.evaluation.outputs import OutputDirError, atomic_write, prepare_output_dir, read_result

SPEEDUPS = (("layer_speedup", "layer-count speedup (x)"), ("wallclock_speedup", "wall-clock speedup per sample (x)"))
# Where a point's label may go, in points from the point (tried in order): right-above,
# right-below, left-above, left-below.
LABEL_OFFSETS = ((4, 3), (4, -3), (-4, 3), (-4, -3))
OUTSIDE_RIGHT = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "fontsize": 8}


def new_figure(width: float, height: float, ncols: int = 1) -> Tuple[Figure, List[Axes]]:
    """A figure on an Agg canvas (so text extents can be measured before saving) and its axes."""
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def save_figure(fig: Figure, path: Union[str, Path]) -> str:
    """Renders `fig` as PNG and writes it atomically; returns `path`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())
    return str(path)


def label_points(ax: Axes, points: Sequence[Tuple[float, float, str, str]], marker_pt: float = 6.0) -> List[Any]:
    """Annotates (x, y, text, color) points in order, each at the first offset of LABEL_OFFSETS
    where its text stays inside the axes and covers neither a label placed before nor any
    point's marker (`marker_pt` wide); a point with no such offset stays unlabelled (dense
    sweeps would otherwise print unreadable piles of numbers). Call it after the layout is
    final: overlaps are measured on the rendered text."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    radius = marker_pt / 2 * ax.figure.dpi / 72
    centres = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    taken: List[Bbox] = [Bbox.from_bounds(px - radius, py - radius, 2 * radius, 2 * radius) for px, py in centres]
    labels = []
    for x, y, text, color in points:
        for dx, dy in LABEL_OFFSETS:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, color=color,
                                ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
            box = label.get_window_extent(renderer)
            if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) and not any(box.overlaps(b) for b in taken):
                taken.append(box)
                labels.append(label)
                break
            label.remove()
    return labels


def sweep_figure(table: Mapping[str, Any], title: Optional[str] = None) -> Figure:
    """Quality vs speedup from a sweep table (`sweep.run_sweep`)."""
    fig, axes = new_figure(12, 4.4, ncols=2)
    full = table["full_depth"]
    metric = table["metric"]
    policies = list(dict.fromkeys(row["kv_policy"] for row in table["rows"]))
    to_label: Dict[int, List[Tuple[float, float, str, str]]] = {0: [], 1: []}
    for i, (ax, (key, label)) in enumerate(zip(axes, SPEEDUPS)):
        for policy in policies:
            rows = sorted((r for r in table["rows"] if r["kv_policy"] == policy), key=lambda r: r["exit_threshold"])
            xs, ys = [r[key] for r in rows], [r["quality"] for r in rows]
            (line,) = ax.plot(xs, ys, marker="o", label=f"FREE, {policy}")
            to_label[i] += [(x, y, f"{r['exit_threshold']:g}", line.get_color()) for r, x, y in zip(rows, xs, ys)]
        ax.plot([full[key]], [full["quality"]], marker="*", markersize=14, color="black", linestyle="none",
                label="full depth")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} ({table['split']})")
        ax.set_title(f"{metric} vs {label.split(' (')[0]}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(title="point labels: threshold", title_fontsize=8, **OUTSIDE_RIGHT)
    fig.suptitle(title or f"Threshold sweep: {metric} vs speedup on {table['split']} ({table['num_samples']} samples)")
    fig.tight_layout()
    for i, ax in enumerate(axes):
        label_points(ax, to_label[i])
    return fig


def plot_sweep(table: Mapping[str, Any], path: Union[str, Path], title: Optional[str] = None) -> str:
    """`sweep_figure` written to `path`; returns `path`."""
    return save_figure(sweep_figure(table, title), path)


def exit_histogram_figure(histograms: Mapping[str, Sequence[int]], title: str = "") -> Figure:
    """Grouped bars: share of tokens by decoder layers run (index = layers run), one group per label."""
    fig, (ax,) = new_figure(9, 4)
    labels = list(histograms)
    depth = max(len(h) for h in histograms.values()) - 1
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        counts = list(histograms[label])
        total = sum(counts) or 1
        xs = [layers + (i - (len(labels) - 1) / 2) * width for layers in range(1, len(counts))]
        ax.bar(xs, [c / total for c in counts[1:]], width=width, label=label)
    ax.set_xticks(range(1, depth + 1))
    ax.set_xlabel(f"decoder layers run by the token ({depth} = full depth; exit after layer i = i + 1 layers run)")
    ax.set_ylabel("share of tokens")
    ax.set_title(title or "Tokens by decoder layers run")
    ax.legend(**OUTSIDE_RIGHT)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_exit_histograms(histograms: Mapping[str, Sequence[int]], path: Union[str, Path], title: str = "") -> str:
    """`exit_histogram_figure` written to `path`; returns `path`."""
    return save_figure(exit_histogram_figure(histograms, title), path)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description="Plot a sweep table (sweep.json) as quality vs speedup.")
    parser.add_argument("--sweep", required=True, help="sweep.json written by lavis_free.evaluation.sweep")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)
    if Path(args.out).is_dir():
        raise OutputDirError(f"--out {args.out}: is a directory; give the PNG's file path")
    prepare_output_dir(Path(args.out).parent, "--out's directory")
    table = read_result(args.sweep, "--sweep", ("full_depth", "rows", "metric"), "python -m lavis_free.evaluation.sweep",
                        allow_partial=True)  # how to see the rows of a stopped sweep
    path = plot_sweep(table, args.out)
    print(f"plot written to {path}")
    return path


if __name__ == "__main__":
    main()
