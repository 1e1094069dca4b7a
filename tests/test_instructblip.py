"""`instructblip_free`: InstructBLIP on LAVIS 1.0.2, its types, the instruction-aware Q-Former
and LAVIS main's defaults. (Its decoding oracles are in tests/test_conformance.py.)"""
import time

import pytest
import torch
from omegaconf import OmegaConf

import lavis_free
from lavis_free.hosts import binding_for
from lavis_free.models.instructblip_free import InstructBlipFree, InstructBlipT5Free

ARCH_KEYS = ("vit_model", "image_size", "vision", "vit_precision", "num_query_token", "cross_attention_freq",
             "qformer", "t5_config", "prompt", "max_txt_len", "max_output_txt_len")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lavis_free.load_model("instructblip_free", "tiny_flant5")


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_tiny_flant5_builds_offline_quickly_with_lavis_main_s_attributes():
    start = time.perf_counter()
    model = lavis_free.load_model("instructblip_free", "tiny_flant5")
    assert time.perf_counter() - start < 3.0  # "well under a second" on a quiet core; CI shares two
    assert isinstance(model, InstructBlipT5Free) and not model.training
    for name in ("tokenizer", "visual_encoder", "ln_vision", "Qformer", "query_tokens", "t5_tokenizer",
                 "t5_output_tokenizer", "t5_model", "t5_proj", "max_txt_len", "max_output_txt_len", "prompt"):
        assert hasattr(model, name), name
    assert model.tokenizer.truncation_side == "left" and model.t5_tokenizer.truncation_side == "left"
    assert model.t5_output_tokenizer.truncation_side == "right"
    assert model.Qformer.bert.embeddings.word_embeddings.num_embeddings == len(model.tokenizer)
    assert model.Qformer.cls is None and model.Qformer.bert.encoder.layer[0].intermediate is not None
    assert type(binding_for(model)).__name__ == "InstructBlipT5Binding"


def test_real_types_follow_lavis_main(tmp_path):
    for model_type, lm_key, lm in (("flant5xl", "t5_model", "google/flan-t5-xl"), ("flant5xxl", "t5_model", "google/flan-t5-xxl"),
                                   ("vicuna7b", "llm_model", "./llm/vicuna-7b"), ("vicuna13b", "llm_model", "./llm/vicuna-13b")):
        cfg = OmegaConf.load(InstructBlipFree.default_config_path(model_type)).model
        assert cfg[lm_key] == lm and cfg.num_query_token == 32 and cfg.image_size == 224 and not cfg.load_finetuned
        assert cfg.pretrained.endswith(f"instruct_blip_{model_type.replace('flant5', 'flan')}_trimmed.pth")


def test_unknown_type_and_missing_lm_are_named():
    with pytest.raises(ValueError, match="tiny_flant5"):
        lavis_free.load_model("instructblip_free", "flant5-tiny")
    cfg = OmegaConf.load(InstructBlipFree.default_config_path("tiny_flant5")).model
    del cfg["t5_config"]
    with pytest.raises(ValueError, match="needs its LM: model.t5_model / model.t5_config .* model.llm_model / model.llm_config"):
        InstructBlipFree.from_config(cfg)


def test_the_instruction_changes_the_queries_and_the_answer(model, images):
    binding = binding_for(model)
    a, _ = binding.queries(model, images, ["A short image description:"] * 3)
    b, _ = binding.queries(model, images, ["Question: what colour is the circle? Short answer:"] * 3)
    assert a.shape == b.shape == (3, 8, model.t5_model.config.d_model) and not torch.allclose(a, b)
    samples = {"image": images, "prompt": ["A short image description:", "Question: how many? Short answer:", "x"]}
    one_per_row = model.generate(samples, num_beams=1, max_length=6, repetition_penalty=1.0)
    assert len(one_per_row) == 3 and len(set(one_per_row)) >= 2


def test_generate_defaults_are_lavis_main_s_beam_search_with_repetition_penalty(model, images):
    """LAVIS main's InstructBLIP `generate` defaults to num_beams=5, repetition_penalty=1.5; the
    engine runs them (beam search with the repetition processor) and, with exits off, gives the
    host's own full-depth decoding's captions."""
    binding = binding_for(model)
    defaults = binding.generate_defaults
    assert (defaults["num_beams"], defaults["repetition_penalty"], defaults["max_length"]) == (5, 1.5, 256)
    captions, stats = model.generate({"image": images, "prompt": "describe"}, max_length=5, early_exit=False,
                                     return_exit_stats=True)
    want = binding.lavis_generate(model, images, ["describe"] * len(images), **{**defaults, "max_length": 5})
    assert captions == binding.decode_text(model, want)
    assert len(stats["exit_layers"]) == 5 * len(images)  # one cost row per beam slot


def test_forward_scores_the_target_through_the_output_tokenizer(model, images):
    samples = {"image": images, "text_input": ["describe", "Question: what colour? Short answer:", "x"],
               "text_output": ["a red circle", "blue", "two green squares"]}
    batch = binding_for(model).training_batch(model, samples)
    scored = [model.t5_output_tokenizer.decode(row[row != -100]) for row in batch.labels]
    assert scored == ["a red circle</s>", "blue</s>", "two green squares</s>"]
    assert torch.isfinite(model(samples)["loss"])


def test_vicuna_types_name_the_transformers_they_need_on_the_default_stack():
    from lavis_free.compat.transformers_version import HAS_LLAMA, TransformersVersionError

    if HAS_LLAMA:
        pytest.skip("this transformers has LLaMA (the second stack): tiny_vicuna builds")
    for model_type in ("tiny_vicuna", "vicuna7b"):
        with pytest.raises(TransformersVersionError, match=r"needs transformers >= 4.28 .*STACK=lavis-main"):
            lavis_free.load_model("instructblip_free", model_type)


def test_tiny_vicuna_follows_lavis_main_s_tokenizer_set_up_and_never_generates_pad(images):
    """bos = eos = unk = </s>, an added [PAD] the LM's embeddings were resized to, left truncation;
    generation pads prompts on the left, works at batch > 1 and never emits [PAD]."""
    pytest.importorskip("transformers.models.llama", reason="needs transformers >= 4.28 (the second stack)")
    from lavis_free.compat.transformers_version import HAS_LLAMA

    if not HAS_LLAMA:
        pytest.skip("needs transformers >= 4.28 (the second stack)")
    model = lavis_free.load_model("instructblip_free", "tiny_vicuna")
    tok = model.llm_tokenizer
    assert tok.bos_token == tok.eos_token == tok.unk_token == "</s>" and tok.pad_token == "[PAD]"
    assert model.llm_model.get_input_embeddings().num_embeddings == len(tok) and tok.truncation_side == "left"
    assert type(binding_for(model)).__name__ == "InstructBlipVicunaBinding"
    with torch.no_grad():
        model.llm_model.lm_head.weight[tok.pad_token_id] = 100.0  # [PAD] would win every argmax
    host = model.free_exits
    decodes = []
    real_decode = host.decode
    host.decode = lambda *args: decodes.append(real_decode(*args)) or decodes[-1]
    try:
        _, stats = model.generate({"image": images, "prompt": ["describe", "Question: what colour? Short answer:", "x"]},
                                  num_beams=1, max_length=6, repetition_penalty=1.0, return_exit_stats=True)
        model.generate({"image": images, "prompt": "describe"}, num_beams=2, max_length=6, early_exit=False)
    finally:
        del host.decode
    assert all(len(row) == 5 for row in stats["exit_layers"])  # max_length counts HF's start id
    for ids in (decodes[0].tokens, decodes[1].tokens):  # greedy, and beam search (the engine's too)
        generated = [t for row in ids.tolist() for t in row[: row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else None]]
        assert generated and tok.pad_token_id not in generated
    with pytest.raises(ValueError, match=r"max_length=1 leaves no token to generate .* max_len"):
        model.generate({"image": images, "prompt": "describe"}, num_beams=1, max_length=1, repetition_penalty=1.0)
    with pytest.raises(ValueError, match=r"min_length=4 can never be reached: it counts 1 start token\(s\) plus at most 2 generated"):
        model.generate({"image": images, "prompt": "describe"}, num_beams=1, max_length=3, min_length=4, repetition_penalty=1.0)


def test_tiny_flant5_and_shapes_tiny_flant5_share_the_architecture_and_the_project_s_exits():
    tiny = OmegaConf.load(InstructBlipFree.default_config_path("tiny_flant5"))
    shapes = OmegaConf.load(InstructBlipFree.default_config_path("shapes_tiny_flant5"))
    for key in ARCH_KEYS:
        if key != "prompt":  # shapes_tiny_flant5's prompt is the caption instruction it learnt
            assert tiny.model[key] == shapes.model[key], key
    assert tiny.preprocess == shapes.preprocess
    project = OmegaConf.load("projects/free/shapes_instruct_flant5.yaml")
    for key in ("layers", "init", "layout", "disc_hidden"):
        assert shapes.model.exits[key] == project.model.exits[key], key
    assert shapes.model.prompt == project.run.instructions.caption


def test_free_instruct_gives_every_sample_its_instruction_and_target_through_lavis_s_concatenation(shapes_data_dir):
    """LAVIS's runner concatenates the three train datasets (`ConcatDataset` keeps only the keys
    all samples of a batch share): the targets must survive a mixed batch."""
    from types import SimpleNamespace

    from lavis.datasets.data_utils import concat_datasets, reorg_datasets_by_split

    from lavis_free.common.config import FreeConfig
    from lavis_free.tasks.instruct import FreeInstructTask

    storage = [f"datasets.{name}.build_info.storage={shapes_data_dir}" for name in ("shapes_caption", "shapes_vqa", "shapes_dialogue")]
    cfg = FreeConfig(SimpleNamespace(cfg_path="projects/free/shapes_stage1_flant5.yaml", options=storage))
    task = FreeInstructTask.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    train = concat_datasets(reorg_datasets_by_split(dict(datasets)))["train"]
    caption, vqa, dialogue = (datasets[n]["train"] for n in ("shapes_caption", "shapes_vqa", "shapes_dialogue"))
    batch = train.collater([caption[0], vqa[0], dialogue[1]])
    assert batch["text_input"] == ["A short image description:", "Question: " + vqa.dataset[0]["text_input"] + " Short answer:",
                                   "Dialogue: " + dialogue.dataset[1]["text_input"] + " Short answer:"]
    assert batch["text_output"] == [caption.dataset[0]["text_input"], vqa.dataset[0]["answers"][0], dialogue.dataset[1]["text_output"]]
    assert batch["image"].shape[0] == 3


def test_free_instruct_checks_its_instructions():
    from lavis_free.tasks.instruct import FreeInstructTask

    with pytest.raises(ValueError, match=r"run.instructions: unknown kind\(s\) \['caption_'\]"):
        FreeInstructTask(num_beams=1, max_len=5, min_len=1, evaluate=False, instructions={"caption_": "x"})
    with pytest.raises(ValueError, match=r"run.instructions.vqa='Q:' needs one '\{\}'"):
        FreeInstructTask(num_beams=1, max_len=5, min_len=1, evaluate=False, instructions={"vqa": "Q:"})
