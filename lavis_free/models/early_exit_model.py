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
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from lavis.common.dist_utils import download_cached_file
from lavis.common.utils import is_url
from torch import nn

from lavis_free.common.safe_load import load_torch_file
from lavis_free.exits.adapters import DecoderAdapter, adapter_for
from lavis_free.exits.config import ExitConfig
from lavis_free.exits.early_exits import BackboneOutputs, EarlyExits
from lavis_free.exits.engine import DecodeOptions, DecodeResult, EarlyExitDecoder
from lavis_free.exits.feature_cache import backbone_fingerprint
from lavis_free.models import weights

EXIT_PREFIX = "early_exits."
EXIT_METADATA = "exits"  # checkpoint key of `exit_metadata()`
# The per-call early-exit options of `generate`; None takes the model config's `exits.inference`.
EXIT_OPTIONS = ("exit_threshold", "kv_policy", "confidence", "min_exit_layer")


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
        """Per-call options; arguments left as None take the model config's defaults.

        Asking for exits (an option of `EXIT_OPTIONS` given, exits on) on a model without exits
        is an error: it would otherwise decode at full depth as if exits had been tried."""
        given = {name: value for name, value in overrides.items() if value is not None}
        values = {name: given.get(name, getattr(self.exit_config.inference, name)) for name in EXIT_OPTIONS}
        options = DecodeOptions(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.exit_lm().config.pad_token_id,
            min_length=min_length,
            prompt_length=prompt_length,
            **values,
        ).validate(self.exit_adapter.num_layers)
        if given and options.exits_enabled and self.early_exits is None:
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in given.items())} asks for early exits, but this model "
                "has none (model.exits.layers is empty); load a model with exits, or pass exit_threshold "
                "above 1 for full depth"
            )
        return options

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
        """Exits only, without discriminators: the tensors of an exported inference checkpoint."""
        state = {EXIT_PREFIX + k: v for k, v in self.early_exits.inference_state_dict().items()}
        state["exit_layers"] = self.exit_layers
        return state

    def inference_checkpoint(self) -> Dict[str, Any]:
        """What an exported exits file holds: `{"model": inference_state_dict(), "exits":
        exit_metadata()}`, so that loading it can check the layout and the backbone."""
        return {"model": self.inference_state_dict(), EXIT_METADATA: self.exit_metadata()}

    def exit_metadata(self) -> Optional[Dict[str, Any]]:
        """What exits depend on, recorded in every checkpoint that holds them (None without
        exits): the exit layers and layout, the LM depth, and the frozen backbone's fingerprint
        (the one the feature cache uses), since exits fit only the backbone they were trained on."""
        if self.early_exits is None:
            return None
        return {**self._exit_layout(), "backbone": backbone_fingerprint(self, trainable_prefix=EXIT_PREFIX)}

    def load_checkpoint(
        self, url_or_filename: Union[str, os.PathLike], origin: str = "load_model(checkpoint=)", exits_required: bool = True
    ) -> Any:
        """LAVIS's `load_checkpoint` (a URL, or a file holding a state dict or `{"model": ...}`),
        loaded with `weights_only=True` and checked first; `origin` (the YAML key or argument the
        path came from) is named in every error. Refused: a file that shares no tensor with the
        model, a tensor holding NaN or infinity, and, when `exits_required` and the model has
        exits, a file without exit tensors (it would leave untrained exits deciding at the
        calibrated threshold)."""
        path = os.fspath(url_or_filename)
        if is_url(path):
            weights.require(weights.checkpoint(path, origin))
            path = download_cached_file(path, check_hash=False, progress=True)
        checkpoint = load_torch_file(path, origin)
        state = checkpoint.get("model", checkpoint)
        source = f"{path} ({origin})"
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ExitCheckpointError(f"{source} is not a state dict (expected tensors by name, or {{'model': state dict}})")
        non_finite = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if non_finite is not None:
            raise ExitCheckpointError(f"{source}: {non_finite} holds NaN or infinite values (saved from a diverged run?)")
        self.check_exit_state(state, source, checkpoint.get(EXIT_METADATA), exits_required=exits_required)
        if not set(state) & set(self.state_dict()):
            example = f", e.g. {sorted(state)[:3]}" if state else ""
            raise ExitCheckpointError(
                f"{source} holds none of this model's tensors ({len(state)} keys{example}): a checkpoint of another model?"
            )
        msg = self.load_state_dict(state, strict=False)
        logging.info("loaded %s (%d tensors; %d model keys not in it)", source, len(state), len(msg.missing_keys))
        return msg

    def load_from_pretrained(self, url_or_filename: str):
        """LAVIS's `pretrained` load: Blip2Base's unpickles with a bare `torch.load`; here it is
        `load_checkpoint` of a backbone file (which need not hold exits)."""
        return self.load_checkpoint(url_or_filename, origin="model.pretrained", exits_required=False)

    def check_exit_state(
        self,
        state: Mapping[str, torch.Tensor],
        source: str,
        metadata: Optional[Mapping[str, Any]] = None,
        exits_required: bool = False,
    ) -> None:
        """Raises ExitCheckpointError naming the mismatch between `state`'s exits and ours.

        `metadata` is the checkpoint's `exit_metadata()`; files that predate it are checked by
        their `exit_layers` buffer when they have one."""
        exit_keys = {k for k in state if k.startswith(EXIT_PREFIX)}
        if not exit_keys:
            if exits_required and self.early_exits is not None:
                raise ExitCheckpointError(
                    f"{source} holds no exit tensors (no '{EXIT_PREFIX}*' keys), so it would load nothing onto "
                    f"model.exits.layers={list(self.exit_config.layers)}; give a file of trained exits "
                    "(an exported exits file or a runner checkpoint of exit training)"
                )
            return
        if self.early_exits is None:
            raise ExitCheckpointError(f"{source} holds exits but this model has none (set model.exits.layers)")
        self._check_exit_layout(state, source, metadata)
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
        saved_backbone = (metadata or {}).get("backbone")
        if saved_backbone is not None:
            current = backbone_fingerprint(self, trainable_prefix=EXIT_PREFIX)
            if saved_backbone != current:
                raise ExitCheckpointError(
                    f"{source} holds exits trained on another backbone (fingerprint {saved_backbone[:12]}, "
                    f"this model's {current[:12]}): exits fit only the frozen weights they were trained on; "
                    "check model.finetuned / model.pretrained"
                )

    def _exit_layout(self) -> Dict[str, Any]:
        return {**self.exit_config.layout_signature(), "lm_layers": self.exit_adapter.num_layers}

    def _check_exit_layout(
        self, state: Mapping[str, torch.Tensor], source: str, metadata: Optional[Mapping[str, Any]]
    ) -> None:
        saved = dict(metadata or {})
        if not saved and "exit_layers" in state:
            saved = {"layers": state["exit_layers"].tolist()}
        if not saved:
            logging.warning(
                "%s records no exit layers (it predates exit metadata): cannot check that its exits were "
                "trained after layers %s", source, list(self.exit_config.layers)
            )
            return
        own = self._exit_layout()
        for key, (what, setting) in _LAYOUT_SETTINGS.items():
            if key in saved and saved[key] != own[key]:
                raise ExitCheckpointError(f"{source} has {what} {saved[key]!r}, this model has {setting}={own[key]!r}")


# exit_metadata() field -> (what the checkpoint has, the setting it must equal)
_LAYOUT_SETTINGS = {
    "layers": ("exits after layers", "model.exits.layers"),
    "layout": ("exits of layout", "model.exits.layout"),
    "lm_layers": ("an LM depth (decoder layers) of", "LM decoder layers"),
}


def _length_to_eos(tokens: List[int], eos: int) -> int:
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)
