"""FREE exits for a LAVIS model with a causal LM: the glue between LAVIS and `lavis_free.exits`.

A host model mixes in `EarlyExitMixin`, calls `setup_exits(cfg.get("exits"))` once its LM
exists, and provides two hooks:
  - `exit_lm()`: the causal LM module (e.g. BLIP-2's `opt_model`);
  - `lm_training_inputs(samples)`: teacher-forcing inputs `(inputs_embeds, attention_mask,
    labels)` of the LM, with LAVIS's -100 convention for unscored positions.
Everything else (freezing the backbone, optimizer groups, exit losses, decoding with exits,
checkpoint checks) lives here, so another LAVIS model gains exits with those two methods.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from lavis_free.exits.adapters import DecoderAdapter, adapter_for
from lavis_free.exits.config import ExitConfig
from lavis_free.exits.early_exits import BackboneOutputs, EarlyExits
from lavis_free.exits.engine import DecodeOptions, DecodeResult, EarlyExitDecoder

EXIT_PREFIX = "early_exits."
EXIT_GENERATE_KWARGS = (
    "exit_threshold", "kv_policy", "confidence", "min_exit_layer", "return_exit_stats", "early_exit",
)


class ExitCheckpointError(RuntimeError):
    """A checkpoint whose exits do not fit this model (layout, layers, or shapes)."""


class EarlyExitMixin:
    early_exits: Optional[EarlyExits]

    # -- hooks the host provides ---------------------------------------------------------
    def exit_lm(self) -> nn.Module:
        raise NotImplementedError

    def lm_training_inputs(self, samples: Mapping[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- set-up ------------------------------------------------------------------------------
    def setup_exits(self, exits_cfg: Optional[Mapping[str, Any]]) -> None:
        """Builds the exits from `model.exits`; with exits the whole backbone is frozen."""
        adapter = adapter_for(self.exit_lm())
        self.exit_config = ExitConfig.from_dict(exits_cfg, adapter.num_layers)
        self.early_exits = None
        if not self.exit_config.enabled:
            return
        for param in self.parameters():
            param.requires_grad = False
        self.early_exits = EarlyExits(adapter, self.exit_config)
        self.register_buffer(
            "exit_layers", torch.tensor(self.exit_config.layers, dtype=torch.long), persistent=True
        )

    @property
    def exit_adapter(self) -> DecoderAdapter:
        return adapter_for(self.exit_lm())

    def train(self, mode: bool = True):
        """With exits, the frozen backbone stays in eval mode; only exits (and discriminators) train."""
        super().train(mode)
        if getattr(self, "early_exits", None) is not None:
            for name, child in self.named_children():
                if name != "early_exits":
                    child.eval()
        return self

    def optimizer_groups(self) -> Dict[str, List[nn.Parameter]]:
        """One optimizer per group (read by the plugin runner): generator + discriminator with
        exits, else every trainable parameter."""
        if self.early_exits is not None:
            return self.early_exits.optimizer_groups()
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    # -- training ----------------------------------------------------------------------------
    def exit_backbone_outputs(self, samples: Mapping[str, Any]) -> BackboneOutputs:
        """The frozen backbone's hidden states for this batch (no autograd)."""
        with torch.no_grad():
            inputs_embeds, attention_mask, labels = self.lm_training_inputs(samples)
            return self.early_exits.backbone_outputs(self.exit_adapter, inputs_embeds, attention_mask, labels)

    # -- decoding ----------------------------------------------------------------------------
    def decode_options(self, max_new_tokens: int, min_length: int, prompt_length: int, **overrides: Any) -> DecodeOptions:
        """Per-call options; arguments left as None take the model config's defaults."""
        defaults = self.exit_config.inference
        values = {
            name: overrides.get(name) if overrides.get(name) is not None else getattr(defaults, name)
            for name in ("exit_threshold", "kv_policy", "confidence", "min_exit_layer")
        }
        return DecodeOptions(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.exit_lm().config.pad_token_id,
            min_length=min_length,
            prompt_length=prompt_length,
            **values,
        ).validate(self.exit_adapter.num_layers)

    def early_exit_decode(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, options: DecodeOptions
    ) -> DecodeResult:
        return EarlyExitDecoder(self.exit_adapter, self.early_exits).generate(inputs_embeds, attention_mask, options)

    def exit_stats(self, result: DecodeResult) -> Dict[str, Any]:
        """Per-sample, per-token layer counts up to and including EOS (see README)."""
        lengths = [_length_to_eos(row, self.eos_token_id) for row in result.tokens.tolist()]
        return {
            "exit_layers": [row[:n] for row, n in zip(result.layers_run, lengths)],
            "exit_blocks_run": [row[:n] for row, n in zip(result.exit_blocks_run, lengths)],
            "heads_run": [row[:n] for row, n in zip(result.heads_run, lengths)],
            "num_layers": result.num_layers,
            "head_cost": result.head_cost,
        }

    def full_depth_stats(self, sequences: List[List[int]]) -> Dict[str, Any]:
        """Stats of a decode that ran every layer (beam search, sampling, or exits off)."""
        num_layers = self.exit_adapter.num_layers
        lengths = [_length_to_eos(row, self.eos_token_id) for row in sequences]
        return {
            "exit_layers": [[num_layers] * n for n in lengths],
            "exit_blocks_run": [[0] * n for n in lengths],
            "heads_run": [[1] * n for n in lengths],
            "num_layers": num_layers,
            "head_cost": self.exit_adapter.head_cost_in_layers(),
        }

    # -- checkpoints -------------------------------------------------------------------------
    def inference_state_dict(self) -> Dict[str, torch.Tensor]:
        """Exits only, without discriminators: what an exported inference checkpoint holds."""
        state = {EXIT_PREFIX + k: v for k, v in self.early_exits.inference_state_dict().items()}
        state["exit_layers"] = self.exit_layers
        return state

    def load_checkpoint(self, url_or_filename: str):
        """LAVIS's `load_checkpoint`, checking that exits in the file fit this model first."""
        if os.path.isfile(url_or_filename):
            checkpoint = torch.load(url_or_filename, map_location="cpu")
            state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
            if not isinstance(state, dict):
                raise ExitCheckpointError(f"{url_or_filename}: not a LAVIS checkpoint (expected a dict with 'model')")
            self.check_exit_state(state, url_or_filename)
            msg = self.load_state_dict(state, strict=False)
            logging.info("loaded %s (%d tensors; %d model keys not in it)", url_or_filename, len(state), len(msg.missing_keys))
            return msg
        return super().load_checkpoint(url_or_filename)

    def check_exit_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Raises ExitCheckpointError naming the mismatch between `state`'s exits and ours."""
        exit_keys = {k for k in state if k.startswith(EXIT_PREFIX)}
        if not exit_keys:
            return
        if self.early_exits is None:
            raise ExitCheckpointError(f"{source} holds exits but this model has none (set model.exits.layers)")
        if "exit_layers" in state and state["exit_layers"].tolist() != list(self.exit_config.layers):
            raise ExitCheckpointError(
                f"{source} has exits after layers {state['exit_layers'].tolist()}, this model has "
                f"model.exits.layers={list(self.exit_config.layers)}"
            )
        own = {k: v for k, v in self.state_dict().items() if k.startswith(EXIT_PREFIX)}
        needed = {k for k in own if not k.startswith(EXIT_PREFIX + "discriminators.")}
        missing = sorted(needed - exit_keys)
        unexpected = sorted(exit_keys - set(own))
        if missing or unexpected:
            raise ExitCheckpointError(
                f"{source} does not match exit layout {self.exit_config.layout!r} with layers "
                f"{list(self.exit_config.layers)}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        for key in sorted(exit_keys):
            if state[key].shape != own[key].shape:
                raise ExitCheckpointError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, this model's is "
                    f"{tuple(own[key].shape)} (a checkpoint of another architecture)"
                )


def _length_to_eos(tokens: List[int], eos: int) -> int:
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)
