"""Threshold calibration on one split, reported on another, with the oracle exit as the ceiling.

    python -m lavis_free.evaluation.calibrate --cfg-path projects/free/shapes_caption.yaml \
        --calib-split val --test-split test --tolerance 0.01 [--metric CIDEr] --out DIR

For each KV policy, the calibrated threshold is the most aggressive one (the lowest: the most
exits) whose quality on the calibration split stays within `tolerance` (relative) of full depth
there; a policy with no such threshold is reported as "exits off". The test split is then decoded
at full depth (which also gives the oracle exit) and at each calibrated threshold. Writes
DIR/calibration.json, .md, the calibration sweep (calib_sweep.*), and exit_histogram.png (tokens by
layers run at each calibrated threshold against the oracle).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence

from tqdm import tqdm

from lavis_free.evaluation.oracle import capture_decodes, oracle_figures, oracle_stats
from lavis_free.evaluation.plots import plot_exit_histograms
from lavis_free.evaluation.runs import Project, add_project_arguments, project_from_args, run_setting, split_loader, warm_up
from lavis_free.evaluation.sweep import (
    add_grid_arguments,
    compared_figures,
    relative_drop,
    run_sweep,
    sweep_markdown,
    write_sweep,
)
from lavis_free.tasks.exit_eval import FULL_DEPTH_THRESHOLD


def check_tolerance(tolerance: float) -> None:
    if not 0 <= tolerance < 1:
        raise ValueError(f"--tolerance is a relative quality drop in [0, 1) (0.01 = 1%), got {tolerance}")


def select_threshold(rows: Sequence[Mapping[str, Any]], reference_quality: float, tolerance: float) -> Optional[Mapping[str, Any]]:
    """The row with the lowest `exit_threshold` whose `quality` drops at most `tolerance`
    (relative) below `reference_quality`; None when no row qualifies."""
    check_tolerance(tolerance)
    within = [r for r in rows if relative_drop(r["quality"], reference_quality) <= tolerance]
    return min(within, key=lambda r: r["exit_threshold"]) if within else None


def run_calibration(project: Project, calib_split: str, test_split: str, tolerance: float, thresholds: Sequence[float],
                    policies: Sequence[str], confidence: Optional[str] = None, min_exit_layer: Optional[int] = None,
                    metric: Optional[str] = None, max_samples: Optional[int] = None, dataset: Optional[str] = None,
                    progress: bool = True) -> Dict[str, Any]:
    """Sweeps `calib_split`, selects a threshold per policy, reports them and the oracle on `test_split`."""
    sweep = run_sweep(project, calib_split, thresholds, policies, confidence, min_exit_layer, metric,
                      max_samples, dataset, progress)
    metric = sweep["metric"]
    selected = {}
    for policy in policies:
        row = select_threshold([r for r in sweep["rows"] if r["kv_policy"] == policy], sweep["full_depth"]["quality"], tolerance)
        selected[policy] = None if row is None else row["exit_threshold"]

    loader = split_loader(project, test_split, max_samples, dataset)
    common = {"confidence": confidence, "min_exit_layer": min_exit_layer}
    chosen = [(p, t) for p, t in selected.items() if t is not None]
    warm_up(project, loader, {**common, "exit_threshold": chosen[0][1] if chosen else FULL_DEPTH_THRESHOLD})
    bar = tqdm(total=len(chosen) + 2, desc=f"test {test_split}", disable=not progress)
    with capture_decodes(project.model) as calls:
        full = run_setting(project, loader, test_split, {**common, "exit_threshold": FULL_DEPTH_THRESHOLD}, "full depth", progress)
    bar.update()
    reference = compared_figures(full, None, metric)
    oracle = oracle_figures(oracle_stats(project.model, calls))
    bar.update()
    test_rows = []
    for policy, threshold in chosen:
        run = run_setting(project, loader, test_split, {**common, "exit_threshold": threshold, "kv_policy": policy},
                          f"{policy} {threshold}", progress)
        test_rows.append(compared_figures(run, reference, metric))
        bar.update()
    bar.close()
    return {
        "cfg_path": project.cfg_path,
        "metric": metric,
        "tolerance": tolerance,
        "calib_split": calib_split,
        "test_split": test_split,
        "selected": selected,
        "calibration": sweep,
        "test": {
            "split": test_split,
            "num_samples": len(loader.dataset),
            "metric": metric,
            "num_layers": sweep["num_layers"],
            "exit_layers": sweep["exit_layers"],
            "full_depth": reference,
            "rows": test_rows,
        },
        "oracle": oracle,
    }


def calibration_markdown(result: Mapping[str, Any]) -> str:
    """Selected thresholds, the test-split table and the oracle ceiling, as markdown."""
    metric, tol = result["metric"], result["tolerance"]
    chosen = ", ".join(
        f"`{p}`: {'exits off (no threshold within tolerance)' if t is None else t}" for p, t in result["selected"].items()
    )
    oracle = result["oracle"]
    return "\n".join([
        f"Tolerance: {tol * 100:g}% relative {metric} drop against full depth on `{result['calib_split']}`.",
        f"Calibrated thresholds (lowest within tolerance): {chosen}.",
        "",
        f"## Test split `{result['test_split']}`",
        "",
        sweep_markdown(result["test"]),
        "## Oracle exit (ceiling at zero quality loss)",
        "",
        "Per token, the earliest exit whose argmax equals the full-depth token (teacher-forced over the "
        f"full-depth greedy outputs of `{result['test_split']}`). Layer speedup as the engine runs it (every "
        "allowed exit checked on the way); ideal: only the chosen exit's transformer and head paid.",
        "",
        "| avg exit layer | layer speedup | ideal layer speedup | tokens |",
        "|---|---|---|---|",
        f"| {oracle.get('avg_exit_layer', 0):.2f} | {oracle.get('layer_speedup', 1):.2f}x | "
        f"{oracle.get('ideal_layer_speedup', 1):.2f}x | {oracle.get('num_tokens', 0)} |",
        "",
        f"## Calibration sweep on `{result['calib_split']}`",
        "",
        sweep_markdown(result["calibration"]),
    ])


def write_calibration(result: Mapping[str, Any], out_dir: str) -> Dict[str, str]:
    """DIR/calibration.{json,md}, DIR/calib_sweep.{json,md,png}, DIR/exit_histogram.png."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {f"calib_sweep_{k}": v for k, v in write_sweep(result["calibration"], out_dir, "calib_sweep").items()}
    paths["json"] = os.path.join(out_dir, "calibration.json")
    paths["md"] = os.path.join(out_dir, "calibration.md")
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(f"# Calibration: {result['cfg_path']}\n\n" + calibration_markdown(result))
    histograms = {f"{r['kv_policy']} @ {r['exit_threshold']:g}": r["histogram"] for r in result["test"]["rows"]}
    histograms["oracle"] = result["oracle"]["histogram"]
    paths["histogram_png"] = plot_exit_histograms(
        histograms, os.path.join(out_dir, "exit_histogram.png"), f"Tokens by layers run on {result['test_split']}"
    )
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    parser = argparse.ArgumentParser(description="Calibrate the exit threshold on one split and report it on another.")
    add_project_arguments(parser)
    add_grid_arguments(parser)
    parser.add_argument("--calib-split", default="val")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest relative quality drop (0.01 = 1%%)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    check_tolerance(args.tolerance)
    project = project_from_args(args)
    result = run_calibration(project, args.calib_split, args.test_split, args.tolerance, args.thresholds, args.policies,
                             args.confidence, args.min_exit_layer, args.metric, args.max_samples, args.dataset,
                             progress=not args.no_progress)
    paths = write_calibration(result, args.out)
    print(calibration_markdown(result))
    print(f"calibration written to {paths['md']} ({paths['json']})")
    return paths


if __name__ == "__main__":
    main()
