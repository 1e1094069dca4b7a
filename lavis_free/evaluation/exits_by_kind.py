"""Which exit each generated token leaves at, by kind of word: does confidence sort easy from hard?

    python -m lavis_free.evaluation.exits_by_kind --cfg-path projects/free/shapes_caption_frozen_lm.yaml \\
        --split test [--threshold T] --out DIR

Captions of the split are decoded greedily at the threshold (default: the model's calibrated
one); every generated token up to EOS is counted at the layers it ran (an exit's, or full depth)
under its kind: the attribute words of the shapes language (colour, shape, size, position,
count), the end of the caption, or a function word (everything else: "a", "the", "in", "and",
"there", ...). Written: exits_by_kind.json and exits_by_kind.png (one bar group per kind,
shares of its tokens per exit).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence

import torch
from lavis.common.registry import registry

from lavis_free.datasets.shapes_language import NUMBER_WORDS, SHAPE_SYNONYMS, SIZE_SYNONYMS, plural
from lavis_free.datasets.shapes_scene import COLOURS
from lavis_free.evaluation.outputs import atomic_write, prepare_output_dir
from lavis_free.evaluation.plots import OUTSIDE_RIGHT, new_figure, save_figure
from lavis_free.hosts import exits_of
from lavis_free.reports.exit_quality import eval_dataset, load_config

KINDS = ("colour", "shape", "size", "position", "count", "function", "end")
_WORD_KIND: Dict[str, str] = {
    **{c: "colour" for c in COLOURS},
    **{w: "shape" for ws in SHAPE_SYNONYMS.values() for s in ws for w in (s, plural(s))},
    **{w: "size" for ws in SIZE_SYNONYMS.values() for s in ws for w in s.split()},
    **{w: "position" for w in ("top", "bottom", "left", "right", "center", "middle", "upper", "lower", "corner", "side")},
    **{w: "count" for w in NUMBER_WORDS + ("single",)},
}


def token_kinds(tokenizer, caption: str) -> List[str]:
    """The kind of each token the LM emitted for `caption` (its BPE pieces, then EOS)."""
    ids = tokenizer(caption, add_special_tokens=False).input_ids
    return [_WORD_KIND.get(tokenizer.decode([i]).strip().lower(), "function") for i in ids] + ["end"]


def histogram(model, dataset, threshold: Optional[float], batch_size: int = 16, max_length: int = 20) -> Dict:
    host = exits_of(model)
    tokenizer = model.opt_tokenizer
    counts: Dict[str, Counter] = defaultdict(Counter)
    skipped = 0
    options = {} if threshold is None else {"exit_threshold": threshold}
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            image = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
            captions, stats = model.generate({"image": image}, num_beams=1, max_length=max_length, return_exit_stats=True, **options)
            for caption, layers in zip(captions, stats["exit_layers"]):
                kinds = token_kinds(tokenizer, caption)
                if len(kinds) == len(layers) + 1:  # stopped by max_length, before any EOS
                    kinds = kinds[:-1]
                if len(kinds) != len(layers):  # the caption's BPE differs from the emitted ids
                    skipped += 1
                    continue
                for kind, layer in zip(kinds[1:], layers[1:]):  # the first token comes from the prefill, at full depth
                    counts[kind][layer] += 1
    return {"threshold": host.exit_options(**options).exit_threshold, "num_layers": host.adapter.num_layers,
            "exits_layers_run": [l + 1 for l in host.config.layers], "skipped_captions": skipped,
            "counts": {k: {str(l): n for l, n in sorted(counts[k].items())} for k in KINDS if counts[k]}}


def figure(report: Dict):
    depths = report["exits_layers_run"] + [report["num_layers"]]
    kinds = list(report["counts"])
    fig, (ax,) = new_figure(10, 4.4)
    width = 0.8 / len(depths)
    for j, depth in enumerate(depths):
        shares = []
        for kind in kinds:
            c = report["counts"][kind]
            shares.append(c.get(str(depth), 0) / max(sum(c.values()), 1))
        label = "full depth" if depth == report["num_layers"] else f"exit after layer {depth - 1}"
        ax.bar([i + (j - (len(depths) - 1) / 2) * width for i in range(len(kinds))], shares, width, label=f"{label} ({depth} layers run)")
    ax.set_xticks(range(len(kinds)), [f"{k}\n({sum(report['counts'][k].values())} tokens)" for k in kinds])
    ax.set_ylabel("share of the kind's tokens")
    ax.set_xlabel("token kind")
    ax.set_ylim(0, 1)
    ax.legend(**OUTSIDE_RIGHT)
    ax.set_title(f"Where tokens leave, by kind (threshold {report['threshold']})")
    fig.tight_layout()
    return fig


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.evaluation.exits_by_kind", description=__doc__.split("\n")[0])
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--threshold", type=float, default=None, help="default: the model's calibrated threshold")
    parser.add_argument("--options", nargs="+", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = prepare_output_dir(args.out)
    config = load_config(args.cfg_path, args.options)
    model = registry.get_model_class(config.model_cfg.arch).from_config(config.model_cfg).eval()
    report = histogram(model, eval_dataset(config, args.split), args.threshold)
    atomic_write(out / "exits_by_kind.json", json.dumps(report, indent=1))
    save_figure(figure(report), out / "exits_by_kind.png")
    for kind, c in report["counts"].items():
        total = sum(c.values())
        print(f"{kind:9s} {total:5d} tokens: " + ", ".join(f"{l} layers {n / total:.0%}" for l, n in c.items()))


if __name__ == "__main__":
    main()
