"""`attach_exits` on LAVIS's own classes (built offline from small parts by `as_lavis_model`), the
YAML path (`model.arch: blip2_opt` + `model.exits`), and the errors of the seam."""
import copy

import pytest
import torch
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from omegaconf import OmegaConf

import lavis_free
from lavis_free.exits.config import ExitConfig
from lavis_free.hosts import ExitCheckpointError, binding_for, exits_of, supported_hosts
from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.models.blip2_t5_free import Blip2T5Free
from lavis_free.models.lavis_parts import as_lavis_model
from lavis_free.tasks.captioning import FreeCaptionTask
from lavis_free.tasks.exit_training import ExitTrainer, ExitTrainingSettings, train_step

EXITS = {"layers": [2, 5], "init": "random", "inference": {"exit_threshold": 0.5}}
CLASSES = {"opt": (Blip2OPTFree, Blip2OPT), "t5": (Blip2T5Free, Blip2T5)}


def tiny(family, **overrides):
    plugin_cls = CLASSES[family][0]
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.load(plugin_cls.default_config_path("tiny")).model, overrides)
    return plugin_cls.from_config(cfg).eval()


@pytest.fixture(params=sorted(CLASSES))
def family(request):
    return request.param


@pytest.fixture
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def test_a_lavis_instance_from_parts_is_lavis_s_own_class_with_lavis_s_own_lm(family):
    lavis = as_lavis_model(tiny(family))
    assert type(lavis) is CLASSES[family][1]
    lm = binding_for(lavis).lm(lavis)
    assert type(lm).__module__.startswith("lavis.models.blip2_models.modeling_")
    assert exits_of(lavis) is None and not hasattr(lavis, "early_exits")


def test_attach_exits_adds_decoding_keywords_and_leaves_the_class_alone(family, images):
    own_generate = CLASSES[family][1].generate
    lavis = lavis_free.attach_exits(as_lavis_model(tiny(family)), EXITS)
    assert CLASSES[family][1].generate is own_generate
    assert all(not p.requires_grad for name, p in lavis.named_parameters() if not name.startswith("early_exits."))
    assert any(name.startswith("early_exits.exits.") for name, _ in lavis.named_parameters())
    full = lavis.generate({"image": images}, num_beams=1, max_length=6, early_exit=False)
    assert full == own_generate(lavis, {"image": images}, num_beams=1, max_length=6)
    texts, stats = lavis.generate({"image": images}, num_beams=1, max_length=6, return_exit_stats=True, exit_threshold=0.0)
    assert len(texts) == 3 and {n for row in stats["exit_layers"] for n in row[1:]} == {3}  # all leave at the first exit
    with pytest.raises(TypeError, match="'exit_treshold' \\(did you mean 'exit_threshold'\\?\\)"):
        lavis.predict_answers({"image": images, "text_input": ["a", "b", "c"]}, exit_treshold=0.5)
    with pytest.raises(ValueError, match="already has exits attached"):
        lavis_free.attach_exits(lavis, EXITS)


def test_exits_train_and_round_trip_through_checkpoints_on_a_lavis_instance(family, tmp_path, images):
    """Exit training steps the attached exits of LAVIS's class; their inference checkpoint loads
    onto the plugin model of the same backbone and decodes the same tokens with exits on."""
    plugin = tiny(family, exits=EXITS)
    lavis = lavis_free.attach_exits(as_lavis_model(plugin), ExitConfig.from_dict(EXITS, 12))
    host = exits_of(lavis)
    samples = {"image": images, "text_input": ["a red circle", "two blue squares", "a star"]}
    backbone = ExitTrainer(ExitTrainingSettings()).backbone_outputs(host, samples)
    groups = host.optimizer_groups()
    optimizers = {g: torch.optim.AdamW(params, lr=1e-2) for g, params in groups.items()}
    before = copy.deepcopy(lavis.early_exits.state_dict())
    stats = train_step(host, backbone, optimizers, 0, 0)
    assert {"loss_disc", "loss_gen"} <= set(stats)
    assert any(not torch.equal(before[k], v) for k, v in lavis.early_exits.state_dict().items())
    path = tmp_path / "exits.pth"
    torch.save(host.inference_checkpoint(), path)
    plugin.load_checkpoint(str(path))
    assert plugin.generate({"image": images}, num_beams=1, max_length=6) == lavis.generate({"image": images}, num_beams=1, max_length=6)


def test_exits_of_another_backbone_are_refused_on_a_lavis_instance(tmp_path):
    trained = tiny("opt", exits=EXITS)
    path = tmp_path / "exits.pth"
    torch.save(exits_of(trained).inference_checkpoint(), path)
    other = as_lavis_model(tiny("opt"))
    with torch.no_grad():
        other.opt_proj.weight.add_(1.0)
    lavis_free.attach_exits(other, EXITS)
    with pytest.raises(ExitCheckpointError, match="exits trained on another backbone"):
        other.load_checkpoint(str(path))


def test_a_model_without_a_binding_names_the_supported_classes_and_the_doc():
    with pytest.raises(NotImplementedError) as err:
        lavis_free.attach_exits(torch.nn.Linear(2, 2), EXITS)
    message = str(err.value)
    assert "Linear" in message and "Blip2OPT" in message and "Blip2T5" in message
    assert "Adding a host model or an LM family" in message
    assert {"Blip2OPT", "Blip2T5", "Blip2T5Instruct"} <= set(supported_hosts())


def test_the_yaml_path_attaches_model_exits_to_lavis_s_own_arch(monkeypatch, tmp_path, images):
    """`model.arch: blip2_opt` + `model.exits` + `model.exits_checkpoint` in a project YAML: the
    plugin's task builds LAVIS's class (here from parts: its from_config downloads) and attaches
    the section's exits, loading the checkpoint onto them; a LAVIS YAML without the section gets
    LAVIS's model untouched."""
    trained = tiny("opt", exits=EXITS)
    with torch.no_grad():
        for p in trained.early_exits.parameters():
            p.add_(0.01)
    path = tmp_path / "exits.pth"
    torch.save(exits_of(trained).inference_checkpoint(), path)
    parts = tiny("opt")
    monkeypatch.setattr(Blip2OPT, "from_config", classmethod(lambda cls, cfg: as_lavis_model(parts)))
    task = FreeCaptionTask(num_beams=1, max_len=6, min_len=1, evaluate=False)
    model_cfg = OmegaConf.create({"arch": "blip2_opt", "model_type": "pretrain_opt2.7b", "exits": EXITS,
                                  "exits_checkpoint": str(path)})
    model = task.build_model(type("Cfg", (), {"model_cfg": model_cfg})())
    assert type(model) is Blip2OPT and exits_of(model) is not None
    for key, value in trained.early_exits.exits.state_dict().items():
        assert torch.equal(model.early_exits.exits.state_dict()[key], value)
    bare = task.build_model(type("Cfg", (), {"model_cfg": OmegaConf.create({"arch": "blip2_opt", "model_type": "pretrain_opt2.7b"})})())
    assert exits_of(bare) is None


def test_model_exits_is_a_known_key_of_lavis_s_archs_in_project_yamls():
    from lavis_free.common.config import check_known_keys, known_model_keys

    assert {"exits", "exits_checkpoint"} <= known_model_keys("blip2_opt") & known_model_keys("blip2_t5")
    check_known_keys(OmegaConf.create({"model": {"arch": "blip2_t5", "model_type": "pretrain_flant5xl", "exits": EXITS}}))
    with pytest.raises(ValueError, match="exits_checkpint"):
        check_known_keys(OmegaConf.create({"model": {"arch": "blip2_t5", "exits_checkpint": "x"}}))


@pytest.mark.parametrize("family, dropout", [("opt", {"opt_config": {"dropout": 0.5}}), ("t5", {"t5_config": {"dropout_rate": 0.5}})])
def test_the_frozen_backbone_runs_without_dropout_while_exits_train_with_the_lm_s(family, dropout, images):
    """One dropout policy for every family: the backbone's outputs (what exits learn from, and
    what the feature cache stores) are deterministic even with the model in training mode; the
    exit layers, layers of the LM's own type, drop as the LM's layers do while they train."""
    model = tiny(family, exits=EXITS, **dropout).train()
    host = exits_of(model)
    samples = {"image": images, "text_input": ["a red circle", "two blue squares", "a star"]}
    first, second = host.backbone_outputs(samples), host.backbone_outputs(samples)
    assert torch.equal(first.final_features, second.final_features)
    assert model.training and all(m.training for m in model.early_exits.modules())
    train_a = model.early_exits.exit_outputs(host.adapter, first).features[0]
    train_b = model.early_exits.exit_outputs(host.adapter, first).features[0]
    assert not torch.equal(train_a, train_b), "exit layers in training mode drop out"
    model.eval()
    assert torch.equal(model.early_exits.exit_outputs(host.adapter, first).features[0],
                       model.early_exits.exit_outputs(host.adapter, first).features[0])


def test_a_plugin_model_built_without_exits_takes_them_later_and_a_second_set_is_refused(images):
    model = tiny("opt")
    assert exits_of(model).early_exits is None
    lavis_free.attach_exits(model, EXITS)
    assert exits_of(model).early_exits is not None and exits_of(model).config.layers == (2, 5)
    _, stats = model.generate({"image": images}, num_beams=1, max_length=4, exit_threshold=0.0, return_exit_stats=True)
    assert {n for row in stats["exit_layers"] for n in row[1:]} == {3}
    with pytest.raises(ValueError, match=r"already has exits attached \(model.free_exits, layers \[2, 5\]\)"):
        lavis_free.attach_exits(model, EXITS)


def test_beam_search_on_lavis_s_own_class_runs_through_the_exits(images):
    """LAVIS's Blip2OPT with exits attached: beam search with exits (every beam row leaves at the
    first exit at threshold 0) returns its best beams; with exits off, LAVIS's own beam search."""
    model = as_lavis_model(tiny("opt"))
    lavis_free.attach_exits(model, EXITS)
    captions, stats = model.generate({"image": images}, num_beams=3, num_captions=2, max_length=4, exit_threshold=0.0,
                                     return_exit_stats=True)
    assert len(captions) == 2 * len(images) and len(stats["exit_layers"]) == 3 * len(images)
    assert {n for row in stats["exit_layers"] for n in row[1:]} == {3}
    full = model.generate({"image": images}, num_beams=3, num_captions=2, max_length=4, early_exit=False)
    binding = binding_for(model)  # LAVIS's call of its OPT (LAVIS 1.0.2's own beams break on transformers 4.33, #154)
    decoding = {**binding.generate_defaults, "num_beams": 3, "num_captions": 2, "max_length": 4}
    assert full == binding.decode_text(model, binding.lavis_generate(model, images, [model.prompt] * len(images), **decoding))


def test_exits_checkpoint_without_an_exits_section_is_refused_on_lavis_s_arch(monkeypatch, tmp_path):
    parts = tiny("opt")
    monkeypatch.setattr(Blip2OPT, "from_config", classmethod(lambda cls, cfg: as_lavis_model(parts)))
    task = FreeCaptionTask(num_beams=1, max_len=6, min_len=1, evaluate=False)
    cfg = OmegaConf.create({"arch": "blip2_opt", "model_type": "pretrain_opt2.7b", "exits_checkpoint": "exits.pth"})
    with pytest.raises(ValueError, match="model.exits_checkpoint='exits.pth' is set but model.exits is not"):
        task.build_model(type("Cfg", (), {"model_cfg": cfg})())


def test_lavis_s_tokenizer_sides_are_left_as_lavis_set_them(images):
    model = tiny("opt")
    tok = model.opt_tokenizer
    tok.padding_side, tok.truncation_side = "right", "right"
    model.generate({"image": images, "prompt": ["a", "a photo of", "two"]}, num_beams=1, max_length=3)
    exits_of(model).binding.training_batch(model, {"image": images, "text_input": ["q", "q", "q"], "text_output": ["a", "b", "c"]})
    assert (tok.padding_side, tok.truncation_side) == ("right", "right")


def test_a_prompt_with_surrounding_spaces_leaves_the_whole_answer_scored(images):
    model = tiny("opt")
    samples = {"image": images, "text_input": ["Question: what colour? Answer: ", " what?", "x"], "text_output": ["red", "blue", "two"]}
    batch = exits_of(model).binding.training_batch(model, samples)
    scored = [model.opt_tokenizer.decode(row[row != -100]).strip() for row in batch.labels]
    assert scored == ["red", "blue", "two"]
