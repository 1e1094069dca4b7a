"""Builders for the tiny offline components of `blip2_opt_free`.

Why this module exists: LAVIS 1.0.2 builds every BLIP-2 component from the network
(bert-base-uncased for the Q-Former and its tokenizer, EVA ViT-g weights, facebook/opt-* for the
LM and its tokenizer). The tiny model types build the *same LAVIS classes*
(`eva_vit.VisionTransformer`, `Qformer.BertLMHeadModel`, `modeling_opt.OPTForCausalLM`) from
small configurations written in the model YAML (`vision:`, `qformer:`, `opt_config:`), with
tokenizers shipped inside the package, so they build offline in well under a second and load
checkpoints with the same state-dict keys as LAVIS's Blip2OPT.
"""
from functools import partial
from typing import Any, Mapping, Tuple

import torch.nn as nn
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
from lavis.models.blip2_models.modeling_opt import OPTConfig
from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizer

from lavis_free.models.opt_lm import CachedOPTForCausalLM
from lavis_free.models.tokenizers import bert_tiny_vocab_path, opt_tiny_tokenizer_path

# Every key is required so that the YAML alone shows the architecture.
VISION_KEYS = ("patch_size", "width", "depth", "num_heads", "mlp_ratio")
QFORMER_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
OPT_REQUIRED_KEYS = (
    "hidden_size",
    "ffn_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
OPT_OPTIONAL_KEYS = (
    "dropout",
    "attention_dropout",
    "activation_function",
    "init_std",
    "layerdrop",
    "do_layer_norm_before",
)
# Taken from the shipped tokenizer, so a YAML cannot contradict it.
OPT_TOKENIZER_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


def check_section(
    section: str, cfg: Mapping[str, Any], required: Tuple[str, ...], optional: Tuple[str, ...] = ()
) -> dict:
    """Return `cfg` as a plain dict after checking its keys; errors name `model.<section>.<key>`."""
    if cfg is None:
        raise ValueError(f"model.{section} is missing; it needs the keys {list(required)}")
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"model.{section}: unknown key(s) {unknown}; allowed: {sorted(required + optional)}"
        )
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"model.{section}: missing key(s) {missing}")
    return cfg


def build_vision_encoder(
    img_size: int,
    vision: Mapping[str, Any],
    drop_path_rate: float = 0.0,
    use_grad_checkpoint: bool = False,
    precision: str = "fp32",
) -> VisionTransformer:
    """A small EVA ViT (LAVIS's class, random weights) for `img_size` x `img_size` images."""
    cfg = check_section("vision", vision, VISION_KEYS)
    if img_size % cfg["patch_size"] != 0:
        raise ValueError(
            f"model.image_size={img_size} must be a multiple of model.vision.patch_size="
            f"{cfg['patch_size']}"
        )
    encoder = VisionTransformer(
        img_size=img_size,
        patch_size=cfg["patch_size"],
        embed_dim=cfg["width"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_mean_pooling=False,
        use_checkpoint=use_grad_checkpoint,
    )
    if precision == "fp16":
        convert_weights_to_fp16(encoder)
    return encoder


def build_qformer(
    num_query_token: int,
    vision_width: int,
    qformer: Mapping[str, Any],
    vocab_size: int,
    cross_attention_freq: int,
) -> BertLMHeadModel:
    """A small Q-Former (LAVIS's BertLMHeadModel) whose BertConfig is built here, not on the hub."""
    cfg = check_section("qformer", qformer, QFORMER_KEYS)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
    )
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = cross_attention_freq
    config.query_length = num_query_token
    return BertLMHeadModel(config)


def build_opt(opt_config: Mapping[str, Any], tokenizer: PreTrainedTokenizer) -> CachedOPTForCausalLM:
    """LAVIS's OPT LM (the one taking `query_embeds`, cache-fixed) from an inline config, in float32.

    Vocabulary size and special token ids come from `tokenizer`.
    """
    reserved = sorted(set(opt_config or {}) & set(OPT_TOKENIZER_KEYS))
    if reserved:
        raise ValueError(
            f"model.opt_config: {reserved} are taken from the shipped tokenizer; remove them"
        )
    cfg = check_section("opt_config", opt_config, OPT_REQUIRED_KEYS, OPT_OPTIONAL_KEYS)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        word_embed_proj_dim=cfg["hidden_size"],
        **cfg,
    )
    return CachedOPTForCausalLM(config)


def load_bert_tokenizer() -> BertTokenizer:
    """The Q-Former tokenizer from the shipped vocabulary, with LAVIS's `[DEC]` BOS token."""
    tokenizer = BertTokenizer(vocab_file=bert_tiny_vocab_path())
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def load_opt_tokenizer() -> PreTrainedTokenizer:
    """The shipped OPT-style (GPT-2 BPE) tokenizer of the tiny LM."""
    return AutoTokenizer.from_pretrained(opt_tiny_tokenizer_path(), use_fast=False)
