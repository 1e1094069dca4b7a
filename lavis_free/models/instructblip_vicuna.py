"""InstructBLIP Vicuna (LAVIS main's `Blip2VicunaInstruct`) on LAVIS 1.0.2, with transformers'
own `LlamaForCausalLM` (LAVIS main ships a copy of it, `modeling_llama`; 1.0.2 has none).

Needs transformers >= 4.28 (the second stack, README "Install"); on the default stack building
one is a `TransformersVersionError` naming the version. The Vicuna specifics users trip on are
LAVIS main's, kept here: the tokenizer truncates on the left, gets a `[PAD]` token (the LM's
embeddings are resized to it) and bos = eos = unk = `</s>`; generation pads prompts on the left;
EOS comes from the tokenizer.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

from lavis_free.common.safe_load import forced_weights_only
from lavis_free.compat.transformers_version import require_vicuna
from lavis_free.models import tiny, weights
from lavis_free.models.blip2_components import freeze
from lavis_free.models.instructblip_free import InstructBlipFree


class InstructBlipVicunaFree(InstructBlipFree):
    """InstructBLIP Vicuna, LAVIS main's attributes (`llm_tokenizer`, `llm_model`, `llm_proj`)."""

    lavis_host_class = "Blip2VicunaInstruct"

    def __init__(
        self,
        vit_model: str = "eva_clip_g",
        img_size: int = 224,
        drop_path_rate: float = 0,
        use_grad_checkpoint: bool = False,
        vit_precision: str = "fp16",
        freeze_vit: bool = True,
        num_query_token: int = 32,
        llm_model: str = "",
        prompt: str = "",
        max_txt_len: int = 128,
        max_output_txt_len: int = 256,
        apply_lemmatizer: bool = False,
        vision: Optional[Mapping[str, Any]] = None,
        qformer: Optional[Mapping[str, Any]] = None,
        llm_config: Optional[Mapping[str, Any]] = None,
        cross_attention_freq: int = 2,
        freeze_lm: bool = True,
        exits: Optional[Mapping[str, Any]] = None,
    ):
        require_vicuna("instructblip_free, Vicuna LLM")
        self.build_vision_and_qformer(vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision,
                                      freeze_vit, num_query_token, cross_attention_freq, vision, qformer,
                                      qformer_text_input=True)
        self.llm_tokenizer, self.llm_model = self.init_llm(llm_model, llm_config)
        if freeze_lm:
            freeze(self.llm_model)
        self.llm_proj = nn.Linear(self.Qformer.config.hidden_size, self.llm_model.config.hidden_size)
        self.prompt_length = self.llm_tokenizer(prompt, return_tensors="pt").attention_mask.sum(1)
        self.finish_init(prompt, max_txt_len, max_output_txt_len, apply_lemmatizer, exits)

    @classmethod
    def init_llm(cls, llm_model: str, llm_config: Optional[Mapping[str, Any]] = None) -> Tuple[Any, nn.Module]:
        """Tokenizer and LM as LAVIS main builds them ([PAD] added, bos = eos = unk = </s>,
        embeddings resized): tiny from `llm_config` with the shipped tokenizer, else from
        `llm_model` (a local Vicuna directory or hub id; fp16 where CUDA runs it)."""
        from transformers import LlamaForCausalLM, LlamaTokenizer

        if llm_config is not None:
            tokenizer = tiny.load_llama_tokenizer(truncation_side="left")
        else:
            weights.require(weights.hub_lm("llm_model", llm_model, "the Vicuna LLM and its tokenizer",
                                           ("tokenizer.model", "tokenizer_config.json")))
            tokenizer = LlamaTokenizer.from_pretrained(llm_model, use_fast=False, truncation_side="left")
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        tokenizer.add_special_tokens({"bos_token": "</s>"})
        tokenizer.add_special_tokens({"eos_token": "</s>"})
        tokenizer.add_special_tokens({"unk_token": "</s>"})
        if llm_config is not None:
            lm = tiny.build_llama(llm_config, tokenizer)
        else:
            dtype = torch.float16 if torch.cuda.is_available() else torch.float32
            with forced_weights_only():
                lm = LlamaForCausalLM.from_pretrained(llm_model, torch_dtype=dtype)
            lm.resize_token_embeddings(len(tokenizer))
        return tokenizer, lm

    def lm_logits(self, batch) -> torch.Tensor:
        with self.maybe_autocast():
            return self.llm_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, return_dict=True).logits
