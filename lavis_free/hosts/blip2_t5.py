"""Host binding of LAVIS's BLIP-2 FlanT5 (`Blip2T5`, and so `blip2_t5_free`): encoder-decoder.

The image queries and the prompt go to the T5 *encoder* ([queries, prompt tokens </s>, pads]:
right-padded, as Blip2T5 tokenizes); the encoder runs once per batch and its output is the
`EncoderContext` every decoder layer and every exit cross-attends to. The decoder starts from
T5's start token (pad, id 0); exits sit on decoder layers. Training follows `Blip2T5.forward`:
encoder text = `text_input`, decoder target = `text_output` (ending in </s>), decoder inputs =
the target shifted right, so labels are aligned as they are. Captioning batches (no
`text_output`) put the model's prompt in the encoder and the caption in the decoder.
`min_length` counts the start token, as Hugging Face's does for encoder-decoders.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from lavis_free.exits.adapters.base import EncoderContext
from lavis_free.exits.lm_batch import IGNORE_INDEX, LMBatch
from lavis_free.hosts.binding import HostBinding, SpecialIds, hf_extras, register_host
from lavis_free.hosts.blip2 import image_queries, training_texts


@register_host
class Blip2T5Binding(HostBinding):
    host_class = "Blip2T5"
    answer_defaults = {**HostBinding.answer_defaults, "prompt": "", "length_penalty": -1}  # Blip2T5.predict_answers'

    def lm(self, model: nn.Module) -> nn.Module:
        return model.t5_model

    def special_ids(self, model: nn.Module) -> SpecialIds:
        config = model.t5_model.config
        return SpecialIds(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)

    def _encoder_inputs(self, model: nn.Module, image: torch.Tensor, texts: Sequence[str], truncate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """[queries, tokens] embeddings and mask of the T5 encoder (Blip2T5's tokenization:
        right padding; truncated to `max_txt_len` for training only, as LAVIS does)."""
        queries, atts = self.queries(model, image, texts)
        limits = dict(truncation=True, max_length=model.max_txt_len) if truncate else {}
        tokens = model.t5_tokenizer(list(texts), padding="longest", return_tensors="pt", **limits).to(image.device)
        token_embeds = model.t5_model.encoder.embed_tokens(tokens.input_ids)
        # LAVIS concatenates the (fp32) queries with the (bf16 on GPU) embeddings, which promotes
        # to fp32: its T5 encoder keeps an fp32 residual stream, and so does this
        return (torch.cat([queries, token_embeds.to(queries.dtype)], dim=1),
                torch.cat([atts, tokens.attention_mask], dim=1))

    def queries(self, model: nn.Module, image: torch.Tensor, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The image queries in the T5's space (BLIP-2: the Q-Former reads the image alone)."""
        return image_queries(model, image, model.t5_proj)

    def target_tokens(self, model: nn.Module, targets: Sequence[str], device: torch.device):
        """Decoder targets as the host's `forward` tokenizes them (each ends with </s>)."""
        return model.t5_tokenizer(list(targets), padding="longest", truncation=True, max_length=model.max_txt_len,
                                  return_tensors="pt").to(device)

    def answer_tokens(self, model: nn.Module, prompts: Sequence[str], answers: Sequence[str], device: torch.device) -> torch.Tensor:
        tokens = self.target_tokens(model, answers, device)
        return tokens.input_ids.masked_fill(tokens.attention_mask == 0, self.special_ids(model).pad_token_id)

    def _encode(self, model: nn.Module, image: torch.Tensor, texts: Sequence[str], truncate: bool) -> EncoderContext:
        inputs_embeds, mask = self._encoder_inputs(model, image, texts, truncate)
        with model.maybe_autocast(dtype=torch.bfloat16):
            states = model.t5_model.encoder(inputs_embeds=inputs_embeds, attention_mask=mask, return_dict=True).last_hidden_state
        return EncoderContext(states, mask)

    def training_batch(self, model: nn.Module, samples: Mapping[str, Any]) -> LMBatch:
        image, prompts, targets = training_texts(model, samples)
        if not any(prompts):
            prompts = [model.prompt] * len(targets)
        encoder = self._encode(model, image, prompts, truncate=True)
        tokens = self.target_tokens(model, targets, image.device)
        labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, IGNORE_INDEX)
        decoder_ids = model.t5_model._shift_right(labels)
        inputs_embeds = model.t5_model.decoder.embed_tokens(decoder_ids)
        return LMBatch(inputs_embeds, tokens.attention_mask, labels=labels, encoder=encoder)

    def decode_batch(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str], max_new_tokens: int) -> LMBatch:
        encoder = self._encode(model, image, prompts, truncate=False)
        start = torch.full((len(prompts), 1), model.t5_model.config.decoder_start_token_id, dtype=torch.long, device=image.device)
        inputs_embeds = model.t5_model.decoder.embed_tokens(start)
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=image.device)
        return LMBatch(inputs_embeds, mask, encoder=encoder, input_ids=start)

    def decode_text(self, model: nn.Module, tokens: torch.Tensor) -> List[str]:
        return model.t5_tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def lavis_generate(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str], **decoding: Any) -> torch.Tensor:
        """Blip2T5.generate's call of its T5 (per-row prompts); ids after the start token."""
        inputs_embeds, mask = self._encoder_inputs(model, image, prompts, truncate=False)
        sampling = decoding["use_nucleus_sampling"]
        # top_p and temperature only act when sampling; passed to greedy or beam search they make
        # transformers 4.33 warn (LAVIS passes them always, top_p=0.9 by default)
        sampling_only = {"top_p": decoding["top_p"], "temperature": decoding["temperature"]} if sampling else {}
        with model.maybe_autocast(dtype=torch.bfloat16):
            outputs = model.t5_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                do_sample=sampling,
                **sampling_only,
                num_beams=decoding["num_beams"],
                max_new_tokens=decoding["max_length"],
                # counted like max_length (max_new_tokens): generated tokens; LAVIS 1.0.2 passes
                # min_length, which also counts the decoder start token (README "Lengths")
                min_new_tokens=decoding["min_length"],
                repetition_penalty=decoding["repetition_penalty"],
                length_penalty=decoding["length_penalty"],
                num_return_sequences=decoding["num_captions"],
                **hf_extras(decoding),
            )
        return outputs[:, 1:]
