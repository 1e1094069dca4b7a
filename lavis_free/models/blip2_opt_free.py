"""`blip2_opt_free`: LAVIS's BLIP-2 OPT with a backbone that can be built offline.

Why a subclass with its own `__init__`: LAVIS 1.0.2's `Blip2OPT.__init__` downloads the OPT LM
and its tokenizer from the hub (and loads it in fp16, which CPUs cannot run under autocast).
This class composes the same attributes (`visual_encoder`, `ln_vision`, `Qformer`,
`query_tokens`, `opt_proj`, `opt_model`, `opt_tokenizer`, ...) through overridable hooks, so
that LAVIS checkpoints keep their state-dict keys and the model types choose their components
in YAML: the real types use LAVIS's own hub/URL path, the tiny types build small LAVIS modules
from the `vision:`, `qformer:` and `opt_config:` sections.

The shared BLIP-2 hooks (ViT, Q-Former, checkpoints, model types) are in `blip2_components`;
training inputs and decoding come from the host binding (`lavis_free.hosts.blip2`) and
`attach_exits`, so this class adds only the OPT LM and its tokenizer.
"""
from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from transformers import AutoTokenizer, PreTrainedTokenizer

from lavis_free.common.safe_load import forced_weights_only
from lavis_free.exits.lm_batch import IGNORE_INDEX
from lavis_free.hosts import attach_exits, binding_for
from lavis_free.models import tiny, weights
from lavis_free.models.blip2_components import CONFIG_DIR, OfflineBlip2, freeze, plain, vision_and_qformer_config
from lavis_free.models.opt_lm import CachedOPTForCausalLM


@registry.register_model("blip2_opt_free")
class Blip2OPTFree(OfflineBlip2, Blip2OPT):
    """BLIP-2 OPT whose components come from LAVIS's hub path or from tiny offline configs.

    Model types:
        - tiny: random weights, built offline in well under a second (tests)
        - shapes_frozen_lm: the default; BLIP-2's recipe in miniature on the synthetic shapes data: a
          pretrained, frozen ViT and 12-layer OPT, a trained Q-Former (shipped with FREE exits)
        - shapes_tiny: the tiny architecture trained end to end on the shapes captions (shipped; the
          end-to-end backbone shapes_frozen_lm is compared with)
        - pretrain_opt2.7b, caption_coco_opt2.7b: LAVIS's real BLIP-2 OPT-2.7B (GPU; weights from
          the network or local caches: each component hook checks before loading and, offline,
          fails at once naming the missing files, see `lavis_free.models.weights`)
    Usage:
        >>> import lavis_free
        >>> from lavis.models import load_model
        >>> model = load_model("blip2_opt_free", "shapes_frozen_lm")
    """

    MODEL_NAME = "blip2_opt_free"
    TRAINED_TYPE = "shapes_frozen_lm"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "tiny": str(CONFIG_DIR / "blip2_opt_free_tiny.yaml"),
        "shapes_tiny": str(CONFIG_DIR / "blip2_opt_free_shapes_tiny.yaml"),
        "shapes_frozen_lm": str(CONFIG_DIR / "blip2_opt_free_shapes_frozen_lm.yaml"),
        "pretrain_opt2.7b": str(CONFIG_DIR / "blip2_opt_free_pretrain_opt2.7b.yaml"),
        "caption_coco_opt2.7b": str(CONFIG_DIR / "blip2_opt_free_caption_coco_opt2.7b.yaml"),
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
        opt_model: str = "facebook/opt-2.7b",
        prompt: str = "",
        max_txt_len: int = 32,
        vision: Optional[Mapping[str, Any]] = None,
        qformer: Optional[Mapping[str, Any]] = None,
        opt_config: Optional[Mapping[str, Any]] = None,
        cross_attention_freq: int = 2,
        freeze_lm: bool = True,
        exits: Optional[Mapping[str, Any]] = None,
    ):
        self.build_vision_and_qformer(vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision,
                                      freeze_vit, num_query_token, cross_attention_freq, vision, qformer)
        self.opt_tokenizer, self.opt_model = self.init_opt(opt_model, opt_config=opt_config)
        if freeze_lm:
            freeze(self.opt_model)
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]

        self.opt_proj = nn.Linear(
            self.Qformer.config.hidden_size, self.opt_model.config.hidden_size
        )

        self.max_txt_len = max_txt_len
        self.prompt = prompt
        prompt_tokens = self.opt_tokenizer(self.prompt, return_tensors="pt")
        self.prompt_length = prompt_tokens.attention_mask.sum(1)
        attach_exits(self, exits)

    @classmethod
    def init_opt(
        cls, opt_model: str, opt_config: Optional[Mapping[str, Any]] = None
    ) -> Tuple[PreTrainedTokenizer, CachedOPTForCausalLM]:
        """The LM and its tokenizer: from `opt_config` with the shipped tokenizer when given,
        else from the hub name `opt_model` (fp16 only where CUDA can run it)."""
        if opt_config is not None:
            tokenizer = tiny.load_opt_tokenizer()
            return tokenizer, tiny.build_opt(opt_config, tokenizer)
        weights.require(weights.opt_lm(opt_model))
        tokenizer = AutoTokenizer.from_pretrained(opt_model, use_fast=False)
        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
        with forced_weights_only():
            return tokenizer, CachedOPTForCausalLM.from_pretrained(opt_model, torch_dtype=dtype)

    # ---- stage 1 ----

    def forward(self, samples: Mapping[str, Any]) -> dict:
        """Captioning loss of the LM (stage 1), on the host binding's aligned labels."""
        batch = binding_for(self).training_batch(self, samples)
        with self.maybe_autocast():
            logits = self.opt_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, return_dict=True).logits
        scored = batch.labels != IGNORE_INDEX
        return {"loss": F.cross_entropy(logits[scored].float(), batch.labels[scored])}

    # ---- configuration ----

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Blip2OPTFree":
        model = cls(
            **vision_and_qformer_config(cfg),
            opt_model=cfg.get("opt_model", "facebook/opt-2.7b"),
            opt_config=plain(cfg.get("opt_config")),
            freeze_lm=cfg.get("freeze_lm", True),
        )
        model.load_checkpoint_from_config(cfg)
        return model
