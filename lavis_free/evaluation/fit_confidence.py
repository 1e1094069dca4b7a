"""Fits the learned exit check (`confidence: learned`) to a project's trained exits.

Why after exit training: the label is whether an exit's token equals the frozen final layer's,
which is only known once the exits are trained; the exits and the backbone stay frozen, so
their features are computed once (teacher-forced, at the positions exit training scores) and
the small heads train on them in memory, in seconds. The texts are by default the model's own
full-depth greedy continuations (`--texts own`, as `loss.mode: pseudo` makes them): the
contexts the check meets when decoding, rather than the references (`--texts dataset`). The held-out tokens
are the `--val-samples` training samples after the first `--max-samples` (eval splits of LAVIS
caption datasets carry no texts): held out from the heads' fit only. The exits were trained on
those samples and their images pass the split's train processors, so agreement and AUC there are
optimistic as absolute figures; learned and max_prob are compared on the same tokens. Written to `--out`:
  exits_confidence.pth   the exits file with the fitted heads (load it as model.exits_checkpoint)
  fit_confidence.json/md per exit, on the held-out split: how often the exit agrees with the
                         final layer, and how well each confidence predicts that agreement
                         (ROC AUC, and the share agreeing among tokens the check lets leave at a
                         threshold), learned vs max_prob

    python -m lavis_free.evaluation.fit_confidence --cfg-path projects/free/shapes_caption_frozen_lm.yaml \\
        --max-samples 4000 --out output/confidence
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lavis_free.evaluation.runs import add_project_arguments, project_from_args
from lavis_free.exits import losses
from lavis_free.exits.confidence import max_prob
from lavis_free.hosts import exits_of
from lavis_free.tasks.exit_training import PseudoLabels
from lavis.datasets.data_utils import prepare_sample

CHECKPOINT = "exits_confidence.pth"


@torch.no_grad()
def exit_agreement(project, split: str, samples_range: range, own_texts: bool = True, dataset: Optional[str] = None,
                   progress: bool = True) -> List[Dict[str, torch.Tensor]]:
    """Per exit, over the scored positions of these samples of `split`: its features, whether its
    argmax equals the final layer's, and its max_prob (the softmax check the learned one is
    compared with)."""
    host = exits_of(project.model)
    if host is None or host.early_exits is None:
        raise ValueError(f"{project.cfg_path}: the model has no exits (set model.exits.layers and model.exits_checkpoint)")
    adapter, exits = host.adapter, host.early_exits
    lm_samples = getattr(project.task, "exit_lm_samples", lambda samples: samples)
    if own_texts:
        pseudo = PseudoLabels(max_len=int(getattr(project.task, "max_len", 30)), min_len=1)
        dataset_texts = lm_samples
        lm_samples = lambda samples: pseudo.relabel(host, dataset_texts(samples))  # noqa: E731
    per_exit: List[Dict[str, List[torch.Tensor]]] = [{"features": [], "agree": [], "max_prob": []} for _ in exits.exits]
    data = project.dataset(split, dataset)
    if samples_range.stop > len(data):
        raise ValueError(f"split {split!r} has {len(data)} samples; --max-samples + --val-samples = {samples_range.stop}")
    loader = DataLoader(Subset(data, samples_range), batch_size=project.batch_size, shuffle=False,
                        collate_fn=getattr(data, "collater", None))
    desc = f"exit features ({split} {samples_range.start}-{samples_range.stop})"
    for samples in tqdm(loader, desc=desc, leave=False, disable=not progress):
        samples = lm_samples(prepare_sample(samples, cuda_enabled=project.device.type == "cuda"))
        backbone = host.backbone_outputs(samples)
        outputs = exits.exit_outputs(adapter, backbone)
        mask = losses.scored_mask(backbone.labels)
        final = adapter.head(backbone.final_features)[mask].argmax(-1)
        for k, (features, logits) in enumerate(zip(outputs.features, outputs.logits)):
            scored = logits[mask]
            per_exit[k]["features"].append(features[mask].float().cpu())
            per_exit[k]["agree"].append((scored.argmax(-1) == final).cpu())
            per_exit[k]["max_prob"].append(max_prob(scored).cpu())
    return [{name: torch.cat(parts) for name, parts in exit_data.items()} for exit_data in per_exit]


def fit_head(head: torch.nn.Module, features: torch.Tensor, agree: torch.Tensor, epochs: int, lr: float,
             batch_size: int = 512, seed: int = 0) -> List[float]:
    """Binary cross-entropy of the head's agreement logits, from a fresh seeded initialisation
    (not from heads an earlier fit left in the exits file); returns the loss per epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in head.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
    generator = torch.Generator().manual_seed(seed)
    device = next(head.parameters()).device
    head.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    target = agree.float()
    curve = []
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(
                head.agreement_logits(features[batch].to(device)), target[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        curve.append(total / len(order))
    head.requires_grad_(False).eval()
    return curve


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> Optional[float]:
    """Probability that a random agreeing token scores above a random disagreeing one (ties
    count half); None when one class is empty."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        return None
    values = torch.cat([pos, neg])
    ranks = values.argsort().argsort().double() + 1
    unique, inverse = values.unique(return_inverse=True)
    tied = torch.zeros(len(unique), dtype=torch.double).scatter_reduce(0, inverse, ranks, "mean", include_self=False)
    pos_ranks = tied[inverse[: len(pos)]]
    return float((pos_ranks.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def check_quality(scores: torch.Tensor, agree: torch.Tensor, thresholds: Sequence[float]) -> Dict[str, Any]:
    """How well a confidence predicts agreement: AUC, and per threshold the share of tokens it
    lets leave and the share of those that agree with the final layer."""
    rows = []
    for threshold in thresholds:
        leave = scores >= threshold
        rows.append({"threshold": threshold, "leave_share": float(leave.float().mean()),
                     "agree_among_leaving": float(agree[leave].float().mean()) if leave.any() else None})
    return {"auc": roc_auc(scores, agree), "thresholds": rows}


def fit_confidence(project, split: str, max_samples: int, val_samples: int, epochs: int, lr: float,
                   thresholds: Sequence[float], own_texts: bool = True, dataset: Optional[str] = None,
                   progress: bool = True) -> Dict[str, Any]:
    """Fits every exit's confidence head on the first `max_samples` of `split`, scores it on the
    next `val_samples`, and marks the heads fitted; returns the report."""
    for name, value in (("--max-samples", max_samples), ("--val-samples", val_samples)):
        if value is None or value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    train = exit_agreement(project, split, range(max_samples), own_texts, dataset, progress)
    held_out = exit_agreement(project, split, range(max_samples, max_samples + val_samples), own_texts, dataset, progress)
    host = exits_of(project.model)
    exits = host.early_exits
    report: Dict[str, Any] = {"cfg_path": project.cfg_path, "split": split, "fit_samples": max_samples,
                              "held_out_samples": val_samples, "texts": "own" if own_texts else "dataset",
                              "exit_layers": list(host.config.layers),
                              "epochs": epochs, "lr": lr, "exits": []}
    for k, head in enumerate(exits.confidence_heads):
        curve = fit_head(head, train[k]["features"], train[k]["agree"], epochs, lr)
        with torch.no_grad():
            learned = head(held_out[k]["features"].to(next(head.parameters()).device)).cpu()
        agree = held_out[k]["agree"]
        report["exits"].append({
            "exit": k, "layer": host.config.layers[k], "train_tokens": len(train[k]["agree"]),
            "val_tokens": len(agree), "train_agreement": float(train[k]["agree"].float().mean()),
            "val_agreement": float(agree.float().mean()), "loss_per_epoch": curve,
            "learned": check_quality(learned, agree, thresholds),
            "max_prob": check_quality(held_out[k]["max_prob"], agree, thresholds),
        })
    exits.confidence_fitted.fill_(True)
    return report


def report_markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"# Learned exit check: {report['cfg_path']}",
        "",
        f"Fitted on the first {report['fit_samples']} samples of `{report['split']}`, scored on the next "
        f"{report['held_out_samples']} (teacher-forced positions, texts: {report['texts']}). "
        "Agreement = the exit's token equals the final layer's. AUC: how well the confidence ranks agreeing "
        "tokens above the others (0.5 = chance).",
        "",
        "| exit (after layer) | val agreement | AUC learned | AUC max_prob | threshold | leave learned / max_prob "
        "| agreement among leaving, learned / max_prob |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["exits"]:
        for learned, soft in zip(row["learned"]["thresholds"], row["max_prob"]["thresholds"]):
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(
                f"| {row['exit']} ({row['layer']}) | {row['val_agreement']:.3f} | {fmt(row['learned']['auc'])} | "
                f"{fmt(row['max_prob']['auc'])} | {learned['threshold']} | {learned['leave_share']:.3f} / "
                f"{soft['leave_share']:.3f} | {fmt(learned['agree_among_leaving'])} / {fmt(soft['agree_among_leaving'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_project_arguments(parser)
    parser.add_argument("--split", default="train", help="split with texts (default: train)")
    parser.add_argument("--val-samples", type=int, default=500, help="held-out samples after the first --max-samples (default 500)")
    parser.add_argument("--texts", choices=["own", "dataset"], default="own",
                        help="own: the model's greedy continuations (default); dataset: the split's texts")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    project = project_from_args(args)
    report = fit_confidence(project, args.split, args.max_samples or 4000, args.val_samples, args.epochs, args.lr,
                            args.thresholds, own_texts=args.texts == "own", dataset=args.dataset,
                            progress=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"checkpoint": str(args.out / CHECKPOINT), "json": str(args.out / "fit_confidence.json"),
             "markdown": str(args.out / "fit_confidence.md")}
    torch.save(exits_of(project.model).inference_checkpoint(), paths["checkpoint"])
    Path(paths["json"]).write_text(json.dumps(report, indent=2))
    Path(paths["markdown"]).write_text(report_markdown(report))
    print(report_markdown(report))
    print(json.dumps(paths))
    return paths


if __name__ == "__main__":
    main()
