"""Host bindings of InstructBLIP (LAVIS main's `Blip2T5Instruct` / `Blip2VicunaInstruct`, and the
plugin's re-implementations on 1.0.2, `instructblip_free`).

What InstructBLIP changes against BLIP-2: the instruction enters the Q-Former too (BERT tokens
beside the queries in one self-attention, truncated on the left; only the queries cross-attend
to the image and go on to the LM), targets have their own tokenizer and length
(`max_output_txt_len`), and `generate` defaults to beam search with a repetition penalty.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from lavis_free.exits.lm_batch import IGNORE_INDEX, LMBatch, shift_to_aligned
from lavis_free.hosts.binding import HostBinding, SpecialIds, hf_extras, register_host
from lavis_free.hosts.blip2 import training_texts
from lavis_free.hosts.blip2_t5 import Blip2T5Binding
from lavis_free.hosts.inputs import vision_input

# LAVIS main's InstructBLIP generate / predict_answers defaults
INSTRUCT_GENERATE_DEFAULTS = {**HostBinding.generate_defaults, "max_length": 256, "repetition_penalty": 1.5}


def instruction_queries(model: nn.Module, image: torch.Tensor, instructions: Sequence[str], projection: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """InstructBLIP's instruction-aware Q-Former: queries and instruction tokens in one
    self-attention (queries first, the instruction after them with its own positions), only the
    queries cross-attend to the image; the queries' outputs, projected into the LM's space."""
    image = image.to(vision_input(model)[3].dtype)
    with model.maybe_autocast():
        image_embeds = model.ln_vision(model.visual_encoder(image))
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
    text = model.tokenizer(list(instructions), padding="longest", truncation=True, max_length=model.max_txt_len,
                           return_tensors="pt").to(image.device)
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image.device)
    output = model.Qformer.bert(
        text.input_ids,
        attention_mask=torch.cat([query_atts, text.attention_mask], dim=1),
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    queries = projection(output.last_hidden_state[:, : query_tokens.shape[1]])
    return queries, torch.ones(queries.shape[:-1], dtype=torch.long, device=image.device)


@register_host
class InstructBlipT5Binding(Blip2T5Binding):
    """InstructBLIP FlanT5: BLIP-2 T5's encoder-decoder layout with the instruction in the Q-Former."""

    host_class = "Blip2T5Instruct"
    generate_defaults = INSTRUCT_GENERATE_DEFAULTS

    def queries(self, model: nn.Module, image: torch.Tensor, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        return instruction_queries(model, image, texts, model.t5_proj)

    def target_tokens(self, model: nn.Module, targets: Sequence[str], device: torch.device):
        return model.t5_output_tokenizer(list(targets), padding="longest", truncation=True,
                                         max_length=model.max_output_txt_len, return_tensors="pt").to(device)

    def settings(self, model: nn.Module) -> dict:
        return {**super().settings(model), "max_output_txt_len": model.max_output_txt_len}


@register_host
class InstructBlipVicunaBinding(HostBinding):
    """InstructBLIP Vicuna (decoder-only): [queries, prompt] with the prompt left-padded at
    generation (positions count real columns only, as HF's LLaMA computes them from the mask);
    training on [instruction, target + </s>] with the instruction unscored, as LAVIS main's
    `concat_text_input_output`. The added [PAD] is never generated (its logit is masked at every
    exit and at the head; LAVIS main instead maps output id 0 to </s>, which it also does here)."""

    host_class = "Blip2VicunaInstruct"
    generate_defaults = INSTRUCT_GENERATE_DEFAULTS
    answer_defaults = {**HostBinding.answer_defaults, "prompt": "", "length_penalty": 0}

    def lm(self, model: nn.Module) -> nn.Module:
        return model.llm_model

    def special_ids(self, model: nn.Module) -> SpecialIds:
        return SpecialIds(eos_token_id=model.llm_tokenizer.eos_token_id, pad_token_id=model.llm_tokenizer.pad_token_id)

    def suppressed_ids(self, model: nn.Module) -> Tuple[int, ...]:
        return (model.llm_tokenizer.pad_token_id,)

    def _prefix(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        queries, atts = instruction_queries(model, image, prompts, model.llm_proj)
        model.llm_tokenizer.padding_side = "left"
        tokens = model.llm_tokenizer(list(prompts), padding="longest", return_tensors="pt").to(image.device)
        embeds = model.llm_model.get_input_embeddings()(tokens.input_ids)
        return torch.cat([queries.to(embeds.dtype), embeds], dim=1), torch.cat([atts, tokens.attention_mask], dim=1)

    def training_batch(self, model: nn.Module, samples: Mapping[str, Any]) -> LMBatch:
        image, prompts, targets = training_texts(model, samples)
        if not any(prompts):
            prompts = [model.prompt] * len(targets)
        queries, atts = instruction_queries(model, image, prompts, model.llm_proj)
        tok = model.llm_tokenizer
        tok.padding_side = "right"
        tok.truncation_side = "left"
        inputs = tok(list(prompts), return_tensors="pt", padding="longest", truncation=True, max_length=model.max_txt_len)
        outputs = self._target_encoding(model, targets)
        rows, masks, labels = [], [], []
        for i in range(len(targets)):  # [instruction, target without its bos, instruction pads]
            n = int(inputs.attention_mask[i].sum())
            ids = torch.cat([inputs.input_ids[i][:n], outputs.input_ids[i][1:], inputs.input_ids[i][n:]])
            mask = torch.cat([inputs.attention_mask[i][:n], outputs.attention_mask[i][1:], inputs.attention_mask[i][n:]])
            label = ids.masked_fill(mask == 0, IGNORE_INDEX)
            label[:n] = IGNORE_INDEX
            rows.append(ids), masks.append(mask), labels.append(label)
        ids, mask = torch.stack(rows).to(image.device), torch.stack(masks).to(image.device)
        embeds = model.llm_model.get_input_embeddings()(ids)
        causal = torch.cat([torch.full_like(atts, IGNORE_INDEX), torch.stack(labels).to(image.device)], dim=1)
        return LMBatch(torch.cat([queries.to(embeds.dtype), embeds], dim=1), torch.cat([atts, mask], dim=1),
                       labels=shift_to_aligned(causal))

    @staticmethod
    def _target_encoding(model: nn.Module, targets: Sequence[str]):
        """Targets as LAVIS main's `forward` tokenizes them: each with its bos (dropped where
        used) and EOS, right-padded, cut on the right."""
        tok = model.llm_tokenizer
        tok.padding_side = tok.truncation_side = "right"
        outputs = tok([t + tok.eos_token for t in targets], return_tensors="pt", padding="longest", truncation=True,
                      max_length=model.max_output_txt_len)
        tok.truncation_side = "left"
        return outputs

    def answer_tokens(self, model: nn.Module, prompts: Sequence[str], answers: Sequence[str], device: torch.device) -> torch.Tensor:
        outputs = self._target_encoding(model, answers)
        ids = outputs.input_ids[:, 1:].masked_fill(outputs.attention_mask[:, 1:] == 0, model.llm_tokenizer.pad_token_id)
        return ids.to(device)

    def decode_batch(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str], max_new_tokens: int) -> LMBatch:
        inputs_embeds, attention_mask = self._prefix(model, image, prompts)
        # HF's generate from inputs_embeds alone starts its ids with one placeholder (bos), which
        # max_length and min_length count: prompt_length 1, and see max_new_tokens
        placeholder = torch.full((len(prompts), 1), model.llm_model.config.bos_token_id, dtype=torch.long, device=image.device)
        return LMBatch(inputs_embeds, attention_mask, prompt_length=1, input_ids=placeholder)

    def max_new_tokens(self, max_length: int) -> int:
        return max_length - 1

    def decode_text(self, model: nn.Module, tokens: torch.Tensor) -> List[str]:
        tokens = tokens.masked_fill(tokens == 0, model.llm_tokenizer.eos_token_id)  # LAVIS main's mapping
        return [t.strip() for t in model.llm_tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def lavis_generate(self, model: nn.Module, image: torch.Tensor, prompts: Sequence[str], **decoding: Any) -> torch.Tensor:
        """Blip2VicunaInstruct.generate's call of its LLM; ids after HF's placeholder start id."""
        inputs_embeds, attention_mask = self._prefix(model, image, prompts)
        pad = model.llm_tokenizer.pad_token_id
        sampling = decoding["use_nucleus_sampling"]
        sampling_only = {"top_p": decoding["top_p"], "temperature": decoding["temperature"]} if sampling else {}
        with model.maybe_autocast():
            return model.llm_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, do_sample=sampling, **sampling_only,
                num_beams=decoding["num_beams"], max_length=decoding["max_length"], min_length=decoding["min_length"],
                repetition_penalty=decoding["repetition_penalty"], length_penalty=decoding["length_penalty"],
                num_return_sequences=decoding["num_captions"],
                eos_token_id=model.llm_tokenizer.eos_token_id, pad_token_id=pad,
                **{**hf_extras(decoding), "bad_words_ids": [[pad]] + list(decoding.get("bad_words_ids") or [])},
            )[:, 1:]  # after the placeholder

    def settings(self, model: nn.Module) -> dict:
        return {**super().settings(model), "max_output_txt_len": model.max_output_txt_len}
