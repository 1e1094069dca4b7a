"""The Hugging Face side of bench/peer.py: HF greedy vs HF's self-speculative early exit on one OPT.

Runs in .venv-peer (a recent transformers, `bash run_scripts/setup_peer_env.sh`); it imports
neither LAVIS nor lavis_free, so what it times is Hugging Face's own code on the weights and
decoder prefixes that bench/peer.py wrote:
  --checkpoint DIR   an OPT checkpoint (config.json + pytorch_model.bin)
  --prompts FILE     a tensors-only torch file (read with weights_only=True): `inputs_embeds` [N, P, H] (token-level embeddings of the decoder
                     prefix, before positions, left-padded) and `attention_mask` [N, P]
Methods (greedy, at most `--max-new-tokens` tokens, the host's EOS and pad ids):
  hf_greedy          `generate(inputs_embeds=...)`, its default dynamic cache
  hf_greedy_prefix_ids
                     `generate(input_ids=...)` on the prefix ids below: the check that this way of
                     feeding the prefix changes neither the tokens nor the time
  hf_early_exit      `generate(input_ids=..., assistant_early_exit=K)` (transformers >= 4.47.0):
                     the model drafts with its first K layers + final norm + head, then verifies
                     the draft with every layer and keeps the longest agreeing run (lossless)
  hf_early_exit_honoured
                     the same call on OPT's decoder made to run only `config.num_hidden_layers`
                     layers, as Llama's does (`ConfigBoundLayers`): what the early exit does where
                     the model supports it
Why prefix ids: HF's assisted decoding cannot start a decoder-only model from `inputs_embeds`
(the draft always prefills from `input_ids`, which then hold only the generated tokens: 4.47.0
rejects the mask's length, 4.57.6 fails on a shape mismatch, 5.24.0 on an empty reshape). So each prompt's
P prefix embeddings are appended to the embedding table as P extra rows and the prompt is fed as
their ids: the lookup returns the very same vectors, and the head (an untied copy of the
original, `vocab_size` rows) can never emit an added id. Greedy tokens equal hf_greedy's.
Each (method, batch) is warmed up, then timed over all prompts `--repeats` times, interleaved;
the median is kept. A separate untimed pass counts layer calls and model passes (forward hooks).
A (method, batch) that transformers refuses (assisted generation takes batch 1 only) or that
fails is recorded with its error and not timed.

    .venv-peer/bin/python bench/peer_hf.py --checkpoint DIR/opt --prompts DIR/prompts.pt \\
        --max-new-tokens 20 --eos-token-id 202 --pad-token-id 1 --out DIR/hf.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
import transformers
from torch import nn
from transformers import OPTForCausalLM


class ConfigBoundLayers(nn.ModuleList):
    """A decoder's layers that iterate only over the first `config.num_hidden_layers`.

    Why: `EarlyExitCandidateGenerator` drafts by lowering `config.num_hidden_layers` to K around
    the draft's `generate`; Llama's decoder loops over `self.layers[: config.num_hidden_layers]`,
    OPT's over every layer. So on stock OPT the draft runs all layers (4.47.0-4.57.6) or crashes
    (5.18.0, 5.24.0: the draft's cache is built for K layers, OPT writes layer K: IndexError).
    Same modules and state-dict keys; only iteration changes."""

    def __init__(self, layers: nn.ModuleList, config: Any):
        super().__init__(list(layers))
        self.bound_config = config

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(list(self._modules.values())[: self.bound_config.num_hidden_layers])


def with_prefix_ids(model: OPTForCausalLM, inputs_embeds: torch.Tensor) -> Tuple[OPTForCausalLM, torch.Tensor]:
    """Appends every prompt's prefix embeddings [N, P, H] to the input embedding table and
    returns the model and the ids [N, P] that look them up (see the module docstring). The head
    keeps the original table (untied), so logits stay over the real vocabulary."""
    old = model.get_input_embeddings()
    vocab, (n, p, h) = old.weight.shape[0], inputs_embeds.shape
    table = nn.Embedding(vocab + n * p, h, padding_idx=old.padding_idx)
    with torch.no_grad():
        table.weight.copy_(torch.cat([old.weight, inputs_embeds.reshape(n * p, h).to(old.weight.dtype)]))
        model.lm_head.weight = nn.Parameter(old.weight.detach().clone())
    model.set_input_embeddings(table)
    return model, vocab + torch.arange(n * p).view(n, p)


def load_lm(checkpoint: Path, honour: bool = False) -> OPTForCausalLM:
    model = OPTForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if honour:
        model.model.decoder.layers = ConfigBoundLayers(model.model.decoder.layers, model.config)
    return model


class LayerCounter:
    """Counts, while installed, the model's forward passes and decoder-layer calls, split into
    the draft's (run while `config.num_hidden_layers` is lowered, i.e. by the early-exit
    assistant) and the full model's."""

    def __init__(self, model: OPTForCausalLM):
        self.model, self.full_layers = model, model.config.num_hidden_layers
        self.counts = {"draft_passes": 0, "full_passes": 0, "draft_layer_calls": 0, "full_layer_calls": 0}
        self.handles: List[Any] = []

    def _kind(self) -> str:
        return "draft" if self.model.config.num_hidden_layers < self.full_layers else "full"

    def __enter__(self) -> "LayerCounter":
        def on_layer(*_):
            self.counts[f"{self._kind()}_layer_calls"] += 1

        def on_model(*_):
            self.counts[f"{self._kind()}_passes"] += 1

        for layer in self.model.model.decoder.layers._modules.values():
            self.handles.append(layer.register_forward_pre_hook(on_layer))
        self.handles.append(self.model.register_forward_pre_hook(on_model))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def generated_rows(sequences: torch.Tensor, eos_token_id: int) -> List[List[int]]:
    """Generated ids [B, T] (pad after EOS) -> one list per row, up to and including its EOS."""
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in sequences.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--eos-token-id", type=int, required=True)
    parser.add_argument("--pad-token-id", type=int, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--assistant-early-exit", type=int, default=3, help="K: layers the draft runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    prompts = torch.load(args.prompts, weights_only=True)
    embeds, mask = prompts["inputs_embeds"].float(), prompts["attention_mask"].long()
    stock, ids = with_prefix_ids(load_lm(args.checkpoint), embeds)
    honoured, _ = with_prefix_ids(load_lm(args.checkpoint, honour=True), embeds)
    # no min_new_tokens: 4.57's assisted decoding refuses it (its draft rejects the processor)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                  eos_token_id=args.eos_token_id, pad_token_id=args.pad_token_id)
    early = dict(assistant_early_exit=args.assistant_early_exit)
    prefix = embeds.shape[1]

    def from_embeds(model, **extra):
        return lambda rows: model.generate(inputs_embeds=embeds[rows], attention_mask=mask[rows], **common, **extra)

    def from_ids(model, **extra):  # generate returns the prompt's ids too: drop them
        return lambda rows: model.generate(input_ids=ids[rows], attention_mask=mask[rows], **common, **extra)[:, prefix:]

    methods: Dict[str, Tuple[OPTForCausalLM, Callable]] = {
        "hf_greedy": (stock, from_embeds(stock)),
        "hf_greedy_prefix_ids": (stock, from_ids(stock)),
        "hf_early_exit": (stock, from_ids(stock, **early)),
        "hf_early_exit_honoured": (honoured, from_ids(honoured, **early)),
    }

    def decode_all(generate: Callable, batch: int) -> List[List[int]]:
        rows: List[List[int]] = []
        for i in range(0, len(embeds), batch):
            rows += generated_rows(generate(slice(i, i + batch)), args.eos_token_id)
        return rows

    configs: Dict[Tuple[str, int], Callable] = {}
    refused: List[dict] = []
    with torch.no_grad():
        for batch in args.batch_sizes:
            for name, (model, generate) in methods.items():
                try:  # warm-up, and transformers' verdict on this setting
                    generate(slice(0, batch))
                    configs[(name, batch)] = generate
                except Exception as err:  # noqa: BLE001  (recorded, reported, not timed)
                    refused.append({"method": name, "batch": batch, "error": f"{type(err).__name__}: {err}"})
                    print(f"peer_hf: {name} at batch {batch}: {type(err).__name__}: {err}", flush=True)
                    # a failed early-exit draft leaves num_hidden_layers lowered (no try/finally in HF)
                    model.config.num_hidden_layers = len(model.model.decoder.layers._modules)
        counts: Dict[Tuple[str, int], dict] = {}
        tokens: Dict[Tuple[str, int], List[List[int]]] = {}
        for (name, batch), generate in configs.items():  # untimed pass: tokens, passes and layer calls
            with LayerCounter(methods[name][0]) as counter:
                tokens[(name, batch)] = decode_all(generate, batch)
            counts[(name, batch)] = counter.counts
        times: Dict[Tuple[str, int], List[float]] = {key: [] for key in configs}
        for repeat in range(args.repeats):
            for key, generate in configs.items():
                start = time.perf_counter()
                rows = decode_all(generate, key[1])
                times[key].append(time.perf_counter() - start)
                if rows != tokens[key]:
                    sys.exit(f"peer_hf: {key} decoded other tokens in repeat {repeat} than in the counted pass")
            print(f"peer_hf: repeat {repeat + 1}/{args.repeats}: "
                  + ", ".join(f"{n}@{b} {1000 * times[(n, b)][-1] / len(embeds):.2f} ms" for n, b in configs), flush=True)
    with torch.no_grad():  # the weights check: prefill logits of the first prompt, [P, V]
        first_logits = stock(inputs_embeds=embeds[:1], attention_mask=mask[:1]).logits[0].tolist()
    results = []
    for (name, batch), seconds in times.items():
        c = counts[(name, batch)]
        results.append({"method": name, "batch": batch, "seconds": statistics.median(seconds), "all_seconds": seconds,
                        "tokens": tokens[(name, batch)], **c,
                        "layers_per_draft_pass": c["draft_layer_calls"] / c["draft_passes"] if c["draft_passes"] else None})
    defaults = transformers.GenerationConfig()
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "attn_implementation": stock.config._attn_implementation, "num_prompts": len(embeds), "prefix_length": prefix,
            "num_hidden_layers": len(stock.model.decoder.layers), "assistant_early_exit": args.assistant_early_exit,
            "generate_kwargs": common, "prefix_fed_to_assisted_as": "ids of prefix embeddings appended to the input table",
            "assistant_defaults": {k: getattr(defaults, k, None) for k in
                                   ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")},
            "repeats": args.repeats, "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "refused": refused, "rows": results, "prefix_logits_prompt0": first_logits}))
    print(f"peer_hf: written {args.out}")


if __name__ == "__main__":
    main()
