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
from lavis.models.blip2_models.modeling_t5 import T5Config
from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizer, T5TokenizerFast

from lavis_free.models.opt_lm import CachedOPTForCausalLM
from lavis_free.models.t5_lm import CachedT5ForConditionalGeneration
from lavis_free.models.tokenizers import bert_tiny_vocab_path, llama_tiny_tokenizer_path, opt_tiny_tokenizer_path, t5_tiny_tokenizer_path

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
T5_REQUIRED_KEYS = ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads")
T5_OPTIONAL_KEYS = (
    "dropout_rate",
    "feed_forward_proj",
    "tie_word_embeddings",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
)
T5_FEED_FORWARD = ("relu", "gelu", "gated-relu", "gated-gelu")
T5_TOKENIZER_KEYS = ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id")


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


def build_t5(t5_config: Mapping[str, Any], tokenizer: PreTrainedTokenizer) -> CachedT5ForConditionalGeneration:
    """LAVIS's T5 LM (what Blip2T5 uses, cache-fixed) from an inline config, in float32.

    `num_layers` counts encoder blocks, `num_decoder_layers` decoder blocks (where exits sit).
    Vocabulary size, pad (= decoder start, as in T5) and eos ids come from `tokenizer`. T5Config's
    own defaults apply to the optional keys: `feed_forward_proj: relu` and tied embeddings (a
    default T5); FlanT5 is `gated-gelu` and untied.
    """
    reserved = sorted(set(t5_config or {}) & set(T5_TOKENIZER_KEYS))
    if reserved:
        raise ValueError(f"model.t5_config: {reserved} are taken from the shipped tokenizer; remove them")
    cfg = check_section("t5_config", t5_config, T5_REQUIRED_KEYS, T5_OPTIONAL_KEYS)
    for key, value in cfg.items():
        if key == "feed_forward_proj":
            ok, expected = value in T5_FEED_FORWARD, f"one of {', '.join(T5_FEED_FORWARD)}"
        elif key == "tie_word_embeddings":
            ok, expected = isinstance(value, bool), "true or false"
        elif key == "dropout_rate":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
            expected = "a number in [0, 1)"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            expected = "a positive integer"
        if not ok:
            raise ValueError(f"model.t5_config.{key}={value!r} is invalid: expected {expected}")
    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **cfg,
    )
    if config.feed_forward_proj == "gated-gelu":
        config.dense_act_fn = "gelu"  # Blip2T5 overrides FlanT5's gelu_new with exact GELU
    return CachedT5ForConditionalGeneration(config).float()


def load_t5_tokenizer() -> T5TokenizerFast:
    """The shipped T5-style (Unigram) tokenizer of the tiny T5, loaded as LAVIS's Blip2T5 loads one."""
    return T5TokenizerFast.from_pretrained(t5_tiny_tokenizer_path())


LLAMA_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "max_position_embeddings")
LLAMA_OPTIONAL_KEYS = ("rms_norm_eps",)


def build_llama(llm_config: Mapping[str, Any], tokenizer: PreTrainedTokenizer) -> nn.Module:
    """A transformers `LlamaForCausalLM` (Vicuna's architecture) from an inline config, in float32;
    vocabulary and special ids from `tokenizer` (after LAVIS's [PAD] was added to it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = check_section("llm_config", llm_config, LLAMA_REQUIRED_KEYS, LLAMA_OPTIONAL_KEYS)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **cfg)
    return LlamaForCausalLM(config).float()


def load_llama_tokenizer(**kwargs: Any) -> PreTrainedTokenizer:
    """The shipped LLaMA-style (SentencePiece) tokenizer, loaded as LAVIS main loads Vicuna's."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(llama_tiny_tokenizer_path(), use_fast=False, **kwargs)


def load_bert_tokenizer() -> BertTokenizer:
    """The Q-Former tokenizer from the shipped vocabulary, with LAVIS's `[DEC]` BOS token."""
    tokenizer = BertTokenizer(vocab_file=bert_tiny_vocab_path())
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def load_opt_tokenizer() -> PreTrainedTokenizer:
    """The shipped OPT-style (GPT-2 BPE) tokenizer of the tiny LM."""
    return AutoTokenizer.from_pretrained(opt_tiny_tokenizer_path(), use_fast=False)
