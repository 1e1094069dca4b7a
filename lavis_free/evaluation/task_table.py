"""The paper's table: each task at full depth and with exits, its speedups and where its time goes.

    python -m lavis_free.evaluation.task_table --split test --out DIR \
        --project captioning=projects/free/shapes_caption_frozen_lm.yaml \
        --project vqa=projects/free/shapes_vqa_frozen_lm.yaml \
        --project dialogue=projects/free/shapes_visdial_frozen_lm.yaml

Per project: the split decoded at full depth (exits off), then with exits at the model's
threshold (`exits.inference`, or `--threshold`), each batch also decoded at full depth right
beside it (the wall-clock speedup compares timings taken under the same load). One row per
decoding the task times: captioning and VQA generate; VisDial ranks its 100 options (MRR, NDCG,
R@1) and generates answers (answer accuracy), two rows. Each row: the task's metrics at full
depth and with exits, the relative change of its headline metric, the average decoder layers
run per token, the layer-count and wall-clock speedups (tallies of `lavis_free.tasks.exit_eval`)
and the time split of both decodings (image side, prefill, cache copies for VisDial's options,
token loop: only the token loop is what exits shorten). The last row averages the speedups over the rows.

`--options` (LAVIS style) go to every project, except that a `datasets.<name>.*` key goes only
to the projects that have dataset <name> (so one `--options` line can point each project's
data somewhere else). Writes DIR/tasks.json, DIR/tasks.md and DIR/tasks.png (speedups per row,
and the time split).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from omegaconf import OmegaConf

from lavis_free.evaluation.outputs import atomic_write, prepare_output_dir
from lavis_free.evaluation.plots import OUTSIDE_RIGHT, new_figure, save_figure
from lavis_free.evaluation.runs import FULL_DEPTH, Project, load_project, run_setting, scored_loader, warm_up
from lavis_free.hosts import exits_of
from lavis_free.tasks import FreeCaptionTask, FreeDialogueTask, FreeVisDialTask, FreeVQATask
from lavis_free.tasks.exit_eval import TIME_PARTS

# Per decoding of a task (its `exit_decodings` prefix): its name and the metrics it is judged by.
# Generation rows of VisDial are judged by the generated answers; ranking rows by the ranks.
METRICS = {
    FreeCaptionTask: {"": ("captioning", ("CIDEr", "Bleu_4"))},
    FreeVQATask: {"": ("VQA", ("accuracy",))},
    FreeDialogueTask: {"": ("dialogue answers", ("accuracy",))},
    FreeVisDialTask: {"ranking_": ("dialogue ranking", ("mrr", "ndcg", "r@1")),
                      "": ("dialogue answers", ("answer_accuracy",))},
}


def parse_named(flag: str, example: str, value_type: Callable[[str], Any] = str):
    """An argparse type for `NAME=VALUE`, the value converted by `value_type`."""

    def parse(text: str) -> Tuple[str, Any]:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected NAME=VALUE, e.g. {example}")
        try:
            return name, value_type(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: {value!r} is not a {value_type.__name__}") from None

    return parse


def threshold_value(text: str) -> Union[float, str]:
    """A `--threshold` value: a number, or "off" (the task's calibration found none: exits off)."""
    return "off" if text == "off" else float(text)


def task_rows(name: str, project: Project, split: str, threshold: Union[None, float, str], max_samples: Optional[int],
              progress: bool = True) -> List[Dict[str, Any]]:
    """The rows of one project (module docstring)."""
    if type(project.task) not in METRICS:
        raise ValueError(f"{project.cfg_path}: run.task must be free_captioning, free_vqa, free_dialogue or free_visdial, "
                         f"got a {type(project.task).__name__}")
    inference = exits_of(project.model).config.inference
    chosen = inference.exit_threshold if threshold is None else threshold
    if chosen is None:
        raise ValueError(f"{project.cfg_path}: the model has no calibrated threshold (exits.inference.exit_threshold); pass --threshold")
    settings = FULL_DEPTH if chosen == "off" else {"exit_threshold": float(chosen)}
    loader = scored_loader(project, split, max_samples)
    warm_up(project, loader, settings)
    full = run_setting(project, loader, split, FULL_DEPTH, desc=f"{name}: full depth", progress=progress)
    exits = run_setting(project, loader, split, settings, desc=f"{name}: exits at {chosen}", progress=progress)
    rows = []
    for prefix, (decoding, metrics) in METRICS[type(project.task)].items():
        if not exits.tallies[prefix].tokens:  # a decoding the project turned off (run.generate_answers: false)
            continue
        summary = exits.tallies[prefix].summary()
        tally = exits.tallies[prefix]
        samples = max(len(exits.results), 1)
        headline = metrics[0]
        before, after = float(full.metrics[headline]), float(exits.metrics[headline])
        rows.append({
            "project": name, "cfg_path": project.cfg_path, "task": decoding, "split": split,
            "num_samples": len(exits.results), "exit_threshold": chosen, "headline_metric": headline,
            "full_depth": {m: full.metrics[m] for m in metrics if m in full.metrics},
            "exits": {m: exits.metrics[m] for m in metrics if m in exits.metrics},
            "relative_change": (after - before) / before if before else 0.0,
            "avg_exit_layer": summary["avg_exit_layer"], "num_layers": summary["num_layers"],
            "layer_speedup": summary["layer_speedup"], "wallclock_speedup": summary.get("wallclock_speedup", 1.0),
            "num_tokens": summary["num_tokens"],
            # ms per sample of each part, for the early-exit decoding and the full-depth one beside it
            "time_split_ms": {p: 1000 * getattr(tally, f"time_{p}") / samples for p in TIME_PARTS},
            "full_depth_time_split_ms": {p: 1000 * getattr(tally, f"full_time_{p}") / samples for p in TIME_PARTS},
        })
    return rows


def options_for(cfg_path: str, options: Sequence[str]) -> List[str]:
    """The `--options` that apply to this project (module docstring)."""
    datasets = set(OmegaConf.load(cfg_path).get("datasets", {}) or {})
    kept = []
    for option in options:
        parts = option.split("=", 1)[0].split(".")
        if parts[0] == "datasets" and len(parts) > 1 and parts[1] not in datasets:
            continue
        kept.append(option)
    return kept


def average_row(rows: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
    """The mean speedups over the tasks (the paper averages over its tasks): the rows of one
    project (VisDial's ranking and answers) are averaged first, so each task counts once."""
    by_task: Dict[str, List[Mapping[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row["project"], []).append(row)
    keys = ("layer_speedup", "wallclock_speedup")
    per_task = [{k: sum(r[k] for r in task) / len(task) for k in keys} for task in by_task.values()]
    return {**{k: sum(t[k] for t in per_task) / len(per_task) for k in keys}, "num_tasks": len(per_task)}


def _metric_text(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" if v <= 1.0 or k.lower().startswith("cider") else f"{k} {v:.2f}" for k, v in values.items())


def tasks_markdown(table: Mapping[str, Any]) -> str:
    rows = table["rows"]
    lines = [
        f"Tasks on the {rows[0]['split']} split, full depth vs exits at each task's threshold (its own "
        "calibration's, or the model's); VQA and answer accuracy in percent, MRR, NDCG and R@1 as fractions:",
        "",
        "| task | metric at full depth | with exits | change | layers run | layer speedup | wall-clock speedup | "
        "ms per sample, image / prefill / cache copies / token loop: with exits (full depth) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = " / ".join(f"{r['time_split_ms'][p]:.1f} ({r['full_depth_time_split_ms'][p]:.1f})" for p in TIME_PARTS)
        lines.append(
            f"| {r['task']} (threshold {r['exit_threshold']}) | {_metric_text(r['full_depth'])} | {_metric_text(r['exits'])} | "
            f"{100 * r['relative_change']:+.1f}% {r['headline_metric']} | {r['avg_exit_layer']:.2f} of {r['num_layers']} | "
            f"{r['layer_speedup']:.2f}x | {r['wallclock_speedup']:.2f}x | {share} |"
        )
    avg = table["average"]
    lines.append(f"| **average over {avg['num_tasks']} tasks** (a task's rows averaged first) | | | | | "
                 f"{avg['layer_speedup']:.2f}x | {avg['wallclock_speedup']:.2f}x | |")
    return "\n".join(lines) + "\n"


def tasks_figure(table: Mapping[str, Any]):
    """Left: layer-count and wall-clock speedup per row. Right: time per sample by part, the
    full-depth decoding (F) beside the early-exit one (E) of each row."""
    rows = table["rows"]
    names = [r["task"] for r in rows]
    fig, (speed, split) = new_figure(11.0, 4.2, ncols=2)
    xs = range(len(rows))
    width = 0.38
    speed.bar([x - width / 2 for x in xs], [r["layer_speedup"] for r in rows], width, label="layer-count")
    speed.bar([x + width / 2 for x in xs], [r["wallclock_speedup"] for r in rows], width, label="wall-clock")
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_xticks(list(xs), names, rotation=15, fontsize=8)
    speed.set_ylabel("speedup over full depth (x)")
    speed.set_title("Speedup with exits, per task")
    speed.legend(fontsize=8)
    colours = {"image": "tab:grey", "prefill": "tab:blue", "copy": "tab:purple", "decode": "tab:orange"}
    for offset, key, tag in ((-width / 2, "full_depth_time_split_ms", "F"), (width / 2, "time_split_ms", "E")):
        bottom = [0.0] * len(rows)
        for part in TIME_PARTS:
            values = [r[key][part] for r in rows]
            split.bar([x + offset for x in xs], values, width * 0.95, bottom=bottom, color=colours[part],
                      label={"decode": "token loop", "copy": "cache copies"}.get(part, part) if tag == "F" else None)
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, top in zip(xs, bottom):
            split.text(x + offset, top, tag, ha="center", va="bottom", fontsize=7)
    split.set_xticks(list(xs), names, rotation=15, fontsize=8)
    split.set_ylabel("ms per sample")
    split.set_title("Where the time goes: F full depth, E with exits")
    split.legend(**OUTSIDE_RIGHT)
    fig.suptitle(f"Tasks on shapes {rows[0]['split']}: exits vs full depth")
    fig.tight_layout()
    return fig


def write_tasks(table: Mapping[str, Any], out: Path) -> Dict[str, str]:
    paths = {"json": str(out / "tasks.json"), "md": str(out / "tasks.md"), "png": str(out / "tasks.png")}
    atomic_write(paths["json"], json.dumps(table, indent=2))
    atomic_write(paths["md"], tasks_markdown(table))
    save_figure(tasks_figure(table), paths["png"])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    parser = argparse.ArgumentParser(description="Per-task table: full depth vs exits, speedups and time split.")
    parser.add_argument("--project", type=parse_named("--project", "vqa=projects/free/shapes_vqa_frozen_lm.yaml"),
                        action="append", required=True,
                        help="NAME=PROJECT_YAML, once per task (a free_captioning, free_vqa, free_dialogue or free_visdial project)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threshold", type=parse_named("--threshold", "vqa=0.4", threshold_value), action="append",
                        default=[], help="NAME=T: task NAME's threshold (e.g. calibrated on its val split; 'off': exits "
                                         "off); default: its model's exits.inference.exit_threshold")
    parser.add_argument("--options", nargs="+", default=[], help="key=value overrides of every project (module docstring)")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 times tiny models best)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = prepare_output_dir(args.out)
    names = [name for name, _ in args.project]
    # thresholds are checked against [0, 1] by ExitOptions when the project decodes
    thresholds = dict(args.threshold)
    unknown = sorted(set(thresholds) - set(names))
    if unknown or len(set(names)) != len(names):
        parser.error(f"--threshold names {unknown} are not --project names {names}" if unknown
                     else f"--project names must differ, got {names}")
    rows: List[Dict[str, Any]] = []
    for name, cfg_path in args.project:
        project = load_project(cfg_path, options_for(cfg_path, args.options), threads=args.threads)
        rows.extend(task_rows(name, project, args.split, thresholds.get(name), args.max_samples, progress=not args.no_progress))
    table = {"rows": rows, "average": average_row(rows)}
    paths = write_tasks(table, out)
    print(tasks_markdown(table))
    print(f"tasks written to {paths['md']} ({paths['json']}, {paths['png']})")
    return paths


if __name__ == "__main__":
    main()
