"""`LMBatch`: a batch as the LM's decoder sees it, the one input format of the exits core.

Why one format: hosts differ in how they turn `samples` into LM inputs (BLIP-2 OPT puts image
queries before the prompt in the decoder; BLIP-2 T5 puts them in the encoder and starts the
decoder from its start token), but once a host binding has built an `LMBatch`, training, the
decoding engine and the oracles treat every LM family alike.

Labels are aligned: `labels[:, t]` is the token that decoder position t must predict (the host
shifts them where its LM needs it), -100 where nothing is scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lavis_free.exits.adapters.base import EncoderContext

IGNORE_INDEX = -100


@dataclass
class LMBatch:
    inputs_embeds: torch.Tensor  # [B, T, D] decoder token embeddings, before position information
    attention_mask: torch.Tensor  # [B, T], 1 = real column (prompts are left-padded)
    labels: Optional[torch.Tensor] = None  # [B, T] aligned targets (training), -100 = unscored
    encoder: Optional[EncoderContext] = None  # what the decoder cross-attends to (encoder-decoder LMs)
    prompt_length: int = 0  # decoding: tokens `min_length` counts besides generated ones (a decoder start token)
    input_ids: Optional[torch.Tensor] = None  # decoding: [B, P] the ids Hugging Face's generate starts from (processors read them)


def shift_to_aligned(labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels (`labels[:, t]` = token t, HF's convention) -> aligned labels (the target
    of position t is token t + 1): the host-side shift, done once, of decoder-only LMs."""
    aligned = torch.full_like(labels, IGNORE_INDEX)
    aligned[:, :-1] = labels[:, 1:]
    return aligned
