"""Trained exits on a backbone: `model.exits_checkpoint`, `load_model(..., checkpoint=)`, runner
checkpoints, the shipped shapes_tiny exits, and clear errors for checkpoints of another exit
layout or backbone."""
import re
import shutil
from pathlib import Path

import pytest
import torch
from lavis.processors import load_processor
from omegaconf import OmegaConf

import lavis_free
from lavis_free.common.launch import build_runner, parse_args
from lavis_free.datasets.shapes import generate_item
from lavis_free.datasets.shapes_scene import render_scene
from lavis_free.exits.feature_cache import backbone_fingerprint
from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.hosts import ExitCheckpointError
from lavis_free.reports.exit_quality import HEAD_ON_LAYER, layer_quality
from lavis_free.hosts import exits_of

LAYERS = [2, 5, 8]
AGREEMENT_FLOOR = 0.85  # shipped exits: 0.91-0.94 on these 8 scenes; untrained copies: 0.62-0.84


def tiny_cfg(**model):
    cfg = OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model
    return OmegaConf.merge(cfg, {"exits": {"layers": LAYERS}}, model)


def build(**model):
    torch.manual_seed(0)
    return Blip2OPTFree.from_config(tiny_cfg(**model)).eval()


def perturbed(**model):
    """A model whose exits differ from a fresh build (as after training)."""
    result = build(**model)
    with torch.no_grad():
        for param in result.early_exits.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return result


def exit_state(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("early_exits.exits.")}


def assert_same_exits(a, b):
    left, right = exit_state(a), exit_state(b)
    assert left.keys() == right.keys() and left
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def trained():
    return perturbed()


@pytest.fixture(scope="module")
def inference_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("exits") / "exits.pth"
    torch.save(exits_of(trained).inference_checkpoint(), path)
    return path


@pytest.fixture(scope="module")
def legacy_file(trained, tmp_path_factory):
    """An exits file as exported before checkpoints recorded `exit_metadata()` (the shipped ones)."""
    path = tmp_path_factory.mktemp("exits") / "legacy.pth"
    torch.save(exits_of(trained).inference_state_dict(), path)
    return path


def test_inference_checkpoint_holds_exits_without_discriminators(trained):
    checkpoint = exits_of(trained).inference_checkpoint()
    state = checkpoint["model"]
    assert any(k.startswith("early_exits.exits.") for k in state)
    assert not any("discriminators" in k for k in state)
    assert not any(k.startswith(("opt_model.", "visual_encoder.", "Qformer.")) for k in state)
    assert state["exit_layers"].tolist() == LAYERS
    assert checkpoint["exits"] == {"layers": LAYERS, "layout": "free", "lm_layers": 12, "backbone": backbone_fingerprint(trained)}


def test_exits_checkpoint_key_loads_exits_onto_the_backbone(trained, inference_file):
    loaded = build(exits_checkpoint=str(inference_file))
    assert_same_exits(loaded, trained)
    fresh = build()
    assert torch.equal(loaded.opt_model.lm_head.weight, fresh.opt_model.lm_head.weight)
    images = torch.randn(2, 3, 64, 64)
    captions, stats = loaded.generate({"image": images}, num_beams=1, max_length=5, exit_threshold=0.0, return_exit_stats=True)
    # the first token comes from the full-depth prefill; with threshold 0 every later one leaves at exit 0
    assert len(captions) == 2 and all(n == LAYERS[0] + 1 for row in stats["exit_layers"] for n in row[1:])


def test_load_checkpoint_accepts_a_runner_checkpoint_with_discriminators(trained, tmp_path):
    path = tmp_path / "checkpoint_0.pth"
    torch.save({"model": {k: v for k, v in trained.state_dict().items() if k.startswith("early_exits.")}, "epoch": 0}, path)
    model = build()
    model.load_checkpoint(str(path))
    assert_same_exits(model, trained)
    for a, b in zip(model.early_exits.discriminators.parameters(), trained.early_exits.discriminators.parameters()):
        assert torch.equal(a, b)


def test_load_model_checkpoint_argument_checks_the_exits(inference_file):
    with pytest.raises(ExitCheckpointError, match="holds exits but this model has none"):
        lavis_free.load_model("blip2_opt_free", "tiny", checkpoint=str(inference_file))


@pytest.mark.parametrize(
    "model, match",
    [
        ({"exits": {"layers": [1, 4, 7]}}, r"exits after layers \[2, 5, 8\], this model has model.exits.layers=\[1, 4, 7\]"),
        ({"exits": {"layers": LAYERS, "layout": "vanilla"}}, r"exits of layout 'free', this model has model.exits.layout='vanilla'"),
        ({"opt_config": {"num_hidden_layers": 10}}, r"an LM depth \(decoder layers\) of 12, this model has LM decoder layers=10"),
        ({"opt_config": {"hidden_size": 64}}, r"has shape .*64.* \(a checkpoint of another architecture\)"),
    ],
    ids=["other-layers", "other-layout", "other-lm-depth", "other-hidden-size"],
)
def test_mismatched_checkpoints_name_the_file_and_the_mismatch(inference_file, model, match):
    with pytest.raises(ExitCheckpointError, match=rf"{re.escape(str(inference_file))} \(model.exits_checkpoint\).* {match}"):
        build(exits_checkpoint=str(inference_file), **model)


def test_exits_of_another_backbone_are_refused(inference_file):
    torch.manual_seed(1)
    other = Blip2OPTFree.from_config(tiny_cfg())
    with pytest.raises(ExitCheckpointError, match=r"exits trained on another backbone \(fingerprint \w{12}, this model's \w{12}\)"):
        other.load_checkpoint(str(inference_file))


def test_files_that_predate_the_metadata_load_when_their_exit_layers_match(trained, legacy_file):
    assert_same_exits(build(exits_checkpoint=str(legacy_file)), trained)
    with pytest.raises(ExitCheckpointError, match=r"exits after layers \[2, 5, 8\], this model has model.exits.layers=\[1, 4, 7\]"):
        build(exits_checkpoint=str(legacy_file), exits={"layers": [1, 4, 7]})


def test_the_fingerprint_ignores_float16_rounding():
    """LAVIS runs OPT and the ViT in fp16 on GPU: exits trained there must load onto the same
    weights in fp32 on CPU, and not onto other weights."""
    fp16 = build()
    fp16.opt_model.half()
    fp16.visual_encoder.half()
    torch.manual_seed(1)
    other = Blip2OPTFree.from_config(tiny_cfg())
    assert backbone_fingerprint(fp16) == backbone_fingerprint(build()) != backbone_fingerprint(other)


# ---- runner checkpoints: recorded at save, checked on resume and on the best-model reload --------

def runner(data_dir, job_id, layers):
    options = [
        "model.model_type=tiny", "model.load_finetuned=False", "model.exits_checkpoint=", f"model.exits.layers={layers}",
        f"datasets.shapes_caption.build_info.storage={data_dir}", "run.max_epoch=1", "run.batch_size_train=8",
        "run.valid_splits=[]", "run.test_splits=[]",
    ]
    return build_runner(parse_args("test", ["--cfg-path", str(PROJECT), "--job-id", job_id, "--options", *options]))


def test_runner_checkpoints_record_the_exits_and_refuse_another_layout(shapes_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = runner(shapes_data_dir, "saved", "[2,5,8]")
    saved._save_checkpoint(0)
    path = Path(saved.output_dir) / "checkpoint_0.pth"
    exits = torch.load(path, weights_only=True)["exits"]
    assert exits == exits_of(saved.model).exit_metadata() and exits["layers"] == LAYERS

    other = runner(shapes_data_dir, "other", "[1,4,7]")
    match = r"exits after layers \[2, 5, 8\], this model has model.exits.layers=\[1, 4, 7\]"
    with pytest.raises(ExitCheckpointError, match=rf"{re.escape(str(path))} \(run.resume_ckpt_path\) has {match}"):
        other._load_checkpoint(str(path))
    shutil.copy(path, Path(other.output_dir) / "checkpoint_best.pth")
    with pytest.raises(ExitCheckpointError, match=rf"\(best checkpoint of this run\) has {match}"):
        other._reload_best_model(other.unwrap_dist_model(other.model))
    with pytest.raises(ExitCheckpointError, match=rf"\(load_model\(checkpoint=\)\) has {match}"):
        other.unwrap_dist_model(other.model).load_checkpoint(str(path))


# ---- the exits shipped with shapes_tiny ---------------------------------------------------------

PACKAGE = Path(lavis_free.__file__).resolve().parent
PROJECT = Path(__file__).resolve().parents[1] / "projects" / "free" / "shapes_caption.yaml"


@pytest.fixture(scope="module")
def shapes_tiny():
    return lavis_free.load_model("blip2_opt_free", "shapes_tiny")


def test_shapes_tiny_loads_the_shipped_exits_of_the_project_layout(shapes_tiny):
    cfg = OmegaConf.load(Blip2OPTFree.default_config_path("shapes_tiny")).model
    checkpoint = torch.load(PACKAGE / cfg.exits_checkpoint, weights_only=True)
    assert checkpoint["exits"] == exits_of(shapes_tiny).exit_metadata()
    shipped = checkpoint["model"]
    assert shipped.keys() == exits_of(shapes_tiny).inference_state_dict().keys()
    state = shapes_tiny.state_dict()
    for key, value in shipped.items():
        assert torch.equal(state[key], value), key
    project = OmegaConf.load(PROJECT).model.exits
    for key in ("layers", "init", "layout", "disc_hidden"):
        assert project[key] == cfg.exits[key], f"exits.{key} differs between shapes_caption.yaml and the model YAML"


def test_shipped_exits_are_trained(shapes_tiny):
    """On held-out test scenes, teacher-forced on their captions, every trained exit agrees with
    the final layer far more often than the frozen head read at the same layer."""
    processor = load_processor("blip_image_eval", OmegaConf.create({"image_size": 64}))
    items = [generate_item(0, "test", i) for i in range(8)]
    samples = {
        "image": torch.stack([processor(render_scene(item.scene)) for item in items]),
        "text_input": [item.text.captions[0] for item in items],
    }
    quality = layer_quality({"free": shapes_tiny}, iter([samples]))
    head = {row["layers_run"]: row for row in quality[HEAD_ON_LAYER]}
    for row in quality["free"]:
        assert row["agreement"] >= AGREEMENT_FLOOR, row
        assert row["agreement"] > head[row["layers_run"]]["agreement"], (row, head[row["layers_run"]])
