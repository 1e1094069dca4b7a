"""How much of the ideal layer-count speedup the engine turns into wall-clock speedup.

A random-weight OPT of real dimensions (default: OPT-350m's; `--dims opt-2.7b` on a GPU)
decodes the same prefix twice: at full depth, and with exits replayed from a fixed, seeded
schedule (so the work is known exactly, whatever random weights would decide). The ideal
speedup counts decoder layers, exit transformers and head applications (in layer units, by
parameter count); efficiency = measured speedup / ideal speedup. Target: >= 0.85.
The ideal counts generated tokens only, so efficiency is computed on decode time (each arm's own
prefill, timed separately, subtracted); the end-to-end speedup is reported beside it.

Where the decode time goes (ms per token): the adapter's decoder-layer calls (exit transformers
included), the head's calls (exit checks and final), the `propagate` projections, and the rest
(the engine's own bookkeeping). A layer call on a few rows costs far more than its share of a
full-batch call when decoding is memory-bound, so `layer calls` shows how much of the ideal the
hardware lets a per-row exit keep; `rest` is what the engine adds (with `--checks learned`,
the confidence heads' small calls too).

`--checks learned` replays the same schedule with the learned exit check (confidence.py): a check
that does not fire runs no head (the heads here are random; the schedule decides).

    python bench/systems_efficiency.py --out bench/results
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import torch
from transformers import OPTConfig, OPTForCausalLM

from lavis_free.exits.adapters import adapter_for
from lavis_free.exits.config import ExitConfig
from lavis_free.exits.early_exits import EarlyExits
from lavis_free.exits.engine import DecodeOptions, DecodeResult, EarlyExitDecoder
from lavis_free.exits.kv_cache import DecodeCache
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.options import ExitOptions

DIMS = {
    "opt-125m": dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12),
    "opt-350m": dict(
        hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
        word_embed_proj_dim=512, do_layer_norm_before=False,
    ),
    "opt-2.7b": dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32),
}


class ReplayedExits(EarlyExitDecoder):
    """Leaves at the exit a schedule names for each (row, token), ignoring confidence."""

    def __init__(self, adapter, early_exits, schedule: np.ndarray):
        super().__init__(adapter, early_exits)
        self.schedule = schedule  # [batch, tokens]: exit index to leave at, -1 = full depth

    def _decide_exits(self, confidence, opts, exit_index, rows, step):
        return self.schedule[rows, step] == exit_index


PARTS = ("layer_calls", "head", "propagate")


@contextlib.contextmanager
def time_parts(adapter, totals: Dict[str, float], device: torch.device) -> Iterator[None]:
    """Adds the seconds of every adapter layer call, head call and `propagate` projection into `totals`."""
    originals = {"layer_calls": adapter.forward_layer, "head": adapter.head}

    def timed(key, fn):
        def run(*args, **kwargs):
            start = synced(device)
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += synced(device) - start
        return run

    adapter.forward_layer = timed("layer_calls", originals["layer_calls"])
    adapter.head = timed("head", originals["head"])
    project = DecodeCache.project_pending
    DecodeCache.project_pending = lambda self, *a, **k: timed("propagate", project)(self, *a, **k)
    try:
        yield
    finally:
        del adapter.forward_layer, adapter.head
        DecodeCache.project_pending = project


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def layer_call_ms(adapter, rows: int, device: torch.device, dtype: torch.dtype, cols: int = 64, repeats: int = 3) -> float:
    """ms of one decode-step layer call on `rows` rows (one column each, `cols` cached keys),
    the median over passes through every layer (so weights come from memory, as in decoding)."""
    hidden = torch.randn(rows, 1, adapter.hidden_size, device=device, dtype=dtype)
    cached = torch.randn(rows, adapter.num_kv_heads, cols - 1, adapter.head_dim, device=device, dtype=dtype)
    positions = torch.full((rows, 1), cols - 1, device=device)

    def store(keys, values):
        return torch.cat([cached, keys], 2), torch.cat([cached, values], 2)

    times = []
    for _ in range(repeats + 1):
        start = synced(device)
        for layer in adapter.layers:
            adapter.forward_layer(layer, hidden, positions, None, store)
        times.append((synced(device) - start) / adapter.num_layers)
    return 1000 * statistics.median(times[1:])


def layer_speedup(result: DecodeResult) -> float:
    """Full-depth cost over the cost actually paid, in decoder-layer units (heads included)."""
    full = sum(len(row) for row in result.layers_run) * (result.num_layers + result.head_cost)
    paid = sum(
        layers + blocks + result.head_cost * heads
        for rows in zip(result.layers_run, result.exit_blocks_run, result.heads_run)
        for layers, blocks, heads in zip(*rows)
    )
    return full / paid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", choices=sorted(DIMS), default="opt-350m")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=None, help="default: after 1/4, 1/2, 3/4 of the depth")
    parser.add_argument("--exit-probs", type=float, nargs="+", default=[0.5, 0.25, 0.15],
                        help="probability of leaving at each exit; the rest runs at full depth")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prefix", type=int, default=40, help="prefix columns (BLIP-2: 32 queries + prompt)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--policies", nargs="+", default=["recompute", "propagate"])
    parser.add_argument("--checks", nargs="+", choices=["softmax", "learned"], default=["softmax"],
                        help="exit checks: softmax (max_prob on the head's logits) or learned (no head unless it fires)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16/float16 (GPU default: bfloat16)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    cfg = OPTConfig(vocab_size=50272, max_position_embeddings=2048, **DIMS[args.dims])
    depth = cfg.num_hidden_layers
    exit_layers = args.exit_layers or [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1]
    if len(args.exit_probs) != len(exit_layers) or sum(args.exit_probs) > 1:
        sys.exit("--exit-probs needs one probability per exit layer, summing to at most 1")
    torch.manual_seed(0)
    lm = OPTForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    adapter = adapter_for(lm)
    exits = EarlyExits(adapter, ExitConfig.from_dict({"layers": exit_layers}, depth)).to(device, dtype).eval()
    exits.confidence_fitted.fill_(True)  # random heads: the replayed schedule decides, not they

    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch_sizes:
        choices = rng.choice(
            len(exit_layers) + 1, size=(batch, args.new_tokens), p=args.exit_probs + [1 - sum(args.exit_probs)]
        )
        schedule = np.where(choices == len(exit_layers), -1, choices)
        prefix = torch.randn(batch, args.prefix, cfg.word_embed_proj_dim, device=device, dtype=dtype)
        mask = torch.ones(batch, args.prefix, dtype=torch.long, device=device)

        def median_time(run):
            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return statistics.median(times), out

        def timed(decoder: EarlyExitDecoder, opts: DecodeOptions):
            """(generate seconds, its own prefill's seconds, the result, ms per token by part of
            one more, instrumented decode)."""
            lm_batch = LMBatch(prefix, mask)
            prefill_s, _ = median_time(lambda: decoder.prefill(lm_batch, opts.max_new_tokens, opts.exits.enabled))
            seconds, result = median_time(lambda: decoder.generate(lm_batch, opts))
            totals: Dict[str, float] = defaultdict(float)
            with time_parts(adapter, totals, device):
                decoder.prefill(lm_batch, opts.max_new_tokens, opts.exits.enabled)
                prefill_parts = {k: totals[k] for k in PARTS}
                instrumented = decoder.generate(lm_batch, opts)
            parts = {k: totals[k] - 2 * prefill_parts[k] for k in PARTS}  # generate runs its own prefill
            parts["rest"] = instrumented.seconds["decode"] - sum(parts.values())
            return seconds, prefill_s, result, {f"{k}_ms_per_token": 1000 * v / args.new_tokens for k, v in parts.items()}

        base = dict(max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=1)
        full_s, full_prefill_s, _, full_parts = timed(EarlyExitDecoder(adapter, exits), DecodeOptions(**base))
        for check in args.checks:
            for policy in args.policies:
                confidence = "learned" if check == "learned" else "max_prob"
                seconds, prefill_s, result, parts = timed(
                    ReplayedExits(adapter, exits, schedule),
                    DecodeOptions(**base, exits=ExitOptions(exit_threshold=0.0, kv_policy=policy, confidence=confidence)),
                )
                ideal = layer_speedup(result)
                measured = (full_s - full_prefill_s) / (seconds - prefill_s)
                rows.append({
                    "batch": batch, "policy": policy, "check": check,
                    "full_decode_ms_per_token": 1000 * (full_s - full_prefill_s) / args.new_tokens,
                    "exit_decode_ms_per_token": 1000 * (seconds - prefill_s) / args.new_tokens,
                    "ideal_speedup": ideal, "measured_speedup": measured, "efficiency": measured / ideal,
                    "end_to_end_speedup": full_s / seconds,
                    "full_depth_parts": full_parts, "parts": parts,
                })
                print(json.dumps(rows[-1]))

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "layer_call_ms_by_rows": {rows: layer_call_ms(adapter, rows, device, dtype) for rows in (1, 2, 3, 4, 8)},
        "dims": args.dims, "exit_layers": exit_layers, "exit_probs": args.exit_probs, "prefix": args.prefix,
        "new_tokens": args.new_tokens, "device": str(device), "dtype": str(dtype),
        "torch_threads": torch.get_num_threads(), "head_cost_layers": adapter.head_cost_in_layers(),
        "command": " ".join(sys.argv),
    }
    name = f"systems_efficiency_{args.dims}_{device.type}"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| batch | policy | exit check | full decode ms/token | exit decode ms/token | ideal layer-count speedup "
        "| measured decode speedup (ms/token ratio) | efficiency (measured / ideal) "
        "| end-to-end speedup (prefill included) | ms/token in layer calls / head / propagate / rest, exits (full depth) |",
        "|" + "---|" * 10,
    ]

    def split(r):
        return " / ".join(f"{r['parts'][f'{k}_ms_per_token']:.1f} ({r['full_depth_parts'][f'{k}_ms_per_token']:.1f})"
                          for k in PARTS + ("rest",))

    lines += [
        f"| {r['batch']} | {r['policy']} | {r['check']} | {r['full_decode_ms_per_token']:.2f} | {r['exit_decode_ms_per_token']:.2f} | "
        f"{r['ideal_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {r['efficiency']:.2f} | {r['end_to_end_speedup']:.2f}x | {split(r)} |"
        for r in rows
    ]
    costs = ", ".join(f"{rows} rows {ms:.2f}" for rows, ms in meta["layer_call_ms_by_rows"].items())
    lines.append(f"\nOne decode-step layer call (ms): {costs}.")
    (args.out / f"{name}.md").write_text(json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
