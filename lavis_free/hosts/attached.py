"""`attach_exits`: FREE exits as a capability added to a built LAVIS model, by composition.

`attach_exits(model, exits)` finds the model's `HostBinding`, freezes the backbone, registers
the exits as `model.early_exits` (so checkpoints keep the keys `early_exits.*`), and puts an
`AttachedExits` on the model as `model.free_exits`. The instance's `generate`,
`predict_answers`, `load_checkpoint` and `load_from_pretrained` then go through it; the class
(LAVIS's own, or the plugin's) is left untouched, so for LAVIS's classes `type(model).generate(model, ...)`
is still the host's own LAVIS decoding (the binding's `lavis_generate` is that path for every host).
A model without exits (a plugin model built with none) may get them attached later. Training (`lavis_free.tasks`), the runner, evaluation and benches
reach the exits through `exits_of(model)`, never through the host's class.

Decoding: every setting of LAVIS's `generate` runs the early-exit engine, with exits or at full
depth (`early_exit=False`: the same tokens as the host's own LAVIS / Hugging Face decoding with
the same settings): greedy decoding, sampling (`use_nucleus_sampling`, `num_captions` samples per
image), beam search (`num_beams`, `length_penalty`, `num_captions` best beams), each with
Hugging Face's logits processors (`repetition_penalty`, and beyond LAVIS's signature
`no_repeat_ngram_size`, `bad_words_ids`, `top_k`). `binding.lavis_generate` stays the host's
own full-depth path, the reference the tests and benches compare with.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from lavis.common.dist_utils import download_cached_file
from lavis.common.utils import is_url
from torch import nn

from lavis_free.common.safe_load import load_torch_file
from lavis_free.exits.adapters import DecoderAdapter
from lavis_free.exits.config import ExitConfig
from lavis_free.exits.early_exits import BackboneOutputs, EarlyExits
from lavis_free.exits.engine import BeamSettings, DecodeOptions, DecodeResult, EarlyExitDecoder, synced_clock
from lavis_free.exits.feature_cache import backbone_fingerprint
from lavis_free.exits.options import ExitOptions
from lavis_free.exits.processors import GREEDY, TokenChoice, token_choice
from lavis_free.hosts.binding import HF_KEYWORDS, HostBinding, binding_for, hf_extras
from lavis_free.hosts.inputs import check_decoding, check_images, samples_entry, text_batch
from lavis_free.models import weights

EXIT_PREFIX = "early_exits."
EXIT_METADATA = "exits"  # checkpoint key of `exit_metadata()`
# generate's keywords that predict_answers maps from its own (max_len -> max_length, ...)
_MAPPED = ("num_beams", "max_length", "min_length", "length_penalty")


class ExitCheckpointError(RuntimeError):
    """A checkpoint whose exits do not fit this model (layout, layers, or shapes)."""


def attach_exits(model: nn.Module, exits: Union[None, Mapping[str, Any], ExitConfig] = None) -> nn.Module:
    """Adds FREE exits (a `model.exits` mapping or an `ExitConfig`; None = none yet, but the
    early-exit keywords are accepted) to a built LAVIS model and returns it. With exits, every
    parameter the model had is frozen. Errors name the supported classes for other models."""
    attached = getattr(model, "free_exits", None)
    if attached is not None and attached.early_exits is not None:
        raise ValueError(f"{type(model).__name__} already has exits attached (model.free_exits, layers "
                         f"{list(attached.config.layers)})")
    binding = binding_for(model)
    adapter = binding.adapter(model)
    config = exits if isinstance(exits, ExitConfig) else ExitConfig.from_dict(exits, adapter.num_layers)
    if isinstance(exits, ExitConfig):
        config.validate(adapter.num_layers)
    model.early_exits = None
    if config.enabled:
        for param in model.parameters():
            param.requires_grad = False
        device = next(binding.lm(model).parameters()).device  # a model already moved keeps its exits beside it
        model.early_exits = EarlyExits(adapter, config).to(device)
        model.register_buffer("exit_layers", torch.tensor(config.layers, dtype=torch.long, device=device), persistent=True)
    controller = AttachedExits(model, binding, config)
    model.free_exits = controller
    for name in ("generate", "predict_answers", "score_answers", "load_checkpoint", "load_from_pretrained", "optimizer_groups"):
        setattr(model, name, getattr(controller, name))
    return model


def exits_of(model: nn.Module) -> Optional["AttachedExits"]:
    """The exits attached to `model` (DDP-wrapped or not), or None."""
    return getattr(getattr(model, "module", model), "free_exits", None)


class AttachedExits:
    """Everything exits add to one host model: training inputs, decoding, stats, checkpoints."""

    def __init__(self, model: nn.Module, binding: HostBinding, config: ExitConfig):
        self.model = model
        self.binding = binding
        self.config = config

    # -- what the core sees -------------------------------------------------------------------
    @property
    def early_exits(self) -> Optional[EarlyExits]:
        return self.model.early_exits

    @property
    def adapter(self) -> DecoderAdapter:
        return self.binding.adapter(self.model)

    @property
    def lm(self) -> nn.Module:
        return self.binding.lm(self.model)

    def optimizer_groups(self) -> Dict[str, List[nn.Parameter]]:
        """One optimizer per group (read by the plugin runner): generator + discriminator with
        exits, else every trainable parameter."""
        if self.early_exits is not None:
            return self.early_exits.optimizer_groups()
        return {"main": [p for p in self.model.parameters() if p.requires_grad]}

    @contextlib.contextmanager
    def frozen_backbone_eval(self) -> Iterator[None]:
        """The frozen backbone runs in eval mode (no dropout) even while the exits train."""
        children = [c for name, c in self.model.named_children() if name != "early_exits"]
        modes = [c.training for c in children]
        for child in children:
            child.eval()
        try:
            yield
        finally:
            for child, mode in zip(children, modes):
                child.train(mode)

    def backbone_outputs(self, samples: Mapping[str, Any]) -> BackboneOutputs:
        """The frozen backbone's hidden states for this batch (no autograd)."""
        with torch.no_grad(), self.frozen_backbone_eval():
            batch = self.binding.training_batch(self.model, samples)
            return self.early_exits.backbone_outputs(self.adapter, batch)

    # -- decoding -------------------------------------------------------------------------------
    def exit_options(self, **given: Any) -> ExitOptions:
        """Per-call early-exit options over the config's `exits.inference`; asking for exits on a
        model without exits is an error (it would otherwise decode at full depth as if exits had
        been tried)."""
        options = self.config.inference.override(**given).validate(self.adapter.num_layers)
        if options.enabled and self.early_exits is None:
            asked = {k: v for k, v in given.items() if v is not None}
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in asked.items()) or 'exits.inference'} asks for early exits, "
                "but this model has none (model.exits.layers is empty); load a model with exits, or pass "
                "early_exit=False for full depth"
            )
        return options

    def decode(self, lm_batch, options: DecodeOptions) -> DecodeResult:
        """The engine on a prefix built by the binding (the one call every decode goes through)."""
        return EarlyExitDecoder(self.adapter, self.early_exits).generate(lm_batch, options)

    @torch.no_grad()
    def generate_texts(
        self, image: torch.Tensor, prompts: Sequence[str], return_exit_stats: bool = False, **kwargs: Any
    ) -> Union[List[str], Tuple[List[str], dict]]:
        """`num_captions` continuations per prompt (greedy: one), decoded by the engine for every
        setting (module docstring). `kwargs` are LAVIS's generate keywords, the Hugging Face extras
        (`HF_KEYWORDS`) and the early-exit options."""
        defaults = self.binding.generate_defaults
        ExitOptions.check_names(kwargs, "generate()", also=tuple(defaults) + HF_KEYWORDS)
        decoding = {name: kwargs.pop(name, default) for name, default in defaults.items()}
        decoding.update({name: kwargs.pop(name) for name in HF_KEYWORDS if name in kwargs})
        check_decoding(decoding)
        if decoding["num_captions"] > decoding["num_beams"] and not decoding["use_nucleus_sampling"]:
            raise ValueError(
                f"num_captions={decoding['num_captions']} needs num_beams >= {decoding['num_captions']} (beam search "
                "returns its best beams) or use_nucleus_sampling=True"
            )
        options = self.exit_options(**kwargs)
        sampling = bool(decoding["use_nucleus_sampling"])
        beams = None
        if decoding["num_beams"] > 1 and not sampling:  # sampling ignores num_beams, as LAVIS does
            beams = BeamSettings(decoding["num_beams"], float(decoding["length_penalty"]),
                                 self.lm.generation_config.early_stopping, decoding["num_captions"])
        ids = self.binding.special_ids(self.model)
        new_tokens = self.binding.max_new_tokens(decoding["max_length"])
        if new_tokens < 1:
            raise ValueError(f"max_length={decoding['max_length']} leaves no token to generate for this host "
                             f"(it counts {decoding['max_length'] - new_tokens} start token; predict_answers: max_len)")
        started = synced_clock(image.device)
        lm_batch = self.binding.decode_batch(self.model, image, prompts, new_tokens)
        image_seconds = synced_clock(image.device) - started
        if decoding["min_length"] > lm_batch.prompt_length + new_tokens:
            counted = f"{lm_batch.prompt_length} start token(s) plus " if lm_batch.prompt_length else ""
            raise ValueError(
                f"min_length={decoding['min_length']} can never be reached: it counts {counted}at most {new_tokens} "
                f"generated tokens from max_length={decoding['max_length']} (predict_answers: min_len, max_len)"
            )
        copies = decoding["num_captions"] if sampling else 1
        result = self.decode(lm_batch, DecodeOptions(
            max_new_tokens=new_tokens, eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id,
            min_length=decoding["min_length"], exits=options, suppressed_ids=self.binding.suppressed_ids(self.model),
            choice=self._token_choice(decoding, lm_batch, new_tokens), copies=copies, beams=beams,
        ))
        texts = self.binding.decode_text(self.model, result.tokens)
        return (texts, self.exit_stats(result, image_seconds)) if return_exit_stats else texts

    def _token_choice(self, decoding: Mapping[str, Any], lm_batch, new_tokens: int) -> TokenChoice:
        """Hugging Face's processors (and warpers when sampling) for these settings, as the host's
        LAVIS decoding would get them; plain greedy decoding needs none."""
        sampling = bool(decoding["use_nucleus_sampling"])
        generation = hf_extras(decoding)
        if decoding["repetition_penalty"] != 1.0:
            generation["repetition_penalty"] = decoding["repetition_penalty"]
        if sampling:
            generation.update(top_p=decoding["top_p"], temperature=decoding["temperature"])
        if not generation:
            return GREEDY
        ids = self.binding.special_ids(self.model)  # the host's, not the LM config's (BLIP-2 OPT ends on "\n")
        generation.update(eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id)
        num_beams = 1 if sampling else decoding["num_beams"]
        return token_choice(self.lm, generation, lm_batch.input_ids.shape[1], new_tokens, do_sample=sampling,
                            num_beams=num_beams)

    def generate(self, samples: Mapping[str, Any], return_exit_stats: bool = False, **kwargs: Any):
        """Captions for `samples["image"]`: the host's LAVIS `generate` signature and defaults
        (`binding.generate_defaults`) plus the early-exit options (`ExitOptions`: early_exit, exit_threshold, kv_policy,
        confidence, min_exit_layer; None = the config's `exits.inference`). `samples["prompt"]`
        is one string for the batch or one per image (default: the model's prompt). With
        `return_exit_stats=True` returns `(captions, stats)`: `stats["exit_layers"][i][t]` is the
        number of LM decoder layers run for token t of sample i (up to its EOS); with beam search
        row i is a beam slot and t its every computed step."""
        image = check_images(self.model, samples_entry(samples, "image"))
        prompts = text_batch(samples.get("prompt", getattr(self.model, "prompt", "")), "prompt", len(image))
        return self.generate_texts(image, prompts, return_exit_stats=return_exit_stats, **kwargs)

    def predict_answers(self, samples: Mapping[str, Any], **kwargs: Any) -> List[str]:
        """Open-ended answers (`samples["text_input"]` = the question, or history + question):
        the host's LAVIS `predict_answers` arguments (`binding.answer_defaults`; `prompt` wraps each text
        at its "{}", "" uses the text as is; `answer_list` / `num_ans_candidates` are accepted
        and unused, only `inference_method="generate"` exists) plus generate's options."""
        own_defaults = self.binding.answer_defaults
        passed_on = tuple(k for k in self.binding.generate_defaults if k not in _MAPPED)
        ExitOptions.check_names(kwargs, "predict_answers()", also=tuple(own_defaults) + passed_on + ("return_exit_stats",))
        own = {name: kwargs.pop(name, default) for name, default in own_defaults.items()}
        if own["inference_method"] != "generate":
            raise ValueError(f"inference_method={own['inference_method']!r} is not supported with exits; use 'generate'")
        image, prompts = self._question_prompts(samples, own["prompt"])
        answers = self.generate_texts(image, prompts, num_beams=own["num_beams"], max_length=own["max_len"],
                                      min_length=own["min_len"], length_penalty=own["length_penalty"], **kwargs)
        if getattr(self.model, "_apply_lemmatizer", False):  # LAVIS's T5 hosts (OK-VQA configs): as they do
            texts = answers[0] if kwargs.get("return_exit_stats") else answers
            texts[:] = self.model._lemmatize(texts)
        return answers

    @torch.no_grad()
    def score_answers(self, samples: Mapping[str, Any], answer_options: Sequence[Any], prompt: Optional[str] = None,
                      return_exit_stats: bool = False, **kwargs: Any) -> Union[torch.Tensor, Tuple[torch.Tensor, dict]]:
        """Log-likelihood scores [B, n] of answer options (VisDial's ranking): `answer_options`
        is one list of n strings per sample (the same n for all) or one list for every sample;
        `samples` and `prompt` as for `predict_answers`; `kwargs` the early-exit options.

        An option's score is the sum, over its tokens and the EOS after them (as the host's
        `forward` scores an answer), of the log-probability the model gives each token after
        the prompt and the option's earlier tokens. With exits on, each token's log-probability
        is read at the exit the decoding rule takes for it (the first whose confidence passes
        the threshold; see `lavis_free.exits.engine`) and its deeper layers are not run, so
        ranking is as fast as decoding the options would be; with exits off it is the
        full-depth likelihood. With `return_exit_stats=True`, returns `(scores, stats)` with one
        stats row per (sample, option), sample-major."""
        ExitOptions.check_names(kwargs, "score_answers()")
        options = self.exit_options(**kwargs)
        image, prompts = self._question_prompts(samples, self.binding.answer_defaults["prompt"] if prompt is None else prompt)
        candidates = _option_lists(answer_options, len(image))
        per_row = len(candidates[0])
        flat = [option for row in candidates for option in row]
        started = synced_clock(image.device)
        targets = self.binding.answer_tokens(self.model, [p for p in prompts for _ in range(per_row)], flat, image.device)
        ids = self.binding.special_ids(self.model)
        lm_batch = self.binding.decode_batch(self.model, image, prompts, targets.shape[1])
        image_seconds = synced_clock(image.device) - started
        result = self.decode(lm_batch, DecodeOptions(
            max_new_tokens=targets.shape[1], eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id,
            exits=options, suppressed_ids=self.binding.suppressed_ids(self.model), forced_tokens=targets, copies=per_row,
        ))
        scores = result.token_logprobs.sum(dim=1).view(len(image), per_row)
        return (scores, self.exit_stats(result, image_seconds)) if return_exit_stats else scores

    def _question_prompts(self, samples: Mapping[str, Any], prompt: Any) -> Tuple[torch.Tensor, List[str]]:
        """(checked images, one prompt per image): `samples["text_input"]` put at the prompt's "{}"."""
        if not isinstance(prompt, str) or (prompt and prompt.count("{}") != 1):
            raise ValueError(f"prompt={prompt!r} must be a string with one '{{}}' where the question goes, or ''")
        image = check_images(self.model, samples_entry(samples, "image"))
        texts = text_batch(samples_entry(samples, "text_input"), "text_input", len(image))
        try:
            return image, ([prompt.format(text) for text in texts] if prompt else texts)
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"prompt={prompt!r} cannot be filled ({err!r}): other braces must be doubled, {{{{ }}}}") from None

    # -- stats ----------------------------------------------------------------------------------
    def _eos(self) -> int:
        return self.binding.special_ids(self.model).eos_token_id

    def exit_stats(self, result: DecodeResult, image_seconds: float = 0.0) -> Dict[str, Any]:
        """Per-sample, per-token layer counts up to and including EOS (see README), and where
        the time went (`seconds`: image side with tokenizing and embedding, prefill, cache copies,
        token loop; `lavis_free.tasks.exit_eval.TIME_PARTS`)."""
        if result.per_beam_slot:  # every step of every beam slot was computed
            lengths = [len(row) for row in result.layers_run]
        else:
            lengths = [_length_to_eos(row, self._eos()) for row in result.tokens.tolist()]
        return {
            "exit_layers": [row[:n] for row, n in zip(result.layers_run, lengths)],
            "exit_blocks_run": [row[:n] for row, n in zip(result.exit_blocks_run, lengths)],
            "heads_run": [row[:n] for row, n in zip(result.heads_run, lengths)],
            "num_layers": result.num_layers,
            "head_cost": result.head_cost,
            "seconds": {"image": image_seconds, **result.seconds},
        }

    # -- checkpoints -------------------------------------------------------------------------
    def inference_state_dict(self) -> Dict[str, torch.Tensor]:
        """Exits only, without discriminators: the tensors of an exported inference checkpoint."""
        state = {EXIT_PREFIX + k: v for k, v in self.early_exits.inference_state_dict().items()}
        state["exit_layers"] = self.model.exit_layers
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
        return {**self._exit_layout(), "backbone": backbone_fingerprint(self.model, trainable_prefix=EXIT_PREFIX)}

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
        if not set(state) & set(self.model.state_dict()):
            example = f", e.g. {sorted(state)[:3]}" if state else ""
            raise ExitCheckpointError(
                f"{source} holds none of this model's tensors ({len(state)} keys{example}): a checkpoint of another model?"
            )
        msg = self.model.load_state_dict(state, strict=False)
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
                    f"model.exits.layers={list(self.config.layers)}; give a file of trained exits "
                    "(an exported exits file or a runner checkpoint of exit training)"
                )
            return
        if self.early_exits is None:
            raise ExitCheckpointError(f"{source} holds exits but this model has none (set model.exits.layers)")
        self._check_exit_layout(state, source, metadata)
        own = {k: v for k, v in self.model.state_dict().items() if k.startswith(EXIT_PREFIX)}
        optional = tuple(EXIT_PREFIX + name for name in ("discriminators.", "confidence_heads.", "confidence_fitted"))
        needed = {k for k in own if not k.startswith(optional)}
        missing = sorted(needed - exit_keys)
        unexpected = sorted(exit_keys - set(own))
        if missing or unexpected:
            raise ExitCheckpointError(
                f"{source} does not match exit layout {self.config.layout!r} with layers "
                f"{list(self.config.layers)}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
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
            current = backbone_fingerprint(self.model, trainable_prefix=EXIT_PREFIX)
            if saved_backbone != current:
                raise ExitCheckpointError(
                    f"{source} holds exits trained on another backbone (fingerprint {saved_backbone[:12]}, "
                    f"this model's {current[:12]}): exits fit only the frozen weights they were trained on; "
                    "check model.finetuned / model.pretrained"
                )

    def _exit_layout(self) -> Dict[str, Any]:
        return {**self.config.layout_signature(), "lm_layers": self.adapter.num_layers}

    def _check_exit_layout(
        self, state: Mapping[str, torch.Tensor], source: str, metadata: Optional[Mapping[str, Any]]
    ) -> None:
        saved = dict(metadata or {})
        if not saved and "exit_layers" in state:
            saved = {"layers": state["exit_layers"].tolist()}
        if not saved:
            logging.warning(
                "%s records no exit layers (it predates exit metadata): cannot check that its exits were "
                "trained after layers %s", source, list(self.config.layers)
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


def _option_lists(answer_options: Any, batch: int) -> List[List[str]]:
    """`answer_options` as one list of options per sample, all of one length, checked."""
    if isinstance(answer_options, (list, tuple)) and answer_options and all(isinstance(o, str) for o in answer_options):
        answer_options = [list(answer_options)] * batch
    if (not isinstance(answer_options, (list, tuple)) or len(answer_options) != batch
            or not all(isinstance(row, (list, tuple)) and row and all(isinstance(o, str) for o in row) for row in answer_options)):
        raise ValueError(f"answer_options must be one non-empty list of strings for every sample, or one per sample "
                         f"({batch} here), got {type(answer_options).__name__}"
                         f"{f' of {len(answer_options)}' if isinstance(answer_options, (list, tuple)) else ''}")
    sizes = sorted({len(row) for row in answer_options})
    if len(sizes) > 1:
        raise ValueError(f"answer_options must give every sample the same number of options, got sizes {sizes}")
    return [list(row) for row in answer_options]


def _length_to_eos(tokens: List[int], eos: int) -> int:
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)
