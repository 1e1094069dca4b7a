"""Threshold x policy sweep: quality against speedup, with full depth measured in the same process.

    python -m lavis_free.evaluation.sweep --cfg-path projects/free/shapes_caption.yaml --split val \
        --thresholds 0.5 0.6 0.7 0.8 0.9 0.95 0.99 --policies recompute propagate --out DIR

Caption quality uses the task's `run.caption_scorers`; METEOR starts a JVM per scoring (about 25 s
each on 2 cores), so add `--options "run.caption_scorers=[bleu,cider]"` for quick sweeps.
Writes DIR/sweep.json, DIR/sweep.md and DIR/sweep.png (quality against layer-count and wall-clock
speedup, one curve per policy, the full-depth point). Every row decodes the same samples; the
full-depth row (exits disabled) is decoded first and is the reference of each row's relative
quality drop. A row's wall-clock speedup is the full-depth time per sample over the row's, both
timed on the same batches side by side. DIR is checked before anything is decoded, and the JSON
and markdown are rewritten (atomically) after every setting, so a stopped sweep keeps the rows
it measured (`"complete": false`); the plot is drawn once the sweep is complete.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from tqdm import tqdm

from lavis_free.evaluation.outputs import atomic_write, prepare_output_dir
from lavis_free.evaluation.plots import plot_sweep
from lavis_free.evaluation.runs import (
    FULL_DEPTH,
    Project,
    SettingRun,
    add_project_arguments,
    default_metric,
    project_from_args,
    run_setting,
    scored_loader,
    warm_up,
)
from lavis_free.exits.options import KV_POLICIES
from lavis_free.hosts import exits_of

DEFAULT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def relative_drop(quality: float, reference: float) -> float:
    """(reference - quality) / reference; with a zero reference, 0 when quality is not below it."""
    if reference > 0:
        return (reference - quality) / reference
    return 0.0 if quality >= reference else float("inf")


def compared_figures(run: SettingRun, reference: Optional[Mapping[str, Any]], metric: str) -> Dict[str, Any]:
    """Figures of a run with its relative quality drop against `reference` (None: the run is
    the full-depth reference itself)."""
    row = run.figures(metric)
    row["relative_drop"] = 0.0 if reference is None else relative_drop(row["quality"], reference["quality"])
    return row


def check_grid(thresholds: Sequence[float], policies: Sequence[str]) -> None:
    """Clear errors for an empty or invalid grid (thresholds must enable exits: <= 1)."""
    if not thresholds or not policies:
        raise ValueError("--thresholds and --policies need at least one value each")
    for value in thresholds:
        if not 0 <= value <= 1:
            raise ValueError(f"--thresholds {value}: thresholds are confidences in [0, 1] (full depth is always measured)")
    for policy in policies:
        if policy not in KV_POLICIES:
            raise ValueError(f"--policies {policy!r}: allowed values are {', '.join(KV_POLICIES)}")


def run_sweep(project: Project, split: str, thresholds: Sequence[float], policies: Sequence[str],
              confidence: Optional[str] = None, min_exit_layer: Optional[int] = None, metric: Optional[str] = None,
              max_samples: Optional[int] = None, dataset: Optional[str] = None, progress: bool = True,
              on_row: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Decodes `split` at full depth, then at every (policy, threshold); returns the table.
    `on_row(table)` is called after the full-depth row and after every row with the table so far
    (`"complete"` turns true with the last row), so that a caller can save results as they come."""
    check_grid(thresholds, policies)
    metric = metric or default_metric(project.task)
    loader = scored_loader(project, split, max_samples, dataset)
    common = {"confidence": confidence, "min_exit_layer": min_exit_layer}
    warm_up(project, loader, {**common, "exit_threshold": min(thresholds), "kv_policy": policies[0]})
    grid = [(p, t) for p in policies for t in sorted(thresholds)]
    bar = tqdm(total=len(grid) + 1, desc=f"sweep {split}", disable=not progress)
    full = run_setting(project, loader, split, {**common, **FULL_DEPTH}, "full depth", progress)
    bar.update()
    rows: List[Dict[str, Any]] = []
    table = {
        "cfg_path": project.cfg_path,
        "split": split,
        "num_samples": len(loader.dataset),
        "metric": metric,
        "num_layers": exits_of(project.model).adapter.num_layers,
        "exit_layers": list(exits_of(project.model).config.layers),  # 0-based: exit after layer i
        "num_settings": len(grid),
        "complete": False,
        "full_depth": compared_figures(full, None, metric),
        "rows": rows,
    }
    notify = on_row or (lambda _: None)
    notify(table)
    for policy, threshold in grid:
        run = run_setting(project, loader, split, {**common, "exit_threshold": threshold, "kv_policy": policy},
                          f"{policy} {threshold}", progress)
        row = compared_figures(run, table["full_depth"], metric)
        rows.append(row)
        table["complete"] = len(rows) == len(grid)
        notify(table)
        bar.set_postfix(policy=policy, threshold=threshold, quality=round(row["quality"], 3))
        bar.update()
    bar.close()
    return table


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def sweep_markdown(table: Mapping[str, Any]) -> str:
    """The table as markdown: one line for full depth, one per (policy, threshold). Units are in
    the headings: time per sample, throughput per token, counts in decoder layers run."""
    metric = table["metric"]
    lines = [
        f"Split `{table['split']}` ({table['num_samples']} samples), LM depth {table['num_layers']} layers, "
        f"exits after layers {table['exit_layers']} (0-based: a token leaving after layer i has run i + 1 layers). "
        "Relative drop is against the full-depth row. Wall-clock speedup is the time per sample at full depth "
        "(decoded beside each row, on the same batches) over the row's; it differs from the ratio of tokens/s "
        "when the two decodings generate different numbers of tokens.",
        "",
    ]
    if not table.get("complete", True):
        lines += [f"**Partial: {len(table['rows'])} of {table['num_settings']} settings measured (the run did not "
                  "finish).**", ""]
    lines += [
        f"| policy | threshold | {metric} | rel. drop | avg layers run | layer-count speedup | ms / sample "
        "| full depth ms / sample | wall-clock speedup per sample | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in [dict(table["full_depth"], kv_policy="full depth", exit_threshold=None)] + list(table["rows"]):
        lines.append(
            f"| {row.get('kv_policy') or '-'} | {_fmt(row['exit_threshold'], 2)} | {_fmt(row['quality'])} | "
            f"{row['relative_drop'] * 100:.1f}% | {_fmt(row['avg_exit_layer'], 2)} | {_fmt(row['layer_speedup'], 2)}x | "
            f"{_fmt(row['ms_per_sample'], 1)} | {_fmt(row['full_depth_ms_per_sample'], 1)} | "
            f"{_fmt(row['wallclock_speedup'], 2)}x | {_fmt(row['tokens_per_s'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def sweep_paths(out_dir: Union[str, Path], name: str = "sweep") -> Dict[str, str]:
    """DIR/<name>.json, .md and .png."""
    return {ext: str(Path(out_dir) / f"{name}.{ext}") for ext in ("json", "md", "png")}


def write_sweep(table: Mapping[str, Any], out_dir: Union[str, Path], name: str = "sweep") -> Dict[str, str]:
    """Writes DIR/<name>.json and .md (atomically), and .png once the table is complete; returns the paths."""
    paths = sweep_paths(out_dir, name)
    atomic_write(paths["json"], json.dumps(table, indent=2))
    atomic_write(paths["md"], f"# Threshold sweep: {table['cfg_path']}\n\n" + sweep_markdown(table))
    if table.get("complete", True):
        plot_sweep(table, paths["png"])
    return paths


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    parser.add_argument("--policies", nargs="+", default=["recompute", "propagate"], help=" | ".join(KV_POLICIES))
    parser.add_argument("--metric", default=None, help="quality metric (default: CIDEr for captions, accuracy for answers)")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    parser = argparse.ArgumentParser(description="Sweep exit thresholds and KV policies against full depth.")
    add_project_arguments(parser)
    add_grid_arguments(parser)
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    out = prepare_output_dir(args.out)
    project = project_from_args(args)
    table = run_sweep(project, args.split, args.thresholds, args.policies, args.confidence, args.min_exit_layer,
                      args.metric, args.max_samples, args.dataset, progress=not args.no_progress,
                      on_row=lambda partial: write_sweep(partial, out))
    paths = sweep_paths(out)
    print(sweep_markdown(table))
    print(f"sweep written to {paths['md']} ({paths['json']}, {paths['png']})")
    return paths

if __name__ == "__main__":
    main()
