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
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.common.utils import is_url
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm, disabled_train
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from omegaconf import OmegaConf
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizer

from lavis_free.models import tiny
from lavis_free.models.early_exit_model import EXIT_GENERATE_KWARGS, EarlyExitMixin
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
class Blip2OPTFree(EarlyExitMixin, Blip2OPT):
    """BLIP-2 OPT whose components come from LAVIS's hub path or from tiny offline configs.

    Model types:
        - tiny: random weights, built offline in well under a second (tests)
        - shapes_tiny: the tiny architecture trained on the synthetic shapes data (shipped)
        - pretrain_opt2.7b, caption_coco_opt2.7b: LAVIS's real BLIP-2 OPT-2.7B (network, GPU)
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
        """`eva_vit_tiny` builds a small EVA ViT from `vision`; other names go to LAVIS."""
        if model_name != TINY_VIT:
            if vision is not None:
                raise ValueError(
                    f"model.vision is only read with model.vit_model={TINY_VIT!r}, "
                    f"not {model_name!r}"
                )
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
        tokenizer = AutoTokenizer.from_pretrained(opt_model, use_fast=False)
        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
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

    def encode_image_queries(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] -> (query embeddings in the LM's space [B, Q, D], mask [B, Q])."""
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
        image = samples["image"]
        inputs_opt, atts_opt = self.encode_image_queries(image)
        tokens = self.tokenize([t + "\n" for t in samples["text_input"]], image.device, "right")
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
        beam search and sampling run LAVIS's full-depth path. Early-exit keywords (None = the
        model config's `exits.inference` default): `exit_threshold` (confidence in [0, 1];
        above 1 disables exits), `kv_policy` ("recompute" | "propagate"), `confidence`
        ("max_prob" | "margin" | "entropy"), `min_exit_layer` (decoder layers a token runs
        before it may exit), `early_exit=False` (LAVIS's own full-depth decoding).
        With `return_exit_stats=True` returns `(captions, stats)`; `stats["exit_layers"][i][t]`
        is the number of LM decoder layers run for token t of sample i (up to its EOS) and
        `stats["num_layers"]` the LM's depth."""
        image = samples["image"]
        prompt = samples.get("prompt", self.prompt)
        prompts = [prompt] * image.size(0) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != image.size(0):
            raise ValueError(
                f"samples['prompt'] has {len(prompts)} entries for {image.size(0)} images"
            )
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
        decoding, LAVIS's full-depth HF generation otherwise. See `generate` for the keywords."""
        inputs_opt, atts_opt = self.encode_image_queries(image)
        tokens = self.tokenize(prompts, image.device, "left")
        prompt_length = tokens.input_ids.shape[1]
        options = self.decode_options(
            max_length,
            min_length,
            prompt_length,
            exit_threshold=exit_threshold,
            kv_policy=kv_policy,
            confidence=confidence,
            min_exit_layer=min_exit_layer,
        )
        greedy = not use_nucleus_sampling and num_beams == 1 and num_captions == 1
        if early_exit and greedy and repetition_penalty == 1.0:
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

    @torch.no_grad()
    def predict_answers(
        self,
        samples: Mapping[str, Any],
        num_beams: int = 5,
        inference_method: str = "generate",
        max_len: int = 10,
        min_len: int = 1,
        prompt: str = "Question: {} Answer:",
        length_penalty: float = 0,
        **kwargs: Any,
    ) -> List[str]:
        """Open-ended answers for VQA and dialogue (`samples["text_input"]` = the question, or
        history + question). `prompt` wraps each text at its "{}"; "" uses the text as is.
        LAVIS's ranking arguments (`answer_list`, `num_ans_candidates`) are accepted and unused:
        only `inference_method="generate"` exists here. The early-exit keywords of `generate`
        pass through `kwargs`."""
        if inference_method != "generate":
            raise ValueError(
                f"inference_method={inference_method!r} is not supported by blip2_opt_free; "
                "use 'generate'"
            )
        if prompt and "{}" not in prompt:
            raise ValueError(f"prompt={prompt!r} must contain '{{}}' where the question goes")
        texts = samples["text_input"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        prompts = [prompt.format(text) for text in texts] if prompt else texts
        exit_kwargs = {k: kwargs[k] for k in EXIT_GENERATE_KWARGS if k in kwargs}
        return self.generate_from_prompts(
            samples["image"],
            prompts,
            num_beams=num_beams,
            max_length=max_len,
            min_length=min_len,
            length_penalty=length_penalty,
            **exit_kwargs,
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
        elif key == "finetuned":
            self.load_checkpoint(url_or_filename=resolve_checkpoint(path, key))
        else:
            self.load_from_pretrained(url_or_filename=resolve_checkpoint(path, key), **kwargs)
        self.load_exits_from_config(cfg)

    def load_exits_from_config(self, cfg: Mapping[str, Any]) -> None:
        """`model.exits_checkpoint`: trained exits loaded onto the backbone just loaded (checked
        against `model.exits` by `check_exit_state`)."""
        path = cfg.get("exits_checkpoint")
        if path:
            self.load_checkpoint(url_or_filename=resolve_checkpoint(path, "exits_checkpoint"))
