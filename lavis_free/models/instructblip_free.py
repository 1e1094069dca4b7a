"""`instructblip_free`: InstructBLIP (FlanT5 and Vicuna LMs) with FREE exits, on LAVIS 1.0.2.

Why here: InstructBLIP (`blip2_t5_instruct`, `blip2_vicuna_instruct`) is on LAVIS's GitHub main
only, in no release of salesforce-lavis; 1.0.2's Q-Former and T5 are the same as main's, so the
plugin builds InstructBLIP from 1.0.2's `Blip2Base` with main's attribute names, settings and
checkpoint locations (the `*_trimmed.pth` files hold the Q-Former with its text embeddings,
`query_tokens` and the projection), and its classes share main's host bindings
(`lavis_host_class`), so exits attach to main's classes and these alike.

One registered name, several LM families: `InstructBlipFree.from_config` builds the class of the
type's LM (`t5_model` / `t5_config` -> `InstructBlipT5Free`). The instruction is
`samples["prompt"]` (generate) or the formatted question (predict_answers) and goes to the
Q-Former and to the LM; see `lavis_free.hosts.instructblip`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base
from torch import nn

from lavis_free.exits.lm_batch import IGNORE_INDEX
from lavis_free.hosts import attach_exits, binding_for
from lavis_free.models.blip2_components import CONFIG_DIR, OfflineBlip2, freeze, plain, vision_and_qformer_config
from lavis_free.models.blip2_t5_free import Blip2T5Free


def _instruct_config(cfg: Mapping[str, Any]) -> dict:
    """from_config keywords InstructBLIP reads (LAVIS main's names and defaults)."""
    return {**vision_and_qformer_config(cfg), "max_txt_len": cfg.get("max_txt_len", 128),
            "max_output_txt_len": cfg.get("max_output_txt_len", 256), "apply_lemmatizer": cfg.get("apply_lemmatizer", False),
            "freeze_lm": cfg.get("freeze_lm", True)}


@registry.register_model("instructblip_free")
class InstructBlipFree(OfflineBlip2, Blip2Base):
    """InstructBLIP whose components come from LAVIS main's hub/URL path or from tiny configs.

    Model types:
        - flant5xl, flant5xxl: LAVIS main's InstructBLIP FlanT5 (GPU, bf16; network or caches)
        - vicuna7b, vicuna13b: LAVIS main's InstructBLIP Vicuna (needs transformers >= 4.28, the
          second stack; the Vicuna weights from `model.llm_model`, a local FastChat v1.1 directory)
        - tiny_flant5, tiny_vicuna: random weights, shipped tokenizers, built in well under a second
        - shapes_tiny_flant5: tiny_flant5 trained here on shapes instructions (caption, VQA,
          dialogue), weights and FREE exits shipped
    Usage:
        >>> import lavis_free
        >>> model = lavis_free.load_model("instructblip_free", "tiny_flant5")
        >>> model.generate({"image": images, "prompt": "A short image description:"}, num_beams=1)
    """

    MODEL_NAME = "instructblip_free"
    TRAINED_TYPE = "shapes_tiny_flant5"
    UNTRAINED_TYPE = "tiny_flant5"
    PRETRAINED_MODEL_CONFIG_DICT = {
        name: str(CONFIG_DIR / f"instructblip_free_{name}.yaml")
        for name in ("flant5xl", "flant5xxl", "vicuna7b", "vicuna13b", "tiny_flant5", "tiny_vicuna", "shapes_tiny_flant5")
    }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> nn.Module:
        """The InstructBLIP of the type's LM: `t5_model` / `t5_config` (FlanT5) or `llm_model` /
        `llm_config` (Vicuna); any other section set is an error naming both."""
        if cfg.get("t5_model") or cfg.get("t5_config"):
            model = InstructBlipT5Free(**_instruct_config(cfg), t5_model=cfg.get("t5_model", "google/flan-t5-xl"),
                                       t5_config=plain(cfg.get("t5_config")))
        elif cfg.get("llm_model") or cfg.get("llm_config"):
            from lavis_free.models.instructblip_vicuna import InstructBlipVicunaFree

            model = InstructBlipVicunaFree(**_instruct_config(cfg), llm_model=cfg.get("llm_model", ""),
                                           llm_config=plain(cfg.get("llm_config")))
        else:
            raise ValueError("instructblip_free needs its LM: model.t5_model / model.t5_config (FlanT5) or "
                             "model.llm_model / model.llm_config (Vicuna)")
        model.load_checkpoint_from_config(cfg)
        return model

    def finish_init(self, prompt: str, max_txt_len: int, max_output_txt_len: int, apply_lemmatizer: bool,
                    exits: Optional[Mapping[str, Any]]) -> None:
        """The last part of every InstructBLIP `__init__`, whatever its LM: LAVIS main's text
        settings, then the exits."""
        self.max_txt_len = max_txt_len
        self.max_output_txt_len = max_output_txt_len
        self.prompt = prompt
        self._apply_lemmatizer = apply_lemmatizer
        self._lemmatizer = None
        self.qformer_text_input = True
        attach_exits(self, exits)

    def forward(self, samples: Mapping[str, Any]) -> dict:
        """InstructBLIP's loss (`text_input` = the instruction, `text_output` = the target), on
        the host binding's aligned labels; the LM's own forward computes the logits."""
        batch = binding_for(self).training_batch(self, samples)
        logits = self.lm_logits(batch)
        scored = batch.labels != IGNORE_INDEX
        return {"loss": F.cross_entropy(logits[scored].float(), batch.labels[scored])}


class InstructBlipT5Free(InstructBlipFree):
    """InstructBLIP FlanT5 (LAVIS main's `Blip2T5Instruct`), its attributes and settings."""

    lavis_host_class = "Blip2T5Instruct"

    def __init__(
        self,
        vit_model: str = "eva_clip_g",
        img_size: int = 224,
        drop_path_rate: float = 0,
        use_grad_checkpoint: bool = False,
        vit_precision: str = "fp16",
        freeze_vit: bool = True,
        num_query_token: int = 32,
        t5_model: str = "google/flan-t5-xl",
        prompt: str = "",
        max_txt_len: int = 128,
        max_output_txt_len: int = 256,
        apply_lemmatizer: bool = False,
        vision: Optional[Mapping[str, Any]] = None,
        qformer: Optional[Mapping[str, Any]] = None,
        t5_config: Optional[Mapping[str, Any]] = None,
        cross_attention_freq: int = 2,
        freeze_lm: bool = True,
        exits: Optional[Mapping[str, Any]] = None,
    ):
        self.build_vision_and_qformer(vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision,
                                      freeze_vit, num_query_token, cross_attention_freq, vision, qformer,
                                      qformer_text_input=True)
        self.t5_tokenizer, self.t5_model = Blip2T5Free.init_t5(t5_model, t5_config=t5_config)
        self.t5_tokenizer.truncation_side = "left"
        self.t5_output_tokenizer = type(self.t5_tokenizer).from_pretrained(self.t5_tokenizer.name_or_path, truncation_side="right")
        if freeze_lm:
            freeze(self.t5_model)
        self.t5_proj = nn.Linear(self.Qformer.config.hidden_size, self.t5_model.config.hidden_size)
        self.finish_init(prompt, max_txt_len, max_output_txt_len, apply_lemmatizer, exits)

    def lm_logits(self, batch) -> torch.Tensor:
        with self.maybe_autocast(dtype=torch.bfloat16):
            return self.t5_model(
                encoder_outputs=(batch.encoder.states,), attention_mask=batch.encoder.mask,
                decoder_inputs_embeds=batch.inputs_embeds, decoder_attention_mask=batch.attention_mask, return_dict=True,
            ).logits
