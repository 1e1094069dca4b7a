"""Hugging Face's logits processors and warpers, built exactly as the LM's own `generate` builds them.

Why build them through the LM: `generate` starts from the model's `generation_config`, updates it
with the call's keywords, then asks `_get_logits_processor` / `_get_logits_warper` for the lists
(repetition penalty, no-repeat n-gram, bad words, min length, forced tokens; temperature, top-k,
top-p). Doing the same here gives the engine the library's own classes with the library's
defaults (a model's `top_k=50`, say), so with exits off the engine's tokens equal `generate`'s.
Those two methods are private; their signatures agree on what is used here from transformers
4.26 to 4.33 (the two stacks this project supports).

The engine applies the processors to the logits of every exit and of the final head alike, on
each row's ids so far (the ids `generate` starts from, then the generated tokens): the exit rule
sees processed logits. Warpers only shape the distribution a token is sampled from.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from transformers.generation.logits_process import LogitsProcessorList

# generate keywords that change the logits the engine works on (beyond min length and EOS)
PROCESSOR_KEYWORDS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids")
SAMPLING_KEYWORDS = ("temperature", "top_k", "top_p")


@dataclass(frozen=True)
class TokenChoice:
    """How tokens are chosen from logits: processors (None: none), and warpers when sampling."""

    processors: Optional[LogitsProcessorList] = None
    warpers: Optional[LogitsProcessorList] = None  # None = greedy (argmax)

    @property
    def sampling(self) -> bool:
        return self.warpers is not None

    def process(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.processors is None else self.processors(input_ids, logits)

    def choose(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The next token per row from processed logits: argmax, or a sample of the warped
        distribution (`torch.multinomial`, as `generate`'s sampling does)."""
        if self.warpers is None:
            return logits.argmax(-1)
        probs = torch.softmax(self.warpers(input_ids, logits), dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)


GREEDY = TokenChoice()


def token_choice(lm: Any, generation: Mapping[str, Any], input_ids_length: int, max_new_tokens: int,
                 do_sample: bool, num_beams: int = 1) -> TokenChoice:
    """The processors (and warpers when `do_sample`) `lm.generate(**generation)` would use, for
    ids of `input_ids_length` columns at the start and up to `max_new_tokens` new ones. `generation` holds `generate` keywords
    (e.g. repetition_penalty, no_repeat_ngram_size, bad_words_ids, top_p, temperature); min
    length and suppressed ids are the engine's own (`EarlyExitDecoder._constrain`) and are not
    passed here. An empty list means plain greedy decoding."""
    config = copy.deepcopy(lm.generation_config)
    config.update(**dict(generation), do_sample=do_sample, num_beams=num_beams)
    config.min_length, config.min_new_tokens = 0, None
    config.max_length = input_ids_length + max_new_tokens  # as generate sets it from max_new_tokens
    processors = lm._get_logits_processor(
        generation_config=config, input_ids_seq_length=input_ids_length, encoder_input_ids=None,
        prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(),
    )
    warpers = lm._get_logits_warper(config) if do_sample else None
    return TokenChoice(processors if len(processors) else None, warpers)
