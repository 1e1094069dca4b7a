"""The engine against the fastest Hugging Face decoding, side by side, on the same OPT and prompts.

What it measures (the LM's decoding only: the shipped default `shapes_frozen_lm`'s OPT, greedy,
at most `--max-new-tokens` tokens and no minimum (LAVIS's min_length=1 is left out because
transformers 4.57's assisted decoding refuses `min_new_tokens`), on the decoder prefixes of
`--num-samples` shapes test images; the image side, ViT + Q-Former, is computed once beforehand
and timed by no row):
  (a) hf_greedy               HF `generate`, default dynamic cache          (.venv-peer, recent transformers)
  (a') hf_greedy_prefix_ids   (a) fed the way (b) must be fed (bench/peer_hf.py: prefix ids)
  (b) hf_early_exit           HF `generate(assistant_early_exit=K)`: self-speculative, lossless;
                              on stock OPT its draft runs every layer (transformers 4.x)
      hf_early_exit_honoured  the same with OPT's decoder made to honour K, as Llama's does
  (c) engine                  our engine, exits off                           (.venv, transformers 4.26)
  (d) engine_free             our engine, FREE exits at each `--thresholds` (default: the calibrated one, 0.4)
Per row: ms per caption, generated tokens/s (EOS counted), CIDEr against the shapes test
references, and whether its tokens equal (a)'s at batch 1 (peer.json: also at the same batch);
the prefill logits of one prompt through LAVIS's OPT and HF's are compared too. The LM's
weights are written as an HF OPT checkpoint and the prefixes as a tensors-only torch file to a temporary
directory; bench/peer_hf.py times (a) and (b) there in a subprocess, this process times (c) and
(d). `--repeats` rounds, each one HF process (warm-up, an untimed counting pass, one timed pass
over all prompts per method and batch) followed by one timed engine pass (warmed up once), so
that machine load hits both sides alike; the median over rounds is kept; one torch thread each.
Written to --out: peer.json, peer.md, peer.png.

    bash run_scripts/setup_peer_env.sh
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/peer.py \\
        --num-samples 100 --repeats 5 --out bench/results/frozen_lm/peer
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch
import transformers
from PIL import Image
from tqdm import tqdm

import lavis_free  # noqa: F401  (registers the plugin before LAVIS is used)
from lavis.models import load_model_and_preprocess
from lavis_free.evaluation.plots import new_figure, save_figure
from lavis_free.exits.engine import DecodeOptions
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.options import FULL_DEPTH
from lavis_free.hosts import exits_of
from lavis_free.tasks.caption_metrics import caption_metrics

REPO = Path(__file__).resolve().parents[1]


def export_hf_opt(lm: torch.nn.Module, directory: Path) -> None:
    """LAVIS's OPT (CachedOPTForCausalLM) as an HF `OPTForCausalLM` checkpoint: LAVIS's
    modeling_opt keeps HF's module names, so the state dict loads as is; the head tied to the
    embeddings is left out, as HF ties it again (checked, not assumed)."""
    state = dict(lm.state_dict())
    tied = lm.lm_head.weight.data_ptr() == lm.model.decoder.embed_tokens.weight.data_ptr()
    if tied:
        del state["lm_head.weight"]
    # the architecture only: 4.26's full to_dict() also writes generation defaults (max_length=20,
    # min_length=0), which a recent generate reads as settings (and assisted decoding refuses)
    config = lm.config.to_diff_dict()
    config.update(architectures=["OPTForCausalLM"], tie_word_embeddings=tied, torch_dtype="float32")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    # tensors only: the peer's transformers reads pytorch_model.bin with torch.load(weights_only=True)
    torch.save({k: v.float().contiguous() for k, v in state.items()}, directory / "pytorch_model.bin")


def decoder_prefixes(model: torch.nn.Module, images: torch.Tensor, max_new_tokens: int, batch: int = 16) -> LMBatch:
    """The engine's decoder prefix (image queries + the model's prompt) for every image, built by
    the host binding exactly as `generate` builds it. One prompt for all, so every prefix has
    the same length and the chunks concatenate without re-padding."""
    binding, parts = exits_of(model).binding, []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        parts.append(binding.decode_batch(model, chunk, [model.prompt] * len(chunk), max_new_tokens))
    return LMBatch(torch.cat([p.inputs_embeds for p in parts]), torch.cat([p.attention_mask for p in parts]),
                   input_ids=torch.cat([p.input_ids for p in parts]), prompt_length=parts[0].prompt_length)


def rows_to_eos(tokens: torch.Tensor, eos: int) -> List[List[int]]:
    return [row[: row.index(eos) + 1] if eos in row else row for row in tokens.tolist()]


def engine_method(model: torch.nn.Module, max_new_tokens: int, **exit_options) -> Callable[[LMBatch], Tuple[List[List[int]], List[List[int]]]]:
    """A decode of one LMBatch by the engine (as `generate` calls it, without the image side):
    (tokens to EOS per row, decoder layers run per token)."""
    host = exits_of(model)
    ids = host.binding.special_ids(model)
    options = host.exit_options(**exit_options) if exit_options else FULL_DEPTH

    def decode(batch: LMBatch):
        result = host.decode(batch, DecodeOptions(max_new_tokens=max_new_tokens, eos_token_id=ids.eos_token_id,
                                                  pad_token_id=ids.pad_token_id, min_length=0, exits=options))
        rows = rows_to_eos(result.tokens, ids.eos_token_id)
        return rows, [layers[: len(r)] for layers, r in zip(result.layers_run, rows)]
    return decode


class EngineTimer:
    """The engine's side of one round: every (method, batch) over all prefixes once, timed."""

    def __init__(self, methods: Mapping[str, Callable], prefix: LMBatch, batch_sizes: Sequence[int]):
        self.methods, self.keys = methods, [(name, b) for b in batch_sizes for name in methods]
        n = len(prefix.inputs_embeds)
        self.chunks = {b: [LMBatch(prefix.inputs_embeds[i:i + b], prefix.attention_mask[i:i + b], input_ids=prefix.input_ids[i:i + b],
                                   prompt_length=prefix.prompt_length) for i in range(0, n, b)] for b in batch_sizes}
        self.times: Dict[tuple, List[float]] = {k: [] for k in self.keys}
        self.outputs: Dict[tuple, tuple] = {}
        with torch.no_grad():
            for name, b in self.keys:  # warm-up
                methods[name](self.chunks[b][0])

    @torch.no_grad()
    def one_pass(self) -> None:
        for name, b in self.keys:
            start = time.perf_counter()
            decoded = [self.methods[name](part) for part in self.chunks[b]]
            self.times[(name, b)].append(time.perf_counter() - start)
            rows = [r for rows, _ in decoded for r in rows]
            if (name, b) in self.outputs and self.outputs[(name, b)][0] != rows:
                sys.exit(f"peer: the engine's {name} at batch {b} decoded other tokens in another round")
            self.outputs[(name, b)] = (rows, [l for _, layers in decoded for l in layers])

    def results(self) -> Dict[tuple, dict]:
        return {k: {"seconds": statistics.median(self.times[k]), "all_seconds": self.times[k], "tokens": self.outputs[k][0],
                    "layers": self.outputs[k][1]} for k in self.keys}


def merge_hf_rounds(runs: List[dict]) -> Dict[tuple, dict]:
    """One (method, batch) entry per HF row over the rounds: median seconds, the first round's
    tokens and counts (every round must decode the same tokens)."""
    merged: Dict[tuple, dict] = {}
    for run in runs:
        for r in run["rows"]:
            key = (r["method"], r["batch"])
            if key not in merged:
                merged[key] = {"all_seconds": [], "tokens": r["tokens"], "layers": None,
                               **{k: r[k] for k in ("full_passes", "draft_passes", "layers_per_draft_pass")}}
            elif merged[key]["tokens"] != r["tokens"]:
                sys.exit(f"peer: HF's {key} decoded other tokens in another round")
            merged[key]["all_seconds"] += r["all_seconds"]
    for entry in merged.values():
        entry["seconds"] = statistics.median(entry["all_seconds"])
    return merged


def method_label(method: str, k: int) -> str:
    """A two-line bar label for a method name."""
    fixed = {"hf_greedy": "HF greedy\n(inputs_embeds)", "hf_greedy_prefix_ids": "HF greedy\n(prefix ids)",
             "hf_early_exit": f"HF early exit\nK={k}\nstock OPT", "hf_early_exit_honoured": f"HF early exit\nK={k}\nOPT honours K",
             "engine": "engine\nexits off"}
    if method in fixed:
        return fixed[method]
    return "engine FREE\nthreshold " + method.rsplit("_", 1)[1]


def peer_figure(rows: List[dict], title: str, k: int):
    """ms per caption and CIDEr per method, one bar per batch size."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = new_figure(15.0, 5.2, ncols=2)
    width = 0.8 / len(batches)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for ax, key, label in zip(axes, ("ms_per_caption", "CIDEr"), ("ms per caption (LM decoding; lower is better)", "CIDEr (test)")):
        for j, b in enumerate(batches):
            xs, ys = [], []
            for i, m in enumerate(methods):
                row = next((r for r in rows if r["method"] == m and r["batch"] == b), None)
                if row is not None:
                    xs.append(i + (j - (len(batches) - 1) / 2) * width)
                    ys.append(row[key])
            bars = ax.bar(xs, ys, width, color=colors[j % len(colors)], label=f"batch {b}")
            ax.bar_label(bars, fmt="%.1f" if key == "ms_per_caption" else "%.2f", fontsize=7, padding=1)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([method_label(m, k) for m in methods], fontsize=7)
        ax.set_ylabel(label)
        ax.set_xlabel("HF early exit: batch 1 only (transformers' assisted generation refuses batch > 1)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, 1.22 * max(r[key] for r in rows))  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper center", ncol=len(batches))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="blip2_opt_free")
    parser.add_argument("--model-type", default="shapes_frozen_lm")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="FREE exit thresholds of (d); default: the model's calibrated one (0.0) and 0.4")
    parser.add_argument("--assistant-early-exit", type=int, default=None,
                        help="K of (b), layers the draft runs; default: the engine's first exit's (3)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (HF process + engine pass); median kept")
    parser.add_argument("--peer-python", type=Path, default=REPO / ".venv-peer" / "bin" / "python")
    parser.add_argument("--out", type=Path, default=Path("bench/results/frozen_lm/peer"))
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the HF checkpoint, prompts and hf.json here (default: a temporary directory, removed)")
    args = parser.parse_args()
    if not args.peer_python.exists():
        sys.exit(f"{args.peer_python} not found: bash run_scripts/setup_peer_env.sh")

    model, vis, _ = load_model_and_preprocess(args.model, args.model_type, is_eval=True)
    host = exits_of(model)
    calibrated = host.config.inference.exit_threshold
    thresholds = args.thresholds or sorted({t for t in (calibrated, 0.4) if t is not None})
    k = args.assistant_early_exit or host.config.layers[0] + 1
    ids = host.binding.special_ids(model)
    ann = json.loads((args.data / "annotations" / f"caption_{args.split}.json").read_text())[:args.num_samples]
    gt = str(args.data / "annotations" / f"caption_{args.split}_gt.json")
    images = torch.stack([vis["eval"](Image.open(args.data / r["image"]).convert("RGB")) for r in tqdm(ann, desc="images")])
    with torch.no_grad():
        prefix = decoder_prefixes(model, images, args.max_new_tokens)

    methods = {"engine": engine_method(model, args.max_new_tokens)}
    for t in thresholds:
        methods[f"engine_free_{t:g}"] = engine_method(model, args.max_new_tokens, exit_threshold=t)
    engine = EngineTimer(methods, prefix, args.batch_sizes)
    hf_runs: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="lavis_free_peer_") as tmp:
        tmp = args.work_dir or Path(tmp)
        export_hf_opt(host.lm, tmp / "opt")
        torch.save({"inputs_embeds": prefix.inputs_embeds.float(), "attention_mask": prefix.attention_mask.long(),
                    "input_ids": prefix.input_ids.long()}, tmp / "prompts.pt")
        # one HF process and one engine pass per round, so that load drifting on a shared machine
        # hits both sides alike (each HF process warms up and counts before its timed pass)
        for round_ in tqdm(range(args.repeats), desc="rounds (HF process, then engine pass)"):
            out = tmp / f"hf_{round_}.json"
            command = [str(args.peer_python), str(REPO / "bench" / "peer_hf.py"), "--checkpoint", str(tmp / "opt"),
                       "--prompts", str(tmp / "prompts.pt"), "--max-new-tokens", str(args.max_new_tokens),
                       "--eos-token-id", str(ids.eos_token_id), "--pad-token-id", str(ids.pad_token_id),
                       "--assistant-early-exit", str(k), "--repeats", "1", "--out", str(out),
                       "--batch-sizes", *map(str, args.batch_sizes)]
            if round_ == 0:
                print("peer: running", " ".join(command), flush=True)
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            hf_runs.append(json.loads(out.read_text()))
            engine.one_pass()
    hf = hf_runs[0]

    with torch.no_grad():  # the weights check: the same prefill through LAVIS's OPT and HF's
        ours = host.lm(inputs_embeds=prefix.inputs_embeds[:1], attention_mask=prefix.attention_mask[:1]).logits[0]
    logits_max_abs_diff = (ours - torch.tensor(hf["prefix_logits_prompt0"])).abs().max().item()
    print(f"peer: prefill logits of prompt 0, LAVIS's OPT vs HF's OPTForCausalLM: max |diff| {logits_max_abs_diff:.2e}")

    num_layers = host.adapter.num_layers
    hf_counts = ("full_passes", "draft_passes", "layers_per_draft_pass")
    decoded = {**merge_hf_rounds(hf_runs), **engine.results()}
    reference = decoded[("hf_greedy", min(args.batch_sizes))]["tokens"]
    rows = []
    for (method, batch), d in decoded.items():
        tokens = d["tokens"]
        padded = torch.tensor([r + [ids.pad_token_id] * (args.max_new_tokens - len(r)) for r in tokens])
        captions = host.binding.decode_text(model, padded)
        cider = caption_metrics([{"image_id": a["image_id"], "caption": c} for a, c in zip(ann, captions)], gt, scorers=("cider",))["CIDEr"]
        generated = sum(len(r) for r in tokens)
        same_batch = decoded.get(("hf_greedy", batch), {}).get("tokens")
        layers = [l for row in d["layers"] for l in row] if d["layers"] is not None else None
        rows.append({
            "method": method, "batch": batch, "ms_per_caption": 1000 * d["seconds"] / len(tokens),
            "tokens_per_s": generated / d["seconds"], "CIDEr": cider, "generated_tokens": generated,
            "identical_to_hf_greedy_batch1": tokens == reference,
            "identical_to_hf_greedy_same_batch": None if same_batch is None else tokens == same_batch,
            "rows_differing_from_hf_greedy_batch1": sum(a != b for a, b in zip(tokens, reference)),
            "avg_layers_run": statistics.mean(layers) if layers else None,
            **{k: d.get(k) for k in hf_counts},
            "all_seconds": d["all_seconds"], "captions": captions, "tokens": tokens,
        })
    order = ["hf_greedy", "hf_greedy_prefix_ids", "hf_early_exit", "hf_early_exit_honoured", *methods]
    rows.sort(key=lambda r: (r["batch"], order.index(r["method"])))
    for r in rows:
        ref = next(x for x in rows if x["method"] == "hf_greedy" and x["batch"] == r["batch"])
        r["speedup_vs_hf_greedy"] = ref["ms_per_caption"] / r["ms_per_caption"]

    meta = {"model": args.model, "model_type": args.model_type, "num_samples": len(ann), "split": args.split,
            "max_new_tokens": args.max_new_tokens, "min_new_tokens": 0, "eos_token_id": ids.eos_token_id,
            "thresholds": thresholds, "calibrated_threshold": calibrated, "exit_layers": list(host.config.layers),
            "num_layers": num_layers, "assistant_early_exit": k, "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(), "cpu": os.cpu_count(), "project_torch": torch.__version__,
            "project_transformers": transformers.__version__, "hf": hf["meta"], "hf_refused": hf["refused"],
            "prefix_logits_max_abs_diff_lavis_vs_hf": logits_max_abs_diff,
            "timed": "LM decoding from the decoder prefix (prefill included); the image side is not timed",
            "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| method | batch | ms / caption | tokens/s | speedup vs HF greedy | CIDEr | identical to HF greedy (batch 1)? "
             "| layers run per token | full-model passes per caption | draft passes per caption |", "|---" * 10 + "|"]
    for r in rows:
        same = "yes" if r["identical_to_hf_greedy_batch1"] else f"no ({r['rows_differing_from_hf_greedy_batch1']} of {len(ann)} differ)"
        if r["avg_layers_run"] is not None:
            layers = f"{r['avg_layers_run']:.2f}"
        elif r["layers_per_draft_pass"] is not None:
            layers = f"draft {r['layers_per_draft_pass']:.0f}, verify {num_layers}"
        else:
            layers = str(num_layers)
        # a pass over a batch computes each of its rows once: passes per caption = passes * batch / captions
        passes = f"{r['full_passes'] * r['batch'] / len(ann):.2f}" if r["full_passes"] is not None else "-"
        drafts = f"{r['draft_passes'] * r['batch'] / len(ann):.2f}" if r["draft_passes"] else "-"
        lines.append(f"| {r['method']} | {r['batch']} | {r['ms_per_caption']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['speedup_vs_hf_greedy']:.2f}x | {r['CIDEr']:.3f} | {same} | {layers} | {passes} | {drafts} |")
    for refused in hf["refused"]:
        lines.append(f"| {refused['method']} | {refused['batch']} | not run: transformers {hf['meta']['transformers']} raised "
                     f"`{refused['error'][:120]}` | | | | | | | |")
    table = "\n".join(lines)
    (args.out / "peer.md").write_text(json.dumps({k: v for k, v in meta.items() if k != "hf"}) + "\n\n" + table + "\n")
    title = (f"Engine vs Hugging Face decoding, {args.model_type} OPT ({num_layers} layers), {len(ann)} test prompts, greedy, "
             f"<= {args.max_new_tokens} tokens\n(transformers {hf['meta']['transformers']} for HF, 4.26 for the engine; "
             f"HF early exit K={k}; one CPU thread)")
    save_figure(peer_figure(rows, title, k), args.out / "peer.png")
    print(table)
    print(f"peer: written {args.out / 'peer.json'}, peer.md, peer.png")


if __name__ == "__main__":
    main()
