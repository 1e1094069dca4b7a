"""`blip2_t5_free`: LAVIS's BLIP-2 FlanT5 (`Blip2T5`) with a backbone that can be built offline,
FREE exits on its T5 decoder layers.

Like `blip2_opt_free`, the class re-composes LAVIS's attributes (`visual_encoder`, `ln_vision`,
`Qformer`, `query_tokens`, `t5_tokenizer`, `t5_model`, `t5_proj`, `prompt`, `max_txt_len`)
through hooks, so LAVIS's checkpoints load with their keys. The real types take LAVIS's hub
path and settings (`dense_act_fn = "gelu"`, the T5 cast to bfloat16 as Blip2T5 does, frozen);
the tiny types build LAVIS's own `modeling_t5` classes from `t5_config:` with a shipped
tokenizer, in float32 (T5 is never run in float16: its activations overflow). Decoding,
training inputs and exits come from the host binding (`lavis_free.hosts.blip2_t5`) and
`attach_exits`, exactly as for OPT.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from torch import nn
from transformers import PreTrainedTokenizer, T5TokenizerFast

from lavis_free.common.safe_load import forced_weights_only
from lavis_free.exits.lm_batch import IGNORE_INDEX
from lavis_free.hosts import attach_exits, binding_for
from lavis_free.models import tiny, weights
from lavis_free.models.blip2_components import CONFIG_DIR, OfflineBlip2, freeze, plain, vision_and_qformer_config
from lavis_free.models.t5_lm import CachedT5ForConditionalGeneration


@registry.register_model("blip2_t5_free")
class Blip2T5Free(OfflineBlip2, Blip2T5):
    """BLIP-2 FlanT5 whose components come from LAVIS's hub path or from tiny offline configs.

    Model types:
        - tiny: random weights, built offline in well under a second (tests)
        - shapes_tiny_t5: the tiny architecture trained on the synthetic shapes data (shipped)
        - pretrain_flant5xl, pretrain_flant5xxl, caption_coco_flant5xl: LAVIS's real BLIP-2
          FlanT5 (GPU, bfloat16; weights from the network or local caches, checked first)
    Usage:
        >>> import lavis_free
        >>> model = lavis_free.load_model("blip2_t5_free", "shapes_tiny_t5")
    """

    MODEL_NAME = "blip2_t5_free"
    TRAINED_TYPE = "shapes_tiny_t5"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "tiny": str(CONFIG_DIR / "blip2_t5_free_tiny.yaml"),
        "shapes_tiny_t5": str(CONFIG_DIR / "blip2_t5_free_shapes_tiny_t5.yaml"),
        "pretrain_flant5xl": str(CONFIG_DIR / "blip2_t5_free_pretrain_flant5xl.yaml"),
        "pretrain_flant5xxl": str(CONFIG_DIR / "blip2_t5_free_pretrain_flant5xxl.yaml"),
        "caption_coco_flant5xl": str(CONFIG_DIR / "blip2_t5_free_caption_coco_flant5xl.yaml"),
    }

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
        max_txt_len: int = 32,
        apply_lemmatizer: bool = False,
        vision: Optional[Mapping[str, Any]] = None,
        qformer: Optional[Mapping[str, Any]] = None,
        t5_config: Optional[Mapping[str, Any]] = None,
        cross_attention_freq: int = 2,
        freeze_lm: bool = True,
        exits: Optional[Mapping[str, Any]] = None,
    ):
        self.build_vision_and_qformer(vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision,
                                      freeze_vit, num_query_token, cross_attention_freq, vision, qformer)
        self.t5_tokenizer, self.t5_model = self.init_t5(t5_model, t5_config=t5_config)
        if freeze_lm:  # Blip2T5 always freezes its T5; stage 1 from scratch (shapes) trains it
            freeze(self.t5_model)
        self.t5_proj = nn.Linear(self.Qformer.config.hidden_size, self.t5_model.config.hidden_size)
        self.max_txt_len = max_txt_len
        self.prompt = prompt
        self._apply_lemmatizer = apply_lemmatizer
        self._lemmatizer = None
        attach_exits(self, exits)

    @classmethod
    def init_t5(
        cls, t5_model: str, t5_config: Optional[Mapping[str, Any]] = None
    ) -> Tuple[PreTrainedTokenizer, CachedT5ForConditionalGeneration]:
        """The T5 and its tokenizer: from `t5_config` with the shipped tokenizer (float32) when
        given, else from the hub name `t5_model` as Blip2T5 loads it (exact-erf GELU, bfloat16)."""
        if t5_config is not None:
            tokenizer = tiny.load_t5_tokenizer()
            return tokenizer, tiny.build_t5(t5_config, tokenizer)
        weights.require(weights.t5_lm(t5_model))
        tokenizer = T5TokenizerFast.from_pretrained(t5_model)
        config = CachedT5ForConditionalGeneration.config_class.from_pretrained(t5_model)
        config.dense_act_fn = "gelu"
        with forced_weights_only():
            lm = CachedT5ForConditionalGeneration.from_pretrained(t5_model, config=config, torch_dtype=torch.bfloat16)
        return tokenizer, lm

    def forward(self, samples: Mapping[str, Any]) -> dict:
        """Stage-1 loss of the T5 (`text_input` -> `text_output`, or the prompt -> the caption),
        on the host binding's aligned labels."""
        batch = binding_for(self).training_batch(self, samples)
        with self.maybe_autocast(dtype=torch.bfloat16):
            outputs = self.t5_model(
                encoder_outputs=(batch.encoder.states,), attention_mask=batch.encoder.mask,
                decoder_inputs_embeds=batch.inputs_embeds, decoder_attention_mask=batch.attention_mask, return_dict=True,
            )
        scored = batch.labels != IGNORE_INDEX
        return {"loss": F.cross_entropy(outputs.logits[scored].float(), batch.labels[scored])}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Blip2T5Free":
        model = cls(
            **vision_and_qformer_config(cfg),
            t5_model=cfg.get("t5_model", "google/flan-t5-xl"),
            apply_lemmatizer=cfg.get("apply_lemmatizer", False),
            t5_config=plain(cfg.get("t5_config")),
            freeze_lm=cfg.get("freeze_lm", True),
        )
        model.load_checkpoint_from_config(cfg)
        return model
