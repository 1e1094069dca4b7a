"""Host bindings of LAVIS's BLIP-2 models: what is shared (image -> query embeddings) and the
OPT binding (`Blip2OPT`, and so `blip2_opt_free`). The T5 binding is in `blip2_t5.py`.

BLIP-2 OPT is decoder-only: the LM input is [image queries, prompt tokens], left-padded for
decoding (every prompt ends where generation starts; OPT's positions count only unmasked
columns, so the pads between queries and text change nothing), right-padded for training.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Sequence, Tuple

import torch
from torch import nn
from transformers import BatchEncoding

from lavis_free.compat.transformers_version import GENERATE_EXPANDS_MODEL_INPUTS
from lavis_free.exits.lm_batch import IGNORE_INDEX, LMBatch, shift_to_aligned
from lavis_free.hosts.binding import HostBinding, SpecialIds, hf_extras, padded_rows, register_host
from lavis_free.hosts.inputs import check_images, samples_entry, text_batch, vision_input


def image_queries(model: nn.Module, image: torch.Tensor, projection: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] -> (Q-Former query embeddings projected into the LM's space [B, Q, D],
    mask [B, Q]), as every BLIP-2 host computes them."""
    image = image.to(vision_input(model)[3].dtype)
    with model.maybe_autocast():
        image_embeds = model.ln_vision(model.visual_encoder(image))
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
    query_output = model.Qformer.bert(
        query_embeds=model.query_tokens.expand(image_embeds.shape[0], -1, -1),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    queries = projection(query_output.last_hidden_state)
    return queries, torch.ones(queries.shape[:-1], dtype=torch.long, device=image.device)


def tokenize(tokenizer: Any, texts: Sequence[str], device: torch.device, padding_side: str, max_length: int) -> BatchEncoding:
    """A padded batch; over-long texts lose tokens on the padding side (prompts: the oldest).
    The tokenizer's own sides are restored after, as LAVIS's code reads them as it set them."""
    saved = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = padding_side
    try:
        return tokenizer(list(texts), return_tensors="pt", padding="longest", truncation=True, max_length=max_length).to(device)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved


def opt_training_text(prompt: str, target: str) -> str:
    """The text Blip2OPT trains on: prompt and target joined by one space, ended by "\\n" (its EOS)."""
    return " ".join(t for t in (prompt.strip(), target.strip()) if t) + "\n"


def training_texts(model: nn.Module, samples: Mapping[str, Any]) -> Tuple[torch.Tensor, List[str], List[str]]:
    """(checked images, unscored prompts, scored targets) of a training batch: with
    `text_output`, `text_input` is the prompt; without, LAVIS's captioning convention (the
    caption in `text_input`, the model's prompt already at its start) gives empty prompts."""
    image = check_images(model, samples_entry(samples, "image"))
    inputs = text_batch(samples_entry(samples, "text_input"), "text_input", len(image))
    if "text_output" not in samples:
        return image, [""] * len(inputs), inputs
    return image, inputs, text_batch(samples["text_output"], "text_output", len(image))


@register_host
class Blip2OPTBinding(HostBinding):
    host_class = "Blip2OPT"

    def lm(self, model: nn.Module) -> nn.Module:
        return model.opt_model

    def special_ids(self, model: nn.Module) -> SpecialIds:
        return SpecialIds(eos_token_id=model.eos_token_id, pad_token_id=model.opt_tokenizer.pad_token_id)

    def _prefix(self, model: nn.Module, queries: torch.Tensor, atts: torch.Tensor, tokens: BatchEncoding) -> Tuple[torch.Tensor, torch.Tensor]:
        token_embeds = model.opt_model.get_input_embeddings()(tokens.input_ids)
        return (torch.cat([queries.to(token_embeds.dtype), token_embeds], dim=1),
                torch.cat([atts, tokens.attention_mask], dim=1))

    def _scored_text(self, model: nn.Module, prompts: Sequence[str], targets: Sequence[str], device: torch.device):
        """(tokens, causal labels) of Blip2OPT.forward's text: prompt + " " + target when a prompt
        is given, ended by "\\n"; padding, the prompt and, for captions, the model's prompt
        (`model.prompt_length` tokens) are unscored."""
        texts = [opt_training_text(p, x) for p, x in zip(prompts, targets)]
        tokens = tokenize(model.opt_tokenizer, texts, device, "right", model.max_txt_len)
        labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, IGNORE_INDEX)
        if any(prompts):
            # the prompt's tokens (with the start token) are a prefix of the text's: the target
            # follows a space, so no BPE merge crosses the boundary
            stripped = [p.strip() for p in prompts]  # as they start the text above
            prompt_lengths = tokenize(model.opt_tokenizer, stripped, device, "right", model.max_txt_len).attention_mask.sum(1)
            cols = torch.arange(labels.shape[1], device=labels.device)
            labels = labels.masked_fill(cols[None] < prompt_lengths[:, None], IGNORE_INDEX)
        elif model.prompt:
            labels[:, : int(model.prompt_length)] = IGNORE_INDEX
        return tokens, labels

    def training_batch(self, model: nn.Module, samples: Mapping[str, Any]) -> LMBatch:
        """Blip2OPT.forward's inputs (`_scored_text` after the image queries); labels are
        shifted to aligned."""
        image, prompts, targets = training_texts(model, samples)
        queries, atts = image_queries(model, image, model.opt_proj)
        tokens, labels = self._scored_text(model, prompts, targets, image.device)
        inputs_embeds, attention_mask = self._prefix(model, queries, atts, tokens)
        causal = torch.cat([torch.full_like(atts, IGNORE_INDEX), labels], dim=1)
        return LMBatch(inputs_embeds, attention_mask, labels=shift_to_aligned(causal))

    def answer_tokens(self, model: nn.Module, prompts: Sequence[str], answers: Sequence[str], device: torch.device) -> torch.Tensor:
        """The scored part of `_scored_text`, tokenized alone (never cut by `max_txt_len`, which
        cuts the prompt in the decoder prefix): " " + answer + "\\n" after a prompt, as no BPE merge
        crosses the space, the answer and "\\n" alone after none (the start token is the prefix's)."""
        texts = [opt_training_text(p, a)[len(p.strip()):] for p, a in zip(prompts, answers)]
        rows = model.opt_tokenizer(texts, add_special_tokens=False).input_ids
        return padded_rows(rows, model.opt_tokenizer.pad_token_id, device)

    def decode_batch(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str], max_new_tokens: int) -> LMBatch:
        queries, atts = image_queries(model, image, model.opt_proj)
        tokens = tokenize(model.opt_tokenizer, prompts, image.device, "left", model.max_txt_len)
        prompt_length = tokens.input_ids.shape[1]
        positions = model.opt_model.config.max_position_embeddings
        if queries.shape[1] + prompt_length + max_new_tokens > positions:
            raise ValueError(
                f"max_length={max_new_tokens} is too long: {queries.shape[1]} image queries + {prompt_length} prompt "
                f"tokens + {max_new_tokens} new tokens exceed the LM's {positions} positions "
                f"(max_position_embeddings); use max_length <= {positions - queries.shape[1] - prompt_length}"
            )
        inputs_embeds, attention_mask = self._prefix(model, queries, atts, tokens)
        # min_length counts generated tokens only, as max_length does (max_new_tokens); the
        # processors see the prompt's ids, as generate's input_ids
        return LMBatch(inputs_embeds, attention_mask, input_ids=tokens.input_ids)

    def decode_text(self, model: nn.Module, tokens: torch.Tensor) -> List[str]:
        return [text.strip() for text in model.opt_tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def lavis_generate(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str], **decoding: Any) -> torch.Tensor:
        """Blip2OPT.generate's call of its OPT (per-row prompts, left-padded), ids after the prompt."""
        queries, atts = image_queries(model, image, model.opt_proj)
        tokens = tokenize(model.opt_tokenizer, prompts, image.device, "left", model.max_txt_len)
        sampling = decoding["use_nucleus_sampling"]
        num_beams = 1 if sampling else decoding["num_beams"]
        copies = decoding["num_captions"] if sampling else num_beams
        if not GENERATE_EXPANDS_MODEL_INPUTS:
            # transformers < 4.27 repeats only input_ids and the mask for beams / return sequences;
            # from 4.27 on generate repeats every tensor model input itself (PR #21624), and
            # repeating query_embeds here too doubles them (LAVIS 1.0.2's bug, LAVIS #154)
            queries = queries.repeat_interleave(copies, dim=0)
        # top_p and temperature only act when sampling; passed to greedy or beam search they make
        # transformers 4.33 warn (LAVIS passes them always, top_p=0.9 by default)
        sampling_only = {"top_p": decoding["top_p"], "temperature": decoding["temperature"]} if sampling else {}
        with model.maybe_autocast():
            outputs = model.opt_model.generate(
                input_ids=tokens.input_ids,
                query_embeds=queries,
                attention_mask=torch.cat([atts, tokens.attention_mask], dim=1),
                do_sample=sampling,
                **sampling_only,
                num_beams=num_beams,
                max_new_tokens=decoding["max_length"],
                # counted like max_length: generated tokens (LAVIS 1.0.2 passes min_length, which
                # also counts the prompt's tokens; README "Lengths")
                min_new_tokens=decoding["min_length"],
                eos_token_id=model.eos_token_id,
                pad_token_id=model.opt_tokenizer.pad_token_id,
                repetition_penalty=decoding["repetition_penalty"],
                length_penalty=decoding["length_penalty"],
                num_return_sequences=decoding["num_captions"],
                **hf_extras(decoding),
            )
        return outputs[:, tokens.input_ids.shape[1]:]
