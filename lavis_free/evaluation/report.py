"""One report from the evaluation outputs: report.md + report.json + the PNGs in one directory.

    python -m lavis_free.evaluation.report --calibration DIR/calibration.json \
        [--sweep DIR/sweep.json] [--exit-quality DIR/exit_quality.json] [--tasks DIR/tasks.json \
        --task-calibration vqa=DIR/calibration.json ...] --out DIR

Gathers the calibration (calibrated threshold, test-split figures against full depth, oracle
ceiling, calibration sweep), an optional separate sweep, the exit-quality report of exit
training (`lavis_free.reports.exit_quality`), the frontier, exits by kind, and the per-task table
(`lavis_free.evaluation.task_table`) with one calibration per task, when given; copies their PNGs next to report.md and
prints a short summary. Why a separate step: each input is produced by a command that can run
on its own (and on another machine); the report only reads their JSON. Every figure names its
unit: time per sample (one caption or answer), throughput per token, depth in decoder layers run.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from tqdm import tqdm

from lavis_free.evaluation.calibrate import calibration_markdown
from lavis_free.evaluation.outputs import atomic_write, prepare_output_dir, read_result
from lavis_free.evaluation.sweep import sweep_markdown
from lavis_free.evaluation.task_table import parse_named, tasks_markdown

# each input: the top-level keys its JSON must have and the command that writes it
INPUTS = {
    "calibration": (("selected", "test", "oracle", "calibration"), "python -m lavis_free.evaluation.calibrate"),
    "sweep": (("full_depth", "rows"), "python -m lavis_free.evaluation.sweep"),
    "exit_quality": (("quality", "parameters"), "python -m lavis_free.reports.exit_quality"),
    "frontier": (("meta", "rows"), "python bench/frontier.py"),
    "exits_by_kind": (("counts", "threshold"), "python -m lavis_free.evaluation.exits_by_kind"),
    "tasks": (("rows", "average"), "python -m lavis_free.evaluation.task_table"),
}
# PNGs each input's command writes next to its JSON
COMPANION_PNGS = {
    "calibration": ("calib_sweep.png", "exit_histogram.png"),
    "sweep": ("sweep.png",),
    "exit_quality": ("exit_quality.png", "exit_parameters.png"),
    "frontier": ("frontier.png",),
    "exits_by_kind": ("exits_by_kind.png",),
    "tasks": ("tasks.png",),
}


def summary_lines(calibration: Mapping[str, Any]) -> List[str]:
    """A few lines: the calibrated threshold(s), their test figures, the oracle ceiling. The
    wall-clock speedup is printed beside the per-sample times it is the ratio of; tokens/s come
    with the token counts, since early exit can change how many tokens a caption has."""
    metric, test = calibration["metric"], calibration["test"]
    full = test["full_depth"]
    lines = []
    for policy, threshold in calibration["selected"].items():
        head = (f"calibrated threshold ({policy}, at most {calibration['tolerance'] * 100:g}% relative {metric} drop on "
                f"{calibration['calib_split']}): {'none, exits off' if threshold is None else threshold}")
        lines.append(head)
        row = next((r for r in test["rows"] if r["kv_policy"] == policy), None)
        if row is not None:
            lines.append(
                f"  {test['split']} ({test['num_samples']} samples): {metric} {row['quality']:.3f} vs {full['quality']:.3f} "
                f"at full depth ({-row['relative_drop'] * 100:+.1f}%), avg layers run {row['avg_exit_layer']:.2f} of "
                f"{test['num_layers']}, layer-count speedup {row['layer_speedup']:.2f}x"
            )
            lines.append(
                f"  wall-clock speedup {row['wallclock_speedup']:.2f}x per sample ({row['ms_per_sample']:.1f} vs "
                f"{row['full_depth_ms_per_sample']:.1f} ms per sample at full depth); throughput "
                f"{row['tokens_per_s']:.0f} vs {row['full_depth_tokens_per_s']:.0f} tokens/s "
                f"({row['num_tokens']} vs {row['full_depth_num_tokens']} tokens generated)"
            )
    oracle = calibration["oracle"]
    if oracle.get("num_tokens"):
        lines.append(f"oracle exit ceiling on {test['split']} (zero quality loss): avg layers run "
                     f"{oracle['avg_exit_layer']:.2f} of {test['num_layers']}, layer-count speedup "
                     f"{oracle['layer_speedup']:.2f}x with the engine's exit checks "
                     f"({oracle['ideal_layer_speedup']:.2f}x without them)")
    return lines


def exit_quality_markdown(report: Mapping[str, Any]) -> str:
    """The exit-quality table (top-1 accuracy / agreement with the final layer per layer)."""
    from lavis_free.reports.exit_quality import format_table

    rows = [line.split(" | ") for line in format_table(report).splitlines()]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return (f"Teacher-forced on `{report['split']}`; cells are top-1 accuracy / agreement with the final layer.\n\n"
            + "\n".join(lines) + "\n")


def frontier_markdown(frontier: Mapping[str, Any]) -> str:
    """One row per (method, setting): quality and both speedups against LAVIS's own decoding."""
    meta = frontier["meta"]
    beams = meta.get("num_beams", 1)
    decoding = "greedy" if beams == 1 else f"{beams}-beam"
    lines = [f"{meta['num_images']} test images at batch {meta['batch']}; speedups against LAVIS's own {decoding} "
             "`generate` on the same weights (wall-clock per caption, whole caption).", "",
             "| method | threshold (static: layers run) | CIDEr | rel. drop | layers run per token | layer speedup | wall-clock speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in frontier["rows"]:
        lines.append(f"| {r['method']} | {r['setting']} | {r['CIDEr']:.3f} | {100 * r['cider_rel_drop']:.1f}% | "
                     f"{r['avg_layers']:.2f} | {r['layer_speedup']:.2f}x | {r['wall_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def exits_by_kind_markdown(histogram: Mapping[str, Any]) -> str:
    """Per token kind, the share of its tokens that ran each depth."""
    depths = [*histogram["exits_layers_run"], histogram["num_layers"]]
    lines = [f"Generated tokens after the first, at threshold {histogram['threshold']}; cells: share of the kind's tokens "
             "that ran that many layers.", "",
             "| kind | tokens | " + " | ".join(f"{d} layers" for d in depths) + " |", "|---" * (len(depths) + 2) + "|"]
    for kind, counts in histogram["counts"].items():
        total = sum(counts.values())
        lines.append(f"| {kind} | {total} | " + " | ".join(f"{counts.get(str(d), 0) / total:.0%}" for d in depths) + " |")
    return "\n".join(lines) + "\n"


SECTIONS = (("tasks", "Every task: full depth vs exits (the paper's table)", tasks_markdown),
            ("sweep", "Threshold sweep", sweep_markdown), ("exit_quality", "Exit quality (exit training)", exit_quality_markdown),
            ("frontier", "Speed-quality frontier per method", frontier_markdown),
            ("exits_by_kind", "Where tokens leave, by kind of word", exits_by_kind_markdown))


def build_report(calibration: Mapping[str, Any], **optional: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """report.json's content: the inputs as given plus the summary lines."""
    report: Dict[str, Any] = {"summary": summary_lines(calibration), "calibration": dict(calibration)}
    report.update({name: dict(value) for name, value in optional.items() if value is not None})
    return report


def report_markdown(report: Mapping[str, Any], images: Mapping[str, List[str]]) -> str:
    calibration = report["calibration"]
    parts = [
        f"# FREE early exits: {calibration['cfg_path']}",
        "",
        "## Summary",
        "",
        "```",
        *report["summary"],
        "```",
        "",
        "![exit layers](exit_histogram.png)" if "exit_histogram.png" in images.get("calibration", []) else "",
        "",
        calibration_markdown(calibration),
    ]
    parts += [f"![{name}]({name})" for name in images.get("calibration", []) if name != "exit_histogram.png"]
    for key, title, markdown in SECTIONS:
        if key in report:
            parts += ["", f"## {title}", "", markdown(report[key])]
            parts += [f"![{name}]({name})" for name in images.get(key, [])]
            if key == "tasks":
                for task, result in report.get("task_calibrations", {}).items():
                    demoted = "\n".join("##" + line if line.startswith("## ") else line
                                         for line in calibration_markdown(result).splitlines())
                    parts += ["", f"### {task}: full depth vs calibrated exits ({result['cfg_path']})", "", demoted]
                    parts += [f"![{name}]({name})" for name in images.get(f"calibration:{task}", [])]
    return "\n".join(parts) + "\n"


def _copy_pngs(source_dir: Path, names: Sequence[str], out: Path, prefix: str = "") -> List[str]:
    """Copies the PNGs that exist into `out` (as `prefix + name`); returns their new names."""
    copied = []
    for name in names:
        source, target = source_dir / name, out / f"{prefix}{name}"
        if source.is_file():
            if source != target.resolve():
                atomic_write(target, source.read_bytes())
            copied.append(target.name)
    return copied


def write_report(out_dir: str, calibration_path: str, sweep_path: Optional[str] = None,
                 exit_quality_path: Optional[str] = None, progress: bool = True, frontier_path: Optional[str] = None,
                 exits_by_kind_path: Optional[str] = None, tasks_path: Optional[str] = None,
                 task_calibration_paths: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Reads the inputs, copies their PNGs into `out_dir`, writes report.md and report.json.
    `task_calibration_paths` (task name -> calibration.json of that task's project) become
    subsections of the tasks section, their PNGs prefixed with the task name."""
    out = prepare_output_dir(out_dir)
    inputs = {"calibration": calibration_path, "sweep": sweep_path, "exit_quality": exit_quality_path,
              "frontier": frontier_path, "exits_by_kind": exits_by_kind_path, "tasks": tasks_path}
    loaded = {k: read_result(p, f"--{k.replace('_', '-')}", *INPUTS[k]) for k, p in inputs.items() if p}
    task_calibrations = {task: read_result(path, "--task-calibration", *INPUTS["calibration"])
                         for task, path in (task_calibration_paths or {}).items()}
    images: Dict[str, List[str]] = {}
    for kind in tqdm([k for k in inputs if k in loaded], desc="report", disable=not progress):
        images[kind] = _copy_pngs(Path(inputs[kind]).resolve().parent, COMPANION_PNGS[kind], out)
    for task, path in (task_calibration_paths or {}).items():
        images[f"calibration:{task}"] = _copy_pngs(Path(path).resolve().parent, COMPANION_PNGS["calibration"], out,
                                                   prefix=f"{task}_")
    report = build_report(loaded["calibration"], **{k: v for k, v in loaded.items() if k != "calibration"})
    if task_calibrations:
        report["task_calibrations"] = task_calibrations
    paths = {"md": str(out / "report.md"), "json": str(out / "report.json")}
    atomic_write(paths["json"], json.dumps(report, indent=2))
    atomic_write(paths["md"], report_markdown(report, images))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    parser = argparse.ArgumentParser(description="Gather calibration, sweep and exit-quality outputs into one report.")
    parser.add_argument("--calibration", required=True, help="calibration.json (lavis_free.evaluation.calibrate)")
    parser.add_argument("--sweep", default=None, help="sweep.json (lavis_free.evaluation.sweep), optional")
    parser.add_argument("--exit-quality", default=None, help="exit_quality.json (lavis_free.reports.exit_quality), optional")
    parser.add_argument("--frontier", default=None, help="frontier.json (bench/frontier.py), optional")
    parser.add_argument("--exits-by-kind", default=None, help="exits_by_kind.json (lavis_free.evaluation.exits_by_kind), optional")
    parser.add_argument("--tasks", default=None, help="tasks.json (lavis_free.evaluation.task_table), optional")
    parser.add_argument("--task-calibration", type=parse_named("--task-calibration", "vqa=DIR/calibration.json"),
                        action="append", default=[],
                        help="NAME=calibration.json of one task's project (a subsection of the tasks section), repeatable")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    paths = write_report(args.out, args.calibration, args.sweep, args.exit_quality, progress=not args.no_progress,
                         frontier_path=args.frontier, exits_by_kind_path=args.exits_by_kind, tasks_path=args.tasks,
                         task_calibration_paths=dict(args.task_calibration))
    with open(paths["json"]) as f:
        print("\n".join(json.load(f)["summary"]))
    print(f"report: {os.path.abspath(paths['md'])}")
    return paths


if __name__ == "__main__":
    main()
