"""One report from the evaluation outputs: report.md + report.json + the PNGs in one directory.

    python -m lavis_free.evaluation.report --calibration DIR/calibration.json \
        [--sweep DIR/sweep.json] [--exit-quality DIR/exit_quality.json] --out DIR

Gathers the calibration (calibrated threshold, test-split figures against full depth, oracle
ceiling, calibration sweep), an optional separate sweep, and the exit-quality report of exit
training (`lavis_free.reports.exit_quality`) when given; copies their PNGs next to report.md and
prints a short summary. Why a separate step: each input is produced by a command that can run
on its own (and on another machine); the report only reads their JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence

from tqdm import tqdm

from lavis_free.evaluation.calibrate import calibration_markdown
from lavis_free.evaluation.sweep import sweep_markdown

# PNGs each input's command writes next to its JSON
COMPANION_PNGS = {
    "calibration": ("calib_sweep.png", "exit_histogram.png"),
    "sweep": ("sweep.png",),
    "exit_quality": ("exit_quality.png", "exit_parameters.png"),
}


def _load(path: str, flag: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    with open(path) as f:
        return json.load(f)


def summary_lines(calibration: Mapping[str, Any]) -> List[str]:
    """A few lines: the calibrated threshold(s), their test figures, the oracle ceiling."""
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
                f"at full depth ({-row['relative_drop'] * 100:+.1f}%), avg exit layer {row['avg_exit_layer']:.2f}/"
                f"{test['num_layers']}, layer speedup {row['layer_speedup']:.2f}x, wall-clock speedup "
                f"{row['wallclock_speedup']:.2f}x ({row['tokens_per_s']:.0f} vs {row['full_depth_tokens_per_s']:.0f} tokens/s)"
            )
    oracle = calibration["oracle"]
    if oracle.get("num_tokens"):
        lines.append(f"oracle exit ceiling on {test['split']} (zero quality loss): avg exit layer "
                     f"{oracle['avg_exit_layer']:.2f}, layer speedup {oracle['layer_speedup']:.2f}x with the engine's "
                     f"exit checks ({oracle['ideal_layer_speedup']:.2f}x without them)")
    return lines


def exit_quality_markdown(report: Mapping[str, Any]) -> str:
    """The exit-quality table (top-1 accuracy / agreement with the final layer per layer)."""
    from lavis_free.reports.exit_quality import format_table

    rows = [line.split(" | ") for line in format_table(report).splitlines()]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return (f"Teacher-forced on `{report['split']}`; cells are top-1 accuracy / agreement with the final layer.\n\n"
            + "\n".join(lines) + "\n")


def build_report(calibration: Mapping[str, Any], sweep: Optional[Mapping[str, Any]] = None,
                 exit_quality: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """report.json's content: the inputs as given plus the summary lines."""
    report: Dict[str, Any] = {"summary": summary_lines(calibration), "calibration": dict(calibration)}
    if sweep is not None:
        report["sweep"] = dict(sweep)
    if exit_quality is not None:
        report["exit_quality"] = dict(exit_quality)
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
    if "sweep" in report:
        parts += ["", "## Threshold sweep", "", sweep_markdown(report["sweep"])]
        parts += [f"![{name}]({name})" for name in images.get("sweep", [])]
    if "exit_quality" in report:
        parts += ["", "## Exit quality (exit training)", "", exit_quality_markdown(report["exit_quality"])]
        parts += [f"![{name}]({name})" for name in images.get("exit_quality", [])]
    return "\n".join(parts) + "\n"


def write_report(out_dir: str, calibration_path: str, sweep_path: Optional[str] = None,
                 exit_quality_path: Optional[str] = None, progress: bool = True) -> Dict[str, str]:
    """Reads the inputs, copies their PNGs into `out_dir`, writes report.md and report.json."""
    inputs = {"calibration": calibration_path, "sweep": sweep_path, "exit_quality": exit_quality_path}
    loaded = {k: _load(p, f"--{k.replace('_', '-')}") for k, p in inputs.items() if p}
    os.makedirs(out_dir, exist_ok=True)
    images: Dict[str, List[str]] = {}
    for kind in tqdm([k for k in inputs if k in loaded], desc="report", disable=not progress):
        source_dir = os.path.dirname(os.path.abspath(inputs[kind]))
        for name in COMPANION_PNGS[kind]:
            source = os.path.join(source_dir, name)
            if os.path.isfile(source):
                target = os.path.join(out_dir, name)
                if os.path.abspath(source) != os.path.abspath(target):
                    shutil.copyfile(source, target)
                images.setdefault(kind, []).append(name)
    report = build_report(loaded["calibration"], loaded.get("sweep"), loaded.get("exit_quality"))
    paths = {"md": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "report.json")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(report_markdown(report, images))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    parser = argparse.ArgumentParser(description="Gather calibration, sweep and exit-quality outputs into one report.")
    parser.add_argument("--calibration", required=True, help="calibration.json (lavis_free.evaluation.calibrate)")
    parser.add_argument("--sweep", default=None, help="sweep.json (lavis_free.evaluation.sweep), optional")
    parser.add_argument("--exit-quality", default=None, help="exit_quality.json (lavis_free.reports.exit_quality), optional")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    paths = write_report(args.out, args.calibration, args.sweep, args.exit_quality, progress=not args.no_progress)
    with open(paths["json"]) as f:
        print("\n".join(json.load(f)["summary"]))
    print(f"report: {os.path.abspath(paths['md'])}")
    return paths


if __name__ == "__main__":
    main()
