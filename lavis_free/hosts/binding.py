"""The host seam: what the exits core needs from one LAVIS model class, said in one place.

A `HostBinding` is the explicit contract between a LAVIS model (the "host": `Blip2OPT`,
`Blip2T5`, the plugin's subclasses of them) and the model-agnostic exits core. It answers:
  - which module is the LM, and its special ids (`lm`, `special_ids`);
  - how a batch of `samples` becomes LM inputs for training, with labels already aligned to the
    positions that predict them (`training_batch`), and how images + prompts become a decoder
    prefix for decoding (`decode_batch`);
  - how generated ids become text (`decode_text`), and how the host decodes by itself at full
    depth for the settings the engine does not run (`lavis_generate`).
One binding per host class, registered with `register_host`; `binding_for(model)` finds it by
class name along the model's MRO, so a subclass of a LAVIS class (the plugin's models, a user's)
is served by its parent's binding unless it registers its own. README: "Adding a host model or an LM family".
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Type

import torch
from torch import nn

from lavis_free.exits.adapters import DecoderAdapter, adapter_for
from lavis_free.exits.lm_batch import LMBatch

HOST_DOC = "README.md, section 'Adding a host model or an LM family'"


# Hugging Face generate keywords the plugin accepts beyond LAVIS's generate signature; every
# `lavis_generate` passes them on (`hf_extras`), and the engine applies them as processors.
HF_KEYWORDS = ("no_repeat_ngram_size", "bad_words_ids", "top_k")


def hf_extras(decoding: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: decoding[k] for k in HF_KEYWORDS if k in decoding}


@dataclass(frozen=True)
class SpecialIds:
    eos_token_id: int  # the id that ends generation (BLIP-2 OPT: "\n"; T5: </s>)
    pad_token_id: int  # written after EOS


class HostBinding(ABC):
    """How the exits core reaches one LAVIS model class (see the module docstring)."""

    host_class: str  # the LAVIS class name this binding serves (matched along the MRO)
    # The host's own `generate` / `predict_answers` defaults (LAVIS's signatures); BLIP-2's here.
    generate_defaults: Mapping[str, Any] = dict(
        use_nucleus_sampling=False, num_beams=5, max_length=30, min_length=1, top_p=0.9,
        repetition_penalty=1.0, length_penalty=1.0, num_captions=1, temperature=1,
    )
    answer_defaults: Mapping[str, Any] = dict(
        num_beams=5, inference_method="generate", max_len=10, min_len=1, num_ans_candidates=128,
        answer_list=None, prompt="Question: {} Answer:", length_penalty=0,
    )

    @abstractmethod
    def lm(self, model: nn.Module) -> nn.Module:
        """The language model whose decoder layers carry the exits."""

    def adapter(self, model: nn.Module) -> DecoderAdapter:
        return adapter_for(self.lm(model))

    @abstractmethod
    def special_ids(self, model: nn.Module) -> SpecialIds: ...

    @abstractmethod
    def training_batch(self, model: nn.Module, samples: Mapping[str, Any]) -> LMBatch:
        """Teacher-forcing inputs of `samples` as the host's own `forward` trains on them, with
        aligned labels. With `samples["text_output"]`, `text_input` is the (unscored) prompt and
        `text_output` the scored target; without it, LAVIS's captioning convention holds."""

    @abstractmethod
    def decode_batch(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str], max_new_tokens: int) -> LMBatch:
        """The decoder prefix for one continuation per prompt of up to `max_new_tokens` tokens
        (its `prompt_length` = what `min_length` counts besides generated tokens: the start token
        where `max_length` counts it too, README "Lengths"); a host whose positions are bounded
        checks them here."""

    @abstractmethod
    def decode_text(self, model: nn.Module, tokens: torch.Tensor) -> List[str]:
        """Generated ids [B, T] (pad after EOS) -> texts, as the host's `generate` post-processes."""

    @abstractmethod
    def lavis_generate(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str], **decoding: Any) -> torch.Tensor:
        """The host's own full-depth decoding (beam search, sampling, processors) of one
        continuation per prompt, with LAVIS's keyword names; returns generated ids [N, T]."""

    @abstractmethod
    def answer_tokens(self, model: nn.Module, prompts: Sequence[str], answers: Sequence[str], device: torch.device) -> torch.Tensor:
        """[N, T] ids the LM emits for each answer after its prompt (one prompt per answer), as
        the host's `forward` scores them: the answer's tokens, then EOS, pad after (scoring
        answer options)."""

    def max_new_tokens(self, max_length: int) -> int:
        """New tokens the host's `generate(max_length=...)` produces at most (LAVIS's BLIP-2 passes
        `max_new_tokens=max_length`)."""
        return max_length

    def suppressed_ids(self, model: nn.Module) -> Tuple[int, ...]:
        """Ids decoding must never produce (at every exit and the final head), e.g. a padding
        token a host added to its tokenizer; none by default."""
        return ()

    def settings(self, model: nn.Module) -> Dict[str, Any]:
        """What training inputs depend on besides the weights (the feature cache's manifest)."""
        return {"prompt": getattr(model, "prompt", None), "max_txt_len": getattr(model, "max_txt_len", None)}


def padded_rows(rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> torch.Tensor:
    """Token id lists of different lengths -> [N, longest], `pad_token_id` after each."""
    longest = max(len(row) for row in rows)
    return torch.tensor([list(row) + [pad_token_id] * (longest - len(row)) for row in rows], dtype=torch.long, device=device)


_BINDINGS: Dict[str, HostBinding] = {}


def register_host(binding_cls: Type[HostBinding]) -> Type[HostBinding]:
    """Class decorator: registers one instance of the binding for its `host_class`."""
    _BINDINGS[binding_cls.host_class] = binding_cls()
    return binding_cls


def binding_for(model: nn.Module) -> HostBinding:
    """The binding of `model`'s class or its nearest registered base; errors name the supported ones.

    A class may say which LAVIS class it stands for (`lavis_host_class`): the plugin's
    InstructBLIP models re-implement LAVIS main's `Blip2T5Instruct` / `Blip2VicunaInstruct` on
    1.0.2 and share their bindings (and attribute names) with them."""
    for cls in type(model).__mro__:
        name = cls.__dict__.get("lavis_host_class", cls.__name__)
        if name in _BINDINGS:
            return _BINDINGS[name]
    raise NotImplementedError(
        f"lavis_free cannot attach exits to a {type(model).__name__}: supported LAVIS model classes "
        f"(and their subclasses) are {', '.join(sorted(_BINDINGS))}; to add one, see {HOST_DOC}"
    )


def supported_hosts() -> List[str]:
    return sorted(_BINDINGS)
