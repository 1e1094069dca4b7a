"""What the plugin's BLIP-2 models share: components built offline or through LAVIS's hub path,
checkpoint loading from a model YAML, and the model-type registry plumbing.

Why a mixin before LAVIS's class (`class Blip2OPTFree(OfflineBlip2, Blip2OPT)`): LAVIS 1.0.2's
`Blip2OPT.__init__` / `Blip2T5.__init__` download every component (bert-base-uncased, the EVA
ViT-g weights, the LM and its tokenizer) and choose dtypes for a GPU. The plugin's classes compose
the same attributes (`visual_encoder`, `ln_vision`, `Qformer`, `query_tokens`, the LM, its
tokenizer and projection) through these overridable hooks, so LAVIS checkpoints keep their
state-dict keys and the model YAML chooses the components: the real types use LAVIS's own
hub/URL path (checked first by `weights.require`, so offline they fail at once naming the
missing files), the tiny types build small LAVIS modules from `vision:` and `qformer:`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from lavis.common.utils import is_url
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm, disabled_train
from omegaconf import OmegaConf
from torch import nn

from lavis_free.common.safe_load import forced_weights_only
from lavis_free.models import tiny, weights

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


def plain(section: Optional[Mapping[str, Any]]) -> Optional[dict]:
    """OmegaConf sections -> plain dicts (None stays None)."""
    if section is None:
        return None
    if OmegaConf.is_config(section):
        return OmegaConf.to_container(section, resolve=True)
    return dict(section)


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad = False


def vision_and_qformer_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The `from_config` keywords every plugin BLIP-2 model takes (LAVIS's names and defaults)."""
    return dict(
        vit_model=cfg.get("vit_model", "eva_clip_g"),
        img_size=cfg.get("image_size"),
        drop_path_rate=cfg.get("drop_path_rate", 0),
        use_grad_checkpoint=cfg.get("use_grad_checkpoint", False),
        vit_precision=cfg.get("vit_precision", "fp16"),
        freeze_vit=cfg.get("freeze_vit", True),
        num_query_token=cfg.get("num_query_token"),
        prompt=cfg.get("prompt", ""),
        max_txt_len=cfg.get("max_txt_len", 32),
        vision=plain(cfg.get("vision")),
        qformer=plain(cfg.get("qformer")),
        cross_attention_freq=cfg.get("cross_attention_freq", 2),
        exits=plain(cfg.get("exits")),
    )


class OfflineBlip2:
    """Component hooks, checkpoint loading and model types of the plugin's BLIP-2 models."""

    PRETRAINED_MODEL_CONFIG_DICT: Dict[str, str] = {}
    MODEL_NAME = ""  # the registry name, for messages
    TRAINED_TYPE = ""  # the shipped trained type `default_model_type` prefers
    UNTRAINED_TYPE = "tiny"

    def build_vision_and_qformer(
        self,
        vit_model: str,
        img_size: int,
        drop_path_rate: float,
        use_grad_checkpoint: bool,
        vit_precision: str,
        freeze_vit: bool,
        num_query_token: int,
        cross_attention_freq: int,
        vision: Optional[Mapping[str, Any]],
        qformer: Optional[Mapping[str, Any]],
        qformer_text_input: bool = False,
    ) -> None:
        """Blip2Base, the Q-Former tokenizer, the vision encoder (frozen as LAVIS freezes it) and
        the Q-Former: the first half of every BLIP-2 `__init__`. BLIP-2 drops the Q-Former's text
        branch; InstructBLIP (`qformer_text_input`) keeps it for the instruction, with its word
        embeddings sized to the tokenizer and the tokenizer truncating on the left (the end of an
        instruction is where the question is), as LAVIS main's InstructBLIP does."""
        Blip2Base.__init__(self)
        self.tokenizer = self.init_tokenizer(shipped_vocab=qformer is not None)
        if qformer_text_input:
            self.tokenizer.truncation_side = "left"
        self.visual_encoder, self.ln_vision = self.init_vision_encoder(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision, vision=vision
        )
        if freeze_vit:
            freeze(self.visual_encoder)
            self.visual_encoder = self.visual_encoder.eval()
            self.visual_encoder.train = disabled_train
            logging.info("freeze vision encoder")
        self.Qformer, self.query_tokens = self.init_Qformer(
            num_query_token, self.visual_encoder.num_features, cross_attention_freq,
            qformer=qformer, vocab_size=len(self.tokenizer),
        )
        if qformer_text_input:
            self.Qformer.resize_token_embeddings(len(self.tokenizer))
            self.Qformer.cls = None
        else:
            self._drop_qformer_text_branch()

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
                raise ValueError(f"model.vision is only read with model.vit_model={TINY_VIT!r}, not {model_name!r}")
            if model_name not in weights.VIT_URLS:
                raise ValueError(f"model.vit_model={model_name!r}; allowed: {[TINY_VIT] + sorted(weights.VIT_URLS)}")
            weights.require(weights.vision_weights(model_name))
            with forced_weights_only():
                return super().init_vision_encoder(model_name, img_size, drop_path_rate, use_grad_checkpoint, precision)
        encoder = tiny.build_vision_encoder(img_size, vision, drop_path_rate, use_grad_checkpoint, precision)
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
        model = tiny.build_qformer(num_query_token, vision_width, qformer, vocab_size, cross_attention_freq)
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, model.config.hidden_size))
        nn.init.normal_(query_tokens, mean=0.0, std=model.config.initializer_range)
        return model, query_tokens

    def _drop_qformer_text_branch(self) -> None:
        """BLIP-2's LM path uses only the Q-Former's query path; free its text-only modules."""
        self.Qformer.cls = None
        self.Qformer.bert.embeddings.word_embeddings = None
        self.Qformer.bert.embeddings.position_embeddings = None
        for layer in self.Qformer.bert.encoder.layer:
            layer.output = None
            layer.intermediate = None

    # ---- model types ----

    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        """The model YAML of `model_type`; an unknown type names the valid ones."""
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise ValueError(
                f"Unknown model_type {model_type!r} for {cls.MODEL_NAME}; valid types: "
                f"{sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}"
            )
        return cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    @classmethod
    def default_model_type(cls) -> str:
        """The shipped trained type when its weights are in the package, else the random one."""
        cfg = OmegaConf.load(cls.default_config_path(cls.TRAINED_TYPE)).model
        return cls.TRAINED_TYPE if (PACKAGE_ROOT / cfg.finetuned).is_file() else cls.UNTRAINED_TYPE

    # ---- checkpoints named in the model YAML ----

    def load_checkpoint_from_config(self, cfg: Mapping[str, Any], **kwargs: Any) -> None:
        """LAVIS's rule (`finetuned` if `load_finetuned` else `pretrained`), with relative paths
        resolved by `resolve_checkpoint` and an empty entry meaning "keep the initial weights";
        then `model.exits_checkpoint`, the trained exits, checked against `model.exits` and the
        backbone just loaded (a file without exits is refused)."""
        key = "finetuned" if cfg.get("load_finetuned", True) else "pretrained"
        path = cfg.get(key)
        if not path:
            logging.info("model.%s is empty: weights stay as initialised", key)
        else:
            # a backbone file: it need not hold exits (`model.exits_checkpoint` brings them)
            self.load_checkpoint(resolve_checkpoint(path, key), origin=f"model.{key}", exits_required=False)
        exits_path = cfg.get("exits_checkpoint")
        if exits_path:
            self.load_checkpoint(resolve_checkpoint(exits_path, "exits_checkpoint"), origin="model.exits_checkpoint")
