"""Mid-crisis, both ways: the frozen head on every LM layer of two backbones, side by side.

    python -m lavis_free.reports.mid_crisis --report frozen_lm=A/exit_quality.json \\
        --report end_to_end=B/exit_quality.json --out DIR

The FREE paper's open question 3: are intermediate layers of a frozen LM "not ready to predict"
because it was never trained to read the image queries, while an LM trained end to end with the
vision side would be? Each input is an exit quality report (`lavis_free.reports.exit_quality`,
teacher-forced on the same split), whose `head_on_layer` rows give, per layer, top-1 accuracy
against the caption and agreement with the final layer. Written: mid_crisis.json, mid_crisis.md
(one table) and mid_crisis.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from lavis_free.evaluation.outputs import atomic_write, prepare_output_dir
from lavis_free.evaluation.plots import OUTSIDE_RIGHT, new_figure, save_figure
from lavis_free.reports.exit_quality import HEAD_ON_LAYER


def load_curves(reports: Mapping[str, str]) -> Dict[str, Dict]:
    curves = {}
    for name, path in reports.items():
        report = json.loads(Path(path).read_text())
        curves[name] = {"split": report["split"], "num_tokens": report["quality"]["num_tokens"],
                        "config": report["config"], "layers": report["quality"][HEAD_ON_LAYER]}
    splits = {c["split"] for c in curves.values()}
    if len(splits) > 1:
        raise ValueError(f"--report files score different splits {sorted(splits)}; compare on one split")
    return curves


def markdown_table(curves: Mapping[str, Dict]) -> str:
    names = list(curves)
    lines = ["| layers run | " + " | ".join(f"{n}: accuracy / agreement" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for i in range(max(len(c["layers"]) for c in curves.values())):
        cells = [f"{c['layers'][i]['accuracy']:.3f} / {c['layers'][i]['agreement']:.3f}" if i < len(c["layers"]) else ""
                 for c in curves.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(curves: Mapping[str, Dict]):
    fig, axes = new_figure(12, 4.2, ncols=2)
    for ax, metric, label in zip(axes, ("accuracy", "agreement"), ("top-1 accuracy vs caption", "agreement with final layer")):
        for name, curve in curves.items():
            ax.plot([r["layers_run"] for r in curve["layers"]], [r[metric] for r in curve["layers"]], marker="o", label=name)
        ax.set_xlabel("decoder layers run (frozen final norm + head on the layer)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(label[0].upper() + label[1:], fontsize=10)
    axes[1].legend(**OUTSIDE_RIGHT)
    split = next(iter(curves.values()))["split"]
    fig.suptitle(f"Mid-crisis: the frozen head on every layer, teacher-forced ({split} captions)")
    fig.tight_layout()
    return fig


def write_mid_crisis(reports: Mapping[str, str], out_dir: str) -> Dict[str, Dict]:
    out = prepare_output_dir(out_dir)
    curves = load_curves(reports)
    atomic_write(out / "mid_crisis.json", json.dumps(curves, indent=1))
    atomic_write(out / "mid_crisis.md", markdown_table(curves) + "\n")
    save_figure(figure(curves), out / "mid_crisis.png")
    return curves


def _named(value: str) -> List[str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--report {value!r}: expected NAME=PATH/exit_quality.json")
    return [name, path]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.reports.mid_crisis", description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=_named, action="append", required=True, help="NAME=exit_quality.json (repeat)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    curves = write_mid_crisis(dict(args.report), args.out)
    print(markdown_table(curves))


if __name__ == "__main__":
    main()
