"""`blip2_opt_free`: LAVIS's BLIP-2 OPT with a backbone that can be built offline.

Why a subclass with its own `__init__`: LAVIS 1.0.2's `Blip2OPT.__init__` downloads the OPT LM
and its tokenizer from the hub (and loads it in fp16, which CPUs cannot run under autocast).
This class composes the same attributes (`visual_encoder`, `ln_vision`, `Qformer`,
`query_tokens`, `opt_proj`, `opt_model`, `opt_tokenizer`, ...) through overridable hooks, so
that LAVIS checkpoints keep their state-dict keys and the model types choose their components
in YAML: the real types use LAVIS's own hub/URL path, the tiny types build small LAVIS modules
from the `vision:`, `qformer:` and `opt_config:` sections.

The image -> LM-input path is factored into `encode_image_queries` and `build_lm_inputs` so that
training, `generate`, `predict_answers` and the early-exit decoder share one code path.
"""
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.common.utils import is_url
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm, disabled_train
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from omegaconf import OmegaConf
from transformers import AutoTokenizer, PreTrainedTokenizer

from lavis_free.models import weights
from lavis_free.common.safe_load import forced_weights_only
from lavis_free.models import tiny
from lavis_free.exits.lm_batch import IGNORE_INDEX
from lavis_free.hosts import attach_exits, binding_for
from lavis_free.models.opt_lm import CachedOPTForCausalLM

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_VIT = "eva_vit_tiny"


def resolve_checkpoint(path: str, key: str) -> str:
    """A checkpoint location from a model YAML: URLs and absolute paths as given; a relative
    path from the current directory if it exists there, else from the `lavis_free` package (so
    shipped weights load from any working directory)."""
    if is_url(path) or os.path.isabs(path):
        return path
    if os.path.isfile(path):
        return os.path.abspath(path)
    packaged = PACKAGE_ROOT / path
    if packaged.is_file():
        return str(packaged)
    raise FileNotFoundError(
        f"model.{key}={path!r}: no such file in the current directory ({os.getcwd()}) "
        f"nor in the package ({packaged})"
    )


def _plain(section: Optional[Mapping[str, Any]]) -> Optional[dict]:
    """OmegaConf sections -> plain dicts (None stays None)."""
    if section is None:
        return None
    if OmegaConf.is_config(section):
        return OmegaConf.to_container(section, resolve=True)
    return dict(section)


def _freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad = False


@registry.register_model("blip2_opt_free")
class Blip2OPTFree(Blip2OPT):
    """BLIP-2 OPT whose components come from LAVIS's hub path or from tiny offline configs.

    Model types:
        - tiny: random weights, built offline in well under a second (tests)
        - shapes_tiny: the tiny architecture trained on the synthetic shapes data (shipped)
        - pretrain_opt2.7b, caption_coco_opt2.7b: LAVIS's real BLIP-2 OPT-2.7B (GPU; weights from
          the network or local caches: each component hook checks before loading and, offline,
          fails at once naming the missing files, see `lavis_free.models.weights`)
    Usage:
        >>> import lavis_free
        >>> from lavis.models import load_model
        >>> model = load_model("blip2_opt_free", "shapes_tiny")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "tiny": str(CONFIG_DIR / "blip2_opt_free_tiny.yaml"),
        "shapes_tiny": str(CONFIG_DIR / "blip2_opt_free_shapes_tiny.yaml"),
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
        Blip2Base.__init__(self)

        self.tokenizer = self.init_tokenizer(shipped_vocab=qformer is not None)

        self.visual_encoder, self.ln_vision = self.init_vision_encoder(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision, vision=vision
        )
        if freeze_vit:
            _freeze(self.visual_encoder)
            self.visual_encoder = self.visual_encoder.eval()
            self.visual_encoder.train = disabled_train
            logging.info("freeze vision encoder")

        self.Qformer, self.query_tokens = self.init_Qformer(
            num_query_token,
            self.visual_encoder.num_features,
            cross_attention_freq,
            qformer=qformer,
            vocab_size=len(self.tokenizer),
        )
        self._drop_qformer_text_branch()

        self.opt_tokenizer, self.opt_model = self.init_opt(opt_model, opt_config=opt_config)
        if freeze_lm:
            _freeze(self.opt_model)
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]

        self.opt_proj = nn.Linear(
            self.Qformer.config.hidden_size, self.opt_model.config.hidden_size
        )

        self.max_txt_len = max_txt_len
        self.prompt = prompt
        prompt_tokens = self.opt_tokenizer(self.prompt, return_tensors="pt")
        self.prompt_length = prompt_tokens.attention_mask.sum(1)
        attach_exits(self, exits)

    # ---- component hooks (LAVIS's classmethods, extended with the tiny configurations) ----

    @classmethod
    def init_tokenizer(cls, shipped_vocab: bool = False):
        """Q-Former tokenizer: the shipped vocabulary for tiny Q-Formers, else bert-base-uncased."""
        if shipped_vocab:
            return tiny.load_bert_tokenizer()
        weights.require(weights.BERT_TOKENIZER)
        return super().init_tokenizer()

    @classmethod
    def init_vision_encoder(
        cls,
        model_name: str,
        img_size: int,
        drop_path_rate: float,
        use_grad_checkpoint: bool,
        precision: str,
        vision: Optional[Mapping[str, Any]] = None,
    ) -> Tuple[nn.Module, nn.Module]:
        """`eva_vit_tiny` builds a small EVA ViT from `vision`; LAVIS's names go to LAVIS."""
        if model_name != TINY_VIT:
            if vision is not None:
                raise ValueError(
                    f"model.vision is only read with model.vit_model={TINY_VIT!r}, "
                    f"not {model_name!r}"
                )
            if model_name not in weights.VIT_URLS:
                raise ValueError(
                    f"model.vit_model={model_name!r}; allowed: "
                    f"{[TINY_VIT] + sorted(weights.VIT_URLS)}"
                )
            weights.require(weights.vision_weights(model_name))
            with forced_weights_only():
                return super().init_vision_encoder(
                    model_name, img_size, drop_path_rate, use_grad_checkpoint, precision
                )
        encoder = tiny.build_vision_encoder(
            img_size, vision, drop_path_rate, use_grad_checkpoint, precision
        )
        return encoder, LayerNorm(encoder.num_features)

    @classmethod
    def init_Qformer(
        cls,
        num_query_token: int,
        vision_width: int,
        cross_attention_freq: int = 2,
        qformer: Optional[Mapping[str, Any]] = None,
        vocab_size: Optional[int] = None,
    ) -> Tuple[nn.Module, nn.Parameter]:
        """A Q-Former from `qformer` (built in code) when given, else LAVIS's bert-base one."""
        if qformer is None:
            weights.require(weights.BERT_QFORMER)
            with forced_weights_only():
                return super().init_Qformer(num_query_token, vision_width, cross_attention_freq)
        model = tiny.build_qformer(
            num_query_token, vision_width, qformer, vocab_size, cross_attention_freq
        )
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, model.config.hidden_size))
        nn.init.normal_(query_tokens, mean=0.0, std=model.config.initializer_range)
        return model, query_tokens

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

    def _drop_qformer_text_branch(self) -> None:
        """BLIP-2 OPT uses only the Q-Former's query path; free its text-only modules."""
        self.Qformer.cls = None
        self.Qformer.bert.embeddings.word_embeddings = None
        self.Qformer.bert.embeddings.position_embeddings = None
        for layer in self.Qformer.bert.encoder.layer:
            layer.output = None
            layer.intermediate = None

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
    def default_config_path(cls, model_type: str) -> str:
        """The model YAML of `model_type`; an unknown type names the valid ones."""
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise ValueError(
                f"Unknown model_type {model_type!r} for blip2_opt_free; valid types: "
                f"{sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}"
            )
        return cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    @classmethod
    def default_model_type(cls) -> str:
        """`shapes_tiny` when its trained weights are in the package, else `tiny`."""
        cfg = OmegaConf.load(cls.default_config_path("shapes_tiny")).model
        return "shapes_tiny" if (PACKAGE_ROOT / cfg.finetuned).is_file() else "tiny"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Blip2OPTFree":
        model = cls(
            vit_model=cfg.get("vit_model", "eva_clip_g"),
            img_size=cfg.get("image_size"),
            drop_path_rate=cfg.get("drop_path_rate", 0),
            use_grad_checkpoint=cfg.get("use_grad_checkpoint", False),
            vit_precision=cfg.get("vit_precision", "fp16"),
            freeze_vit=cfg.get("freeze_vit", True),
            num_query_token=cfg.get("num_query_token"),
            opt_model=cfg.get("opt_model", "facebook/opt-2.7b"),
            prompt=cfg.get("prompt", ""),
            max_txt_len=cfg.get("max_txt_len", 32),
            vision=_plain(cfg.get("vision")),
            qformer=_plain(cfg.get("qformer")),
            opt_config=_plain(cfg.get("opt_config")),
            cross_attention_freq=cfg.get("cross_attention_freq", 2),
            freeze_lm=cfg.get("freeze_lm", True),
            exits=_plain(cfg.get("exits")),
        )
        model.load_checkpoint_from_config(cfg)
        return model

    def load_checkpoint_from_config(self, cfg: Mapping[str, Any], **kwargs: Any) -> None:
        """LAVIS's rule (`finetuned` if `load_finetuned` else `pretrained`), with relative paths
        resolved by `resolve_checkpoint` and an empty entry meaning "keep the initial weights"."""
        key = "finetuned" if cfg.get("load_finetuned", True) else "pretrained"
        path = cfg.get(key)
        if not path:
            logging.info("model.%s is empty: weights stay as initialised", key)
        else:
            # a backbone file: it need not hold exits (`model.exits_checkpoint` brings them)
            self.load_checkpoint(resolve_checkpoint(path, key), origin=f"model.{key}", exits_required=False)
        self.load_exits_from_config(cfg)

    def load_exits_from_config(self, cfg: Mapping[str, Any]) -> None:
        """`model.exits_checkpoint`: trained exits loaded onto the backbone just loaded (checked
        against `model.exits` and the backbone by `check_exit_state`; a file without exits is
        refused)."""
        path = cfg.get("exits_checkpoint")
        if path:
            self.load_checkpoint(resolve_checkpoint(path, "exits_checkpoint"), origin="model.exits_checkpoint")
