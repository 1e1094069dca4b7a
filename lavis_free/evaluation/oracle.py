"""The oracle exit: per token, the earliest exit whose argmax agrees with the final layer's token.

    python -m lavis_free.evaluation.oracle --cfg-path projects/free/shapes_caption.yaml --split test --out DIR

writes DIR/oracle.json (average decoder layers run per token, layer-count speedups, histogram of
tokens by layers run) and DIR/oracle_histogram.png; DIR is checked before anything is decoded.

Why: it is the ceiling of any confidence rule over these exits. An oracle that knew where each
token's exits first agree with full depth would emit exactly the full-depth greedy output (zero
quality loss) while running the fewest layers this exit placement allows.

How: the full-depth greedy outputs are decoded through the model's own `early_exit_decode`
(observed by `capture_decodes`, so the prefix is exactly what the engine saw: image queries,
prompt, padding), then teacher-forced once through the frozen backbone and every exit. With the
`recompute` policy the engine's caches equal these full-depth ones, so the figures are what the
engine would do with a perfect exit decision. Cost accounting follows the engine: the first token
comes from the full-depth prefill and never exits; a token checks the exits allowed by
`min_exit_layer` in depth order, paying one exit transformer and one head per check, and a token
no exit agrees on runs every layer and the final head too. `ideal_costs` gives the looser ceiling
of a rule that needs no checks: only the chosen exit's transformer and head are paid.
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from lavis_free.evaluation.outputs import atomic_write, prepare_output_dir
from lavis_free.evaluation.plots import plot_exit_histograms
from lavis_free.evaluation.runs import FULL_DEPTH, add_project_arguments, decode_split, project_from_args, split_loader
from lavis_free.exits.engine import DecodeOptions, DecodeResult
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.hosts import exits_of
from lavis_free.tasks.exit_eval import ExitTally


@dataclass
class DecodeCall:
    """One engine decode (`AttachedExits.decode`): its decoder prefix, options and result."""

    lm_batch: LMBatch
    options: DecodeOptions
    result: DecodeResult


@contextmanager
def capture_decodes(model: torch.nn.Module) -> Iterator[List[DecodeCall]]:
    """Records every engine decode of `model`'s attached exits inside the block (the calls still
    run). The hook is an instance attribute, removed on exit, so no class is touched."""
    calls: List[DecodeCall] = []
    host = exits_of(model)
    decode = host.decode

    def observed(lm_batch: LMBatch, options: DecodeOptions) -> DecodeResult:
        result = decode(lm_batch, options)
        calls.append(DecodeCall(lm_batch, options, result))
        return result

    host.decode = observed
    try:
        yield calls
    finally:
        del host.decode


def oracle_row(exit_tokens: Sequence[Sequence[int]], final_tokens: Sequence[int], exit_layers: Sequence[int],
               num_layers: int, min_exit_layer: int = 0) -> Tuple[List[int], List[int], List[int]]:
    """Oracle costs of one sequence: (layers run, exit transformers run, heads run) per token.

    `final_tokens[t]` is the full-depth token t; `exit_tokens[k][t]` the argmax of exit k (after
    decoder layer `exit_layers[k]`, 0-based) at that step. Token 0 is the prefill's (full depth).
    """
    allowed = [k for k, layer in enumerate(exit_layers) if layer + 1 >= min_exit_layer]
    layers, blocks, heads = [num_layers], [0], [1]
    for t in range(1, len(final_tokens)):
        for checked, k in enumerate(allowed, start=1):
            if exit_tokens[k][t] == final_tokens[t]:
                layers.append(exit_layers[k] + 1)
                blocks.append(checked)
                heads.append(checked)
                break
        else:
            layers.append(num_layers)
            blocks.append(len(allowed))
            heads.append(len(allowed) + 1)
    return layers, blocks, heads


def ideal_costs(stats: Dict[str, Any]) -> Dict[str, Any]:
    """The same exits with no checks on the way: one exit transformer and one head for a token
    that exits, the final head alone for one that does not."""
    depth = stats["num_layers"]
    return {
        **stats,
        "exit_blocks_run": [[int(run < depth) for run in row] for row in stats["exit_layers"]],
        "heads_run": [[1] * len(row) for row in stats["exit_layers"]],
    }


@torch.no_grad()
def teacher_forced_argmax(model: torch.nn.Module, call: DecodeCall, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Argmax of every exit ([K, B, steps]) and of the final layer ([B, steps]) at the first
    `steps` generated steps of a decode, teacher-forced on its tokens after the engine's own
    prefix. Step 0 (the prefill's token, which never exits) is -1 for the exits."""
    host = exits_of(model)
    adapter, exits = host.adapter, host.early_exits
    tokens = call.result.tokens[:, :steps]
    prefix_batch = call.lm_batch
    prefix = prefix_batch.attention_mask.shape[1]
    inputs = torch.cat([prefix_batch.inputs_embeds, adapter.embed_tokens(tokens[:, :-1])], dim=1)
    mask = torch.cat([prefix_batch.attention_mask, torch.ones_like(tokens[:, :-1], dtype=prefix_batch.attention_mask.dtype)], dim=1)
    backbone = exits.backbone_outputs(adapter, LMBatch(inputs, mask, encoder=prefix_batch.encoder))
    opts = call.options
    suppressed = [s for s in range(steps) if prefix_batch.prompt_length + s < opts.min_length]

    def argmax(logits: torch.Tensor) -> torch.Tensor:
        window = logits[:, prefix - 1 :].clone()  # column s predicts token s
        window[:, suppressed, opts.eos_token_id] = -float("inf")  # as the engine's min_length
        window[..., list(opts.suppressed_ids)] = -float("inf")  # and its never-generated ids
        return window.argmax(-1)

    final = argmax(adapter.head(backbone.final_features))
    per_exit = torch.full((len(exits.config.layers),) + tuple(tokens.shape), -1, dtype=torch.long, device=tokens.device)
    for k, logits in enumerate(exits.exit_outputs(adapter, backbone).logits):
        per_exit[k, :, 1:] = argmax(logits)[:, 1:]
    return per_exit, final


def oracle_stats(model: torch.nn.Module, calls: Sequence[DecodeCall]) -> Dict[str, Any]:
    """Exit stats (the format of `generate(return_exit_stats=True)`) of the oracle exit over
    full-depth decodes, with each decode's `min_exit_layer`; a model without exits gives full
    depth everywhere. The oracle is defined on what greedy decoding generates: scoring calls
    (`score_answers`, VisDial's ranking), beam search, sampling, several captions per image and
    logits processors are left out (their tokens are not the argmax of one row's logits)."""
    host = exits_of(model)
    num_layers = host.adapter.num_layers
    stats: Dict[str, Any] = {"exit_layers": [], "exit_blocks_run": [], "heads_run": [], "num_layers": num_layers,
                             "head_cost": host.adapter.head_cost_in_layers()}
    for call in (c for c in calls if is_plain_greedy(c.options)):
        if call.options.exits.enabled:
            raise ValueError("the oracle needs full-depth decodes (early_exit=False)")
        lengths = [len(row) for row in host.exit_stats(call.result)["exit_layers"]]
        layers = list(host.early_exits.config.layers) if host.early_exits is not None else []
        argmax = teacher_forced_argmax(model, call, max(lengths))[0].tolist() if layers else []
        for row, (length, tokens) in enumerate(zip(lengths, call.result.tokens.tolist())):
            per_exit = [argmax[k][row][:length] for k in range(len(layers))]
            run, blocks, heads = oracle_row(per_exit, tokens[:length], layers, num_layers, call.options.exits.min_exit_layer)
            stats["exit_layers"].append(run)
            stats["exit_blocks_run"].append(blocks)
            stats["heads_run"].append(heads)
    return stats


def is_plain_greedy(options: DecodeOptions) -> bool:
    """Whether a decode's tokens are each row's argmax with no processor (what the oracle reads)."""
    return (options.forced_tokens is None and options.beams is None and options.copies == 1
            and options.choice.processors is None and not options.choice.sampling)


def oracle_figures(stats: Mapping[str, Any]) -> Dict[str, Any]:
    """Oracle summary with the engine's costs, plus the check-free ideal layer speedup."""
    engine, ideal = ExitTally(), ExitTally()
    engine.add_stats(stats)
    ideal.add_stats(ideal_costs(dict(stats)))
    figures = {**engine.summary(), "histogram": engine.histogram}
    if ideal.tokens:
        figures["ideal_layer_speedup"] = ideal.summary()["layer_speedup"]
    return figures


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description="Oracle exit ceiling: earliest exit agreeing with full depth, per token.")
    add_project_arguments(parser)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    out = prepare_output_dir(args.out)
    project = project_from_args(args)
    loader = split_loader(project, args.split, args.max_samples, args.dataset)
    settings = {**FULL_DEPTH, "min_exit_layer": args.min_exit_layer}
    with capture_decodes(project.model) as calls:
        decode_split(project, loader, settings, f"full depth {args.split}", progress=not args.no_progress)
    figures = {"cfg_path": args.cfg_path, "split": args.split, "num_samples": len(loader.dataset),
               **oracle_figures(oracle_stats(project.model, calls))}
    atomic_write(out / "oracle.json", json.dumps(figures, indent=2))
    plot_exit_histograms({"oracle": figures["histogram"]}, out / "oracle_histogram.png",
                         f"Oracle exit: tokens by decoder layers run on {args.split}")
    print(f"oracle on {args.split} ({figures['num_samples']} samples): avg layers run {figures['avg_exit_layer']:.2f} "
          f"of {figures['num_layers']}, layer-count speedup {figures['layer_speedup']:.2f}x "
          f"({figures['ideal_layer_speedup']:.2f}x without exit checks)")
    print(f"written to {out / 'oracle.json'}")
    return figures

if __name__ == "__main__":
    main()
