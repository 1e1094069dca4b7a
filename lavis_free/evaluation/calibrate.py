"""Threshold calibration on one split, reported on another, with the oracle exit as the ceiling.

    python -m lavis_free.evaluation.calibrate --cfg-path projects/free/shapes_caption.yaml \
        --calib-split val --test-split test --tolerance 0.01 [--metric CIDEr] --out DIR

For each KV policy, the calibrated threshold is the most aggressive one (the lowest: the most
exits) whose quality on the calibration split stays within `tolerance` (relative) of full depth
there; a policy with no such threshold is reported as "exits off". The test split is then decoded
at full depth (which also gives the oracle exit) and at each calibrated threshold. Writes
DIR/calibration.json, .md, the calibration sweep (calib_sweep.*), and exit_histogram.png (tokens by
layers run at each calibrated threshold against the oracle). DIR is checked before anything is
decoded; calib_sweep.{json,md} and calibration.json are rewritten (atomically) after every
measured setting, so a stopped run keeps what it measured (`"complete": false`), and the
markdown report and plots are written once it is complete.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from tqdm import tqdm

from lavis_free.evaluation.oracle import capture_decodes, is_plain_greedy, oracle_figures, oracle_stats
from lavis_free.evaluation.outputs import atomic_write, prepare_output_dir
from lavis_free.evaluation.plots import plot_exit_histograms
from lavis_free.evaluation.runs import (
    FULL_DEPTH,
    Project,
    add_project_arguments,
    check_scored_split,
    default_metric,
    project_from_args,
    run_setting,
    scored_loader,
    warm_up,
)
from lavis_free.evaluation.sweep import (
    add_grid_arguments,
    compared_figures,
    relative_drop,
    run_sweep,
    sweep_markdown,
    sweep_paths,
    write_sweep,
)


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
                    progress: bool = True, on_update: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Sweeps `calib_split`, selects a threshold per policy, reports them and the oracle on `test_split`.
    `on_update(result)` is called with the result so far after every measured setting (`"complete"`
    turns true with the last one), so that a caller can save results as they come."""
    metric = metric or default_metric(project.task)
    result: Dict[str, Any] = {
        "cfg_path": project.cfg_path,
        "metric": metric,
        "tolerance": tolerance,
        "calib_split": calib_split,
        "test_split": test_split,
        "complete": False,
        "selected": None,
        "calibration": None,
        "test": None,
        "oracle": None,
    }
    notify = on_update or (lambda _: None)
    check_scored_split(project, calib_split, "--calib-split")  # both splits checked before any decoding
    loader = scored_loader(project, test_split, max_samples, dataset, "--test-split")

    def swept(table: Dict[str, Any]) -> None:
        result["calibration"] = table
        notify(result)

    sweep = run_sweep(project, calib_split, thresholds, policies, confidence, min_exit_layer, metric,
                      max_samples, dataset, progress, on_row=swept)
    selected = {}
    for policy in policies:
        row = select_threshold([r for r in sweep["rows"] if r["kv_policy"] == policy], sweep["full_depth"]["quality"], tolerance)
        selected[policy] = None if row is None else row["exit_threshold"]
    result["selected"] = selected

    common = {"confidence": confidence, "min_exit_layer": min_exit_layer}
    chosen = [(p, t) for p, t in selected.items() if t is not None]
    warm_up(project, loader, {**common, **({"exit_threshold": chosen[0][1]} if chosen else FULL_DEPTH)})
    bar = tqdm(total=len(chosen) + 2, desc=f"test {test_split}", disable=not progress)
    with capture_decodes(project.model) as calls:
        full = run_setting(project, loader, test_split, {**common, **FULL_DEPTH}, "full depth", progress)
    bar.update()
    reference = compared_figures(full, None, metric)
    result["oracle"] = oracle_figures(oracle_stats(project.model, calls))
    # the oracle is defined on greedy decoding: for a ranking metric (VisDial) it describes the
    # task's generated answers, not the decoding the metric judges; beams have none
    if not any(is_plain_greedy(call.options) for call in calls):
        result["oracle"]["of"] = "none (beam search, sampling or logits processors: no oracle)"
    else:
        result["oracle"]["of"] = "generated answers" if project.task.headline_decoding else "generated tokens"
    bar.update()
    result["test"] = {
        "split": test_split,
        "num_samples": len(loader.dataset),
        "metric": metric,
        "num_layers": sweep["num_layers"],
        "exit_layers": sweep["exit_layers"],
        "num_settings": len(chosen),
        "complete": not chosen,
        "full_depth": reference,
        "rows": [],
    }
    result["complete"] = not chosen
    notify(result)
    for policy, threshold in chosen:
        run = run_setting(project, loader, test_split, {**common, "exit_threshold": threshold, "kv_policy": policy},
                          f"{policy} {threshold}", progress)
        result["test"]["rows"].append(compared_figures(run, reference, metric))
        result["complete"] = result["test"]["complete"] = len(result["test"]["rows"]) == len(chosen)
        notify(result)
        bar.update()
    bar.close()
    return result


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
        f"## Oracle exit (ceiling at zero quality loss{', of the generated answers' if oracle.get('of') == 'generated answers' else ''})",
        "",
        f"Not measured: {oracle['of']}." if str(oracle.get("of", "")).startswith("none") else "",
        "",
        ("The ranking the metric judges has no oracle here: the rows below are the task's generated answers. "
         if oracle.get("of") == "generated answers" else "")
        + "Per token, the earliest exit whose argmax equals the full-depth token (teacher-forced over the "
        f"full-depth greedy outputs of `{result['test_split']}`). Layer-count speedup as the engine runs it "
        "(every allowed exit checked on the way); ideal: only the chosen exit's transformer and head paid.",
        "",
        "| avg layers run | layer-count speedup | ideal layer-count speedup | tokens |",
        "|---|---|---|---|",
        f"| {oracle.get('avg_exit_layer', 0):.2f} | {oracle.get('layer_speedup', 1):.2f}x | "
        f"{oracle.get('ideal_layer_speedup', 1):.2f}x | {oracle.get('num_tokens', 0)} |",
        "",
        f"## Calibration sweep on `{result['calib_split']}`",
        "",
        sweep_markdown(result["calibration"]),
    ])


def calibration_paths(out_dir: Union[str, Path]) -> Dict[str, str]:
    """Every file `write_calibration` writes once the result is complete."""
    out = Path(out_dir)
    paths = {f"calib_sweep_{k}": v for k, v in sweep_paths(out, "calib_sweep").items()}
    paths.update(json=str(out / "calibration.json"), md=str(out / "calibration.md"),
                 histogram_png=str(out / "exit_histogram.png"))
    return paths


def write_calibration(result: Mapping[str, Any], out_dir: Union[str, Path]) -> Dict[str, str]:
    """DIR/calib_sweep.{json,md} and DIR/calibration.json as far as measured; with a complete
    result also DIR/calibration.md, DIR/calib_sweep.png and DIR/exit_histogram.png."""
    paths = calibration_paths(out_dir)
    # the sweep changes only until the test split starts: not redrawn for every test row
    if result["calibration"] is not None and (result["test"] is None or result["complete"]):
        write_sweep(result["calibration"], out_dir, "calib_sweep")
    atomic_write(paths["json"], json.dumps(result, indent=2))
    if result["complete"]:
        atomic_write(paths["md"], f"# Calibration: {result['cfg_path']}\n\n" + calibration_markdown(result))
        histograms = {f"{r['kv_policy']} @ {r['exit_threshold']:g}": r["histogram"] for r in result["test"]["rows"]}
        histograms["oracle"] = result["oracle"]["histogram"]
        plot_exit_histograms(histograms, paths["histogram_png"], f"Tokens by decoder layers run on {result['test_split']}")
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
    out = prepare_output_dir(args.out)
    project = project_from_args(args)
    result = run_calibration(project, args.calib_split, args.test_split, args.tolerance, args.thresholds, args.policies,
                             args.confidence, args.min_exit_layer, args.metric, args.max_samples, args.dataset,
                             progress=not args.no_progress, on_update=lambda partial: write_calibration(partial, out))
    paths = calibration_paths(out)
    print(calibration_markdown(result))
    print(f"calibration written to {paths['md']} ({paths['json']})")
    return paths


if __name__ == "__main__":
    main()
