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
import difflib
import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.common.utils import is_url
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm, disabled_train
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from omegaconf import OmegaConf
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizer

from lavis_free.models import weights
from lavis_free.common.safe_load import forced_weights_only
from lavis_free.models import tiny
from lavis_free.models.early_exit_model import EarlyExitMixin
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


# What the early-exit engine decodes with (greedy); other values run LAVIS's full-depth path.
ENGINE_DECODING = {"use_nucleus_sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "num_captions": 1}


def _samples_entry(samples: Any, key: str) -> Any:
    """`samples[key]`, or an error saying what `samples` must be (LAVIS passes a dict batch)."""
    if not isinstance(samples, Mapping):
        raise TypeError(
            f"samples is a {type(samples).__name__}; expected a dict such as "
            "{'image': tensor [B, 3, H, W], 'prompt': str or [B strings]}"
        )
    if key not in samples:
        raise KeyError(f"samples has no {key!r} (its keys: {sorted(samples)})")
    return samples[key]


def _text_batch(texts: Any, key: str, batch: int) -> List[str]:
    """`samples[key]` as one string per image: a single string serves the whole batch."""
    if isinstance(texts, str):
        return [texts] * batch
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"samples[{key!r}] is a {type(texts).__name__}; expected a string or a list of {batch} strings")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"samples[{key!r}][{index}] is a {type(text).__name__}; expected a string")
    if len(texts) != batch:
        raise ValueError(f"samples[{key!r}] has {len(texts)} entries for {batch} images; expected one per image")
    return list(texts)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {low}")


@registry.register_model("blip2_opt_free")
class Blip2OPTFree(EarlyExitMixin, Blip2OPT):
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
        self.setup_exits(exits)

    def exit_lm(self) -> nn.Module:
        return self.opt_model

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

    # ---- shared image -> LM input path ----

    def check_images(self, image: Any) -> torch.Tensor:
        """`samples["image"]` checked against what the vision encoder takes, cast to its dtype.

        Why: a wrong tensor otherwise fails deep in the ViT (an assert on the size, a dtype or
        device error in a convolution) and non-finite pixels decode into captions without a word.
        Raises TypeError/ValueError naming samples['image'], what it got and what is expected."""
        channels, height, width, weight = self._vision_input()
        expected = (
            f"expected a floating-point tensor [B, {channels}, {height}, {width}] with B >= 1 on "
            f"{weight.device} (the model's vis_processors give [{channels}, {height}, {width}] per image)"
        )
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"samples['image'] is a {type(image).__name__}; {expected}")
        got = f"samples['image'] has shape {tuple(image.shape)}, dtype {image.dtype}, device {image.device}"
        if image.dim() == 3 and image.shape[0] == channels:
            raise ValueError(f"{got}: one image without the batch dimension (use image.unsqueeze(0)); {expected}")
        if image.dim() != 4 or image.shape[0] == 0 or image.shape[1] != channels:
            hint = " (channels last? use image.permute(0, 3, 1, 2))" if image.dim() == 4 and image.shape[-1] == channels else ""
            raise ValueError(f"{got}{hint}; {expected}")
        if tuple(image.shape[2:]) != (height, width):
            raise ValueError(f"{got}: images must be {height}x{width} for this model (resize with its vis_processors); {expected}")
        if not image.is_floating_point():
            raise ValueError(f"{got}: integer pixels are not normalised (use the model's vis_processors); {expected}")
        if image.device != weight.device:
            raise ValueError(f"{got}, the model is on {weight.device}: move one to the other (image.to(...)); {expected}")
        if not torch.isfinite(image).all():
            raise ValueError(f"{got}: it holds NaN or infinite values; {expected} with finite values")
        return image.to(weight.dtype)

    def _vision_input(self) -> Tuple[int, int, int, torch.Tensor]:
        """(channels, height, width, first conv's weight) of the vision encoder's input: LAVIS's
        EVA ViTs patch-embed through `patch_embed`, its CLIP ViT through `conv1`."""
        encoder = self.visual_encoder
        if hasattr(encoder, "patch_embed"):
            (height, width), conv = encoder.patch_embed.img_size, encoder.patch_embed.proj
        else:
            height = width = encoder.input_resolution
            conv = encoder.conv1
        return conv.in_channels, height, width, conv.weight

    def encode_image_queries(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] (checked by the entry points: `check_images`) -> (query embeddings
        in the LM's space [B, Q, D], mask [B, Q])."""
        image = image.to(self._vision_input()[3].dtype)
        with self.maybe_autocast():
            image_embeds = self.ln_vision(self.visual_encoder(image))
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        query_output = self.Qformer.bert(
            query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        inputs_opt = self.opt_proj(query_output.last_hidden_state)
        atts_opt = torch.ones(inputs_opt.shape[:-1], dtype=torch.long, device=image.device)
        return inputs_opt, atts_opt

    def tokenize(
        self, texts: Sequence[str], device: torch.device, padding_side: str
    ) -> BatchEncoding:
        """OPT tokens for a batch. Prompts use `padding_side="left"` (every prompt ends where
        generation starts; over-long prompts lose their oldest tokens); targets use "right"."""
        self.opt_tokenizer.padding_side = padding_side
        self.opt_tokenizer.truncation_side = padding_side
        return self.opt_tokenizer(
            list(texts),
            return_tensors="pt",
            padding="longest",
            truncation=True,
            max_length=self.max_txt_len,
        ).to(device)

    def build_lm_inputs(
        self, inputs_opt: torch.Tensor, atts_opt: torch.Tensor, tokens: BatchEncoding
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask) = image queries followed by the embedded tokens.

        With left-padded tokens the pads sit between the queries and the text; they are masked
        and OPT's positions count only unmasked slots, so this equals [pads, queries, text].
        """
        token_embeds = self.opt_model.get_input_embeddings()(tokens.input_ids)
        inputs_embeds = torch.cat([inputs_opt.to(token_embeds.dtype), token_embeds], dim=1)
        attention_mask = torch.cat([atts_opt, tokens.attention_mask], dim=1)
        return inputs_embeds, attention_mask

    # ---- training ----

    def lm_training_inputs(
        self, samples: Mapping[str, Any]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forcing inputs for `samples["text_input"]`: (inputs_embeds, attention_mask,
        labels). LAVIS semantics: the text already holds the prompt, if any; its first
        `prompt_length` tokens, the image queries and the padding are labelled -100."""
        image = self.check_images(_samples_entry(samples, "image"))
        inputs_opt, atts_opt = self.encode_image_queries(image)
        texts = _text_batch(_samples_entry(samples, "text_input"), "text_input", len(image))
        tokens = self.tokenize([t + "\n" for t in texts], image.device, "right")
        targets = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        if self.prompt:
            targets[:, : int(self.prompt_length)] = -100
        query_targets = torch.full_like(atts_opt, -100)
        inputs_embeds, attention_mask = self.build_lm_inputs(inputs_opt, atts_opt, tokens)
        return inputs_embeds, attention_mask, torch.cat([query_targets, targets], dim=1)

    def forward(self, samples: Mapping[str, Any]) -> dict:
        """Captioning loss of the LM (stage 1)."""
        inputs_embeds, attention_mask, labels = self.lm_training_inputs(samples)
        with self.maybe_autocast():
            outputs = self.opt_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                return_dict=True,
                labels=labels,
            )
        return {"loss": outputs.loss}

    # ---- inference ----

    @torch.no_grad()
    def generate(
        self,
        samples: Mapping[str, Any],
        use_nucleus_sampling: bool = False,
        num_beams: int = 5,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1,
        exit_threshold: Optional[float] = None,
        kv_policy: Optional[str] = None,
        confidence: Optional[str] = None,
        min_exit_layer: Optional[int] = None,
        return_exit_stats: bool = False,
        early_exit: bool = True,
    ) -> Union[List[str], Tuple[List[str], dict]]:
        """Captions for `samples["image"]` (LAVIS's signature plus early-exit keywords).

        `samples["prompt"]` may be one string for the batch or one per image; default: the
        model's prompt. Greedy decoding (num_beams=1, no sampling) runs the early-exit engine;
        beam search and sampling run LAVIS's full-depth path: with early-exit keywords passed that
        is a ValueError, with exits on by the config's default a warning. Early-exit keywords (None = the
        model config's `exits.inference` default): `exit_threshold` (confidence in [0, 1];
        above 1 disables exits), `kv_policy` ("recompute" | "propagate"), `confidence`
        ("max_prob" | "margin" | "entropy"), `min_exit_layer` (decoder layers a token runs
        before it may exit), `early_exit=False` (LAVIS's own full-depth decoding).
        With `return_exit_stats=True` returns `(captions, stats)`; `stats["exit_layers"][i][t]`
        is the number of LM decoder layers run for token t of sample i (up to its EOS) and
        `stats["num_layers"]` the LM's depth."""
        image = self.check_images(_samples_entry(samples, "image"))
        prompts = _text_batch(samples.get("prompt", self.prompt), "prompt", len(image))
        return self.generate_from_prompts(
            image,
            prompts,
            use_nucleus_sampling=use_nucleus_sampling,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            num_captions=num_captions,
            temperature=temperature,
            exit_threshold=exit_threshold,
            kv_policy=kv_policy,
            confidence=confidence,
            min_exit_layer=min_exit_layer,
            return_exit_stats=return_exit_stats,
            early_exit=early_exit,
        )

    @torch.no_grad()
    def generate_from_prompts(
        self,
        image: torch.Tensor,
        prompts: Sequence[str],
        use_nucleus_sampling: bool = False,
        num_beams: int = 5,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1,
        exit_threshold: Optional[float] = None,
        kv_policy: Optional[str] = None,
        confidence: Optional[str] = None,
        min_exit_layer: Optional[int] = None,
        return_exit_stats: bool = False,
        early_exit: bool = True,
    ) -> Union[List[str], Tuple[List[str], dict]]:
        """One continuation per prompt (prompts left-padded): the early-exit engine for greedy
        decoding, LAVIS's full-depth HF generation otherwise. See `generate` for the keywords.

        Settings the engine does not honour (`ENGINE_DECODING`) never drop exits silently: with
        exit options passed they are a ValueError, with exits on by the config's default they
        decode at full depth after a warning (once per model)."""
        for name, value, low in (("num_beams", num_beams, 1), ("num_captions", num_captions, 1),
                                 ("max_length", max_length, 1), ("min_length", min_length, 0)):
            _check_int(name, value, low)
        if num_captions > num_beams and not use_nucleus_sampling:
            raise ValueError(
                f"num_captions={num_captions} needs num_beams >= {num_captions} (beam search returns "
                "its best beams) or use_nucleus_sampling=True"
            )
        inputs_opt, atts_opt = self.encode_image_queries(image)
        tokens = self.tokenize(prompts, image.device, "left")
        prompt_length = tokens.input_ids.shape[1]
        self._check_lengths(inputs_opt.shape[1], prompt_length, max_length, min_length)
        exit_options = dict(
            exit_threshold=exit_threshold, kv_policy=kv_policy, confidence=confidence, min_exit_layer=min_exit_layer
        )
        options = self.decode_options(max_length, min_length, prompt_length, **exit_options)
        decoding = dict(use_nucleus_sampling=use_nucleus_sampling, num_beams=num_beams,
                        repetition_penalty=repetition_penalty, num_captions=num_captions)
        unhonoured = [f"{k}={v!r}" for k, v in decoding.items() if v != ENGINE_DECODING[k]]
        if unhonoured and early_exit and options.exits_enabled and self.early_exits is not None:
            self._exits_not_honoured(unhonoured, asked=any(v is not None for v in exit_options.values()))
        if early_exit and not unhonoured:
            inputs_embeds, attention_mask = self.build_lm_inputs(inputs_opt, atts_opt, tokens)
            result = self.early_exit_decode(inputs_embeds, attention_mask, options)
            texts = self.opt_tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
            texts = [text.strip() for text in texts]
            return (texts, self.exit_stats(result)) if return_exit_stats else texts
        if use_nucleus_sampling:
            num_beams = 1
        copies = num_captions if use_nucleus_sampling else num_beams
        with self.maybe_autocast():
            outputs = self.opt_model.generate(
                input_ids=tokens.input_ids,
                query_embeds=inputs_opt.repeat_interleave(copies, dim=0),
                attention_mask=torch.cat([atts_opt, tokens.attention_mask], dim=1),
                do_sample=use_nucleus_sampling,
                top_p=top_p,
                temperature=temperature,
                num_beams=num_beams,
                max_new_tokens=max_length,
                min_length=min_length,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.opt_tokenizer.pad_token_id,
                repetition_penalty=repetition_penalty,
                length_penalty=length_penalty,
                num_return_sequences=num_captions,
            )
        generated = outputs[:, prompt_length:]
        texts = [t.strip() for t in self.opt_tokenizer.batch_decode(generated, skip_special_tokens=True)]
        return (texts, self.full_depth_stats(generated.tolist())) if return_exit_stats else texts

    def _check_lengths(self, num_queries: int, prompt_length: int, max_length: int, min_length: int) -> None:
        """Lengths the decode cannot meet, named before they fail (an index error in the LM's
        position table) or run to `max_length` for nothing (a `min_length` never reached)."""
        if min_length > prompt_length + max_length:
            raise ValueError(
                f"min_length={min_length} can never be reached: it counts the {prompt_length} prompt token(s) "
                f"plus at most max_length={max_length} new ones (predict_answers: min_len, max_len)"
            )
        positions = self.opt_model.config.max_position_embeddings
        if num_queries + prompt_length + max_length > positions:
            raise ValueError(
                f"max_length={max_length} is too long: {num_queries} image queries + {prompt_length} prompt "
                f"tokens + {max_length} new tokens exceed the LM's {positions} positions "
                f"(max_position_embeddings); use max_length <= {positions - num_queries - prompt_length}"
            )

    def _exits_not_honoured(self, unhonoured: Sequence[str], asked: bool) -> None:
        """Exits asked for with settings the engine cannot honour: an error when the caller passed
        exit options, else a warning (once per model) that this call decodes at full depth."""
        rule = (
            "early exits run on greedy decoding only for now (num_beams=1, use_nucleus_sampling=False, "
            "repetition_penalty=1.0, num_captions=1)"
        )
        settings = ", ".join(unhonoured)
        if asked:
            raise ValueError(
                f"{settings} cannot decode with the early exits asked for: {rule}; drop these settings, "
                "or pass exit_threshold above 1 (or early_exit=False) for full-depth decoding"
            )
        if not getattr(self, "_warned_full_depth", False):
            self._warned_full_depth = True
            warnings.warn(
                f"{settings}: decoding at full depth, without the model's early exits: {rule}. Pass those "
                "for exits, or exit_threshold above 1 for full depth without this warning",
                stacklevel=3,
            )

    @torch.no_grad()
    def predict_answers(
        self,
        samples: Mapping[str, Any],
        num_beams: int = 5,
        inference_method: str = "generate",
        max_len: int = 10,
        min_len: int = 1,
        num_ans_candidates: int = 128,
        answer_list: Optional[Sequence[str]] = None,
        prompt: str = "Question: {} Answer:",
        length_penalty: float = 0,
        **generate_kwargs: Any,
    ) -> List[str]:
        """Open-ended answers for VQA and dialogue (`samples["text_input"]` = the question, or
        history + question). `prompt` wraps each text at its "{}"; "" uses the text as is.
        LAVIS's ranking arguments (`answer_list`, `num_ans_candidates`, as its VQA tasks pass
        them) are accepted and unused: only `inference_method="generate"` exists here.
        `generate_kwargs` are `generate`'s decoding and early-exit options; any other keyword is
        a TypeError, because a misspelt option (`exit_treshold`) would otherwise be ignored."""
        own, passed_on = _PREDICT_ANSWERS_ARGS, _GENERATE_OPTIONS
        for name in generate_kwargs:
            if name not in passed_on:
                close = difflib.get_close_matches(name, own | passed_on, n=1)
                raise TypeError(
                    f"predict_answers() got an unexpected keyword argument {name!r}"
                    f"{f' (did you mean {close[0]!r}?)' if close else ''}; it takes LAVIS's arguments "
                    f"{sorted(own)} and generate's options {sorted(passed_on)}"
                )
        if inference_method != "generate":
            raise ValueError(
                f"inference_method={inference_method!r} is not supported by blip2_opt_free; "
                "use 'generate'"
            )
        if not isinstance(prompt, str) or (prompt and prompt.count("{}") != 1):
            raise ValueError(f"prompt={prompt!r} must be a string with one '{{}}' where the question goes, or ''")
        image = self.check_images(_samples_entry(samples, "image"))
        texts = _text_batch(_samples_entry(samples, "text_input"), "text_input", len(image))
        try:
            prompts = [prompt.format(text) for text in texts] if prompt else texts
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"prompt={prompt!r} cannot be filled ({err!r}): other braces must be doubled, {{{{ }}}}") from None
        return self.generate_from_prompts(
            image,
            prompts,
            num_beams=num_beams,
            max_length=max_len,
            min_length=min_len,
            length_penalty=length_penalty,
            **generate_kwargs,
        )

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


# predict_answers' own arguments, and the generate_from_prompts options it passes on as keywords
_PREDICT_ANSWERS_ARGS = frozenset(inspect.signature(Blip2OPTFree.predict_answers).parameters) - {"self", "generate_kwargs"}
_GENERATE_OPTIONS = frozenset(inspect.signature(Blip2OPTFree.generate_from_prompts).parameters) - {
    "self", "image", "prompts", "num_beams", "max_length", "min_length", "length_penalty"
}
