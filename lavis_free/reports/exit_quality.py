"""Exit quality report: parameter counts and per-layer teacher-forced quality (JSON + PNG).

This is the paper's "mid-crisis" curve and its adversarial ablation. For every (image, reference
caption) pair of an eval split, with the backbone teacher-forced on the caption:
  (a) `head_on_layer`: the frozen final norm + head applied directly to each decoder layer's
      hidden state (all layers; no training, what a naive early exit would read);
  (b) `vanilla`, (c) `no_adversarial`, (d) `free`: trained exits at their exit layers;
each scored by top-1 next-token accuracy against the caption and by agreement with the final
layer's argmax. Parameter counts compare the exits of each layout (and FREE's discriminators,
which exist only while training). Layers follow the README's convention: the exit after layer i
(0-based) has run i + 1 layers; tables and plots count "decoder layers run".

    python -m lavis_free.reports.exit_quality --cfg-path projects/free/shapes_caption.yaml \
        --free F.pth --vanilla V.pth --no-adversarial N.pth --split val --out reports/exits
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

import lavis_free  # noqa: F401  (compat fixes and registrations before lavis is used)
from lavis_free.common.config import FreeConfig
from lavis.common.registry import registry
from omegaconf import OmegaConf
from torch import nn

from lavis_free.evaluation.outputs import atomic_write, prepare_output_dir
from lavis_free.evaluation.plots import OUTSIDE_RIGHT, new_figure, save_figure
from lavis_free.exits.config import EXIT_LAYOUTS, ExitConfig
from lavis_free.exits.early_exits import BackboneOutputs, EarlyExits
from lavis_free.exits.feature_cache import backbone_fingerprint
from lavis_free.exits.losses import scored_mask
from lavis_free.hosts import exits_of

HEAD_ON_LAYER = "head_on_layer"


# ---- models and data ------------------------------------------------------------------------

def load_config(cfg_path: str, options: Sequence[str] = ()) -> FreeConfig:
    """A LAVIS project config (model and datasets merged with their defaults, as train.py does)."""
    return FreeConfig(SimpleNamespace(cfg_path=cfg_path, options=list(options)))


def build_layout_model(model_cfg: Any, layout: str, checkpoint: str, device: str) -> nn.Module:
    """The project's model with `model.exits.layout=layout` and trained exits from `checkpoint`.
    Seeded, so that a model type with random weights (`tiny`) gets the same backbone each time."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--{layout.replace('_', '-')} {checkpoint}: no such file")
    cfg = OmegaConf.merge(model_cfg, {"exits": {"layout": layout}, "exits_checkpoint": str(Path(checkpoint).resolve())})
    torch.manual_seed(0)
    model = registry.get_model_class(cfg.arch).from_config(cfg)
    return model.to(device).eval()


def caption_pairs(dataset: Any) -> List[Dict[str, Any]]:
    """(image path, reference caption) pairs of a LAVIS caption eval dataset."""
    pairs = []
    for row in dataset.annotation:
        if "caption" not in row:
            raise ValueError(f"{dataset.ann_path}: rows have no 'caption'; exit_quality reports captioning datasets")
        captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        pairs.extend({"image": row["image"], "image_id": row["image_id"], "caption": c} for c in captions)
    return pairs


def caption_batches(dataset: Any, batch_size: int, device: str, limit: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Teacher-forcing batches: processed images, processed captions as `text_input`."""
    pairs = caption_pairs(dataset)[:limit]
    for start in tqdm(range(0, len(pairs), batch_size), desc="exit quality", unit="batch"):
        chunk = pairs[start: start + batch_size]
        images = [dataset.vis_processor(Image.open(os.path.join(dataset.vis_root, p["image"])).convert("RGB")) for p in chunk]
        yield {
            "image": torch.stack(images).to(device),
            "text_input": [dataset.text_processor(p["caption"]) for p in chunk],
            "image_id": torch.tensor([p["image_id"] for p in chunk]),
        }


def eval_dataset(config: FreeConfig, split: str) -> Any:
    """The `split` of the config's first dataset."""
    name = next(iter(config.datasets_cfg))
    datasets = registry.get_builder_class(name)(config.datasets_cfg[name]).build_datasets()
    if split not in datasets:
        raise ValueError(f"--split {split}: dataset {name!r} has splits {sorted(datasets)}")
    return datasets[split]


# ---- parameters -----------------------------------------------------------------------------

def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model: nn.Module) -> Dict[str, Any]:
    """Exit parameters of each layout for the model's exit layers, built on its LM.

    FREE and no_adversarial share the exit transformers; FREE adds one discriminator per exit
    while training only. vanilla has a norm + vocabulary projection per exit."""
    host = exits_of(model)
    adapter = host.adapter
    base = host.config.to_dict()
    counts: Dict[str, Any] = {
        "lm_decoder_layer": _count(adapter.layers[-1]),
        "lm_total": _count(host.lm),
        "model_total": _count(model) - _count(model.early_exits),
    }
    for layout in EXIT_LAYOUTS:
        exits = EarlyExits(adapter, ExitConfig.from_dict({**base, "layout": layout}, adapter.num_layers))
        per_exit = [_count(e) for e in exits.exits]
        counts[layout] = {
            "per_exit": per_exit,
            "total": sum(per_exit),
            "discriminators_training_only": _count(exits.discriminators),
        }
    return counts


# ---- per-layer quality ----------------------------------------------------------------------

class Tally:
    """Correct-token and agreement counts of one predictor."""

    def __init__(self) -> None:
        self.correct = 0
        self.agree = 0
        self.total = 0

    def add(self, predicted: torch.Tensor, targets: torch.Tensor, final: torch.Tensor) -> None:
        self.correct += int((predicted == targets).sum())
        self.agree += int((predicted == final).sum())
        self.total += int(targets.numel())

    def result(self) -> Dict[str, float]:
        return {"accuracy": self.correct / max(self.total, 1), "agreement": self.agree / max(self.total, 1)}


@torch.no_grad()
def layer_quality(models: Mapping[str, nn.Module], batches: Iterator[Dict[str, Any]]) -> Dict[str, Any]:
    """Teacher-forced accuracy and agreement per layer (head on every layer) and per trained exit."""
    reference = next(iter(models.values()))
    host = exits_of(reference)
    adapter = host.adapter
    layers = list(host.config.layers)
    head_tallies = [Tally() for _ in range(adapter.num_layers)]
    exit_tallies = {name: [Tally() for _ in layers] for name in models}
    sequences = 0
    for samples in batches:
        with host.frozen_backbone_eval():
            batch = host.binding.training_batch(reference, samples)
        labels = batch.labels
        hidden = adapter.hidden_states(batch.inputs_embeds, batch.attention_mask, batch.encoder)
        mask = scored_mask(labels)
        targets = labels[mask]
        final = adapter.logits(hidden[-1])[mask].argmax(-1)
        for tally, states in zip(head_tallies, hidden):
            tally.add(adapter.logits(states)[mask].argmax(-1), targets, final)
        backbone = BackboneOutputs([hidden[l] for l in layers], adapter.final_norm(hidden[-1]), batch.attention_mask, labels, batch.encoder)
        for name, model in models.items():
            outputs = model.early_exits.exit_outputs(adapter, backbone)
            for tally, logits in zip(exit_tallies[name], outputs.logits):
                tally.add(logits[mask].argmax(-1), targets, final)
        sequences += labels.shape[0]
    return {
        "num_sequences": sequences,
        "num_tokens": head_tallies[0].total,
        HEAD_ON_LAYER: [{"layers_run": i + 1, **t.result()} for i, t in enumerate(head_tallies)],
        **{
            name: [{"exit_layer": l, "layers_run": l + 1, **t.result()} for l, t in zip(layers, tallies)]
            for name, tallies in exit_tallies.items()
        },
    }


# ---- plots ----------------------------------------------------------------------------------

STYLES = {"vanilla": ("tab:orange", "s"), "no_adversarial": ("tab:green", "^"), "free": ("tab:red", "o")}


def quality_figure(report: Mapping[str, Any]) -> Figure:
    """Top-1 accuracy and agreement with the final layer against decoder layers run, per predictor."""
    quality = report["quality"]
    fig, axes = new_figure(12, 4.2, ncols=2)
    for ax, metric in zip(axes, ("accuracy", "agreement")):
        head = quality[HEAD_ON_LAYER]
        ax.plot([r["layers_run"] for r in head], [r[metric] for r in head], color="grey", marker=".", label="(a) frozen head on layer")
        for name in ("vanilla", "no_adversarial", "free"):
            if name in quality:
                color, marker = STYLES[name]
                rows = quality[name]
                ax.plot([r["layers_run"] for r in rows], [r[metric] for r in rows], color=color, marker=marker, label=name)
        ax.set_xlabel("decoder layers run")
        ax.set_ylabel("top-1 accuracy vs caption" if metric == "accuracy" else "agreement with final layer")
        ax.set_title("Top-1 accuracy against the caption" if metric == "accuracy" else "Agreement with the final layer",
                     fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[1].legend(**OUTSIDE_RIGHT)
    fig.suptitle(f"Teacher-forced exit quality ({report['split']}, {quality['num_tokens']} tokens)")
    fig.tight_layout()
    return fig


def parameters_figure(report: Mapping[str, Any]) -> Figure:
    """Trainable parameters of each exit, FREE against vanilla."""
    params = report["parameters"]
    layers = report["exit_layers"]
    fig, (ax,) = new_figure(8.5, 4)
    width = 0.4
    for offset, name in ((-width / 2, "free"), (width / 2, "vanilla")):
        color, _ = STYLES[name]
        ax.bar([i + offset for i in range(len(layers))], params[name]["per_exit"], width, color=color,
               label=f"{name} (total {params[name]['total']:,})")
    ax.set_xticks(range(len(layers)), [f"exit after layer {l}" for l in layers])
    ax.set_xlabel("exit (decoder layers numbered from 0)")
    ax.set_ylabel("trainable parameters per exit")
    ax.set_title("Exit parameters: FREE vs vanilla")
    ax.legend(**OUTSIDE_RIGHT)
    fig.tight_layout()
    return fig


# ---- command --------------------------------------------------------------------------------

def write_report(
    cfg_path: str,
    checkpoints: Mapping[str, str],
    split: str,
    out_dir: str,
    options: Sequence[str] = (),
    batch_size: int = 16,
    limit: Optional[int] = None,
    device: str = "cpu",
) -> Dict[str, Any]:
    """Builds one model per given layout, scores them on `split`, writes JSON + PNGs to `out_dir`."""
    if not checkpoints:
        raise ValueError("give at least one of --free, --no-adversarial, --vanilla")
    out = prepare_output_dir(out_dir)
    config = load_config(cfg_path, options)
    models = {layout: build_layout_model(config.model_cfg, layout, path, device) for layout, path in checkpoints.items()}
    prints = {name: backbone_fingerprint(m) for name, m in models.items()}
    if len(set(prints.values())) > 1:
        raise ValueError(f"the checkpoints were loaded onto different backbones ({prints}); use one config")
    reference = next(iter(models.values()))
    report = {
        "config": cfg_path,
        "options": list(options),
        "split": split,
        "checkpoints": dict(checkpoints),
        "num_layers": exits_of(reference).adapter.num_layers,
        "exit_layers": list(exits_of(reference).config.layers),
        "parameters": parameter_counts(reference),
        "quality": layer_quality(models, caption_batches(eval_dataset(config, split), batch_size, device, limit)),
    }
    atomic_write(out / "exit_quality.json", json.dumps(report, indent=1))
    save_figure(quality_figure(report), out / "exit_quality.png")
    save_figure(parameters_figure(report), out / "exit_parameters.png")
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """The per-layer table as text: accuracy / agreement for (a)-(d)."""
    quality = report["quality"]
    names = [n for n in ("vanilla", "no_adversarial", "free") if n in quality]
    by_layer = {name: {r["layers_run"]: r for r in quality[name]} for name in names}
    lines = [" | ".join(["layers run", "(a) head on layer", *names])]
    for row in quality[HEAD_ON_LAYER]:
        cells = [str(row["layers_run"]), f"{row['accuracy']:.3f} / {row['agreement']:.3f}"]
        for name in names:
            hit = by_layer[name].get(row["layers_run"])
            cells.append(f"{hit['accuracy']:.3f} / {hit['agreement']:.3f}" if hit else "")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-layer exit quality and parameter counts (JSON + PNG)")
    parser.add_argument("--cfg-path", required=True, help="LAVIS project YAML (model, exits, dataset)")
    parser.add_argument("--free", help="inference checkpoint of the `free` layout")
    parser.add_argument("--no-adversarial", help="inference checkpoint of the `no_adversarial` layout")
    parser.add_argument("--vanilla", help="inference checkpoint of the `vanilla` layout")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides, key=value")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N (image, caption) pairs")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    checkpoints = {
        layout: path
        for layout, path in (("vanilla", args.vanilla), ("no_adversarial", args.no_adversarial), ("free", args.free))
        if path
    }
    report = write_report(args.cfg_path, checkpoints, args.split, args.out, args.options, args.batch_size, args.limit, args.device)
    print(format_table(report))
    for name in ("free", "vanilla"):
        print(f"{name}: per exit {report['parameters'][name]['per_exit']}, total {report['parameters'][name]['total']}")
    print(f"wrote {Path(args.out) / 'exit_quality.json'} and PNG plots")


if __name__ == "__main__":
    main()
