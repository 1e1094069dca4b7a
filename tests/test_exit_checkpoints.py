"""Trained exits on a backbone: `model.exits_checkpoint`, `load_model(..., checkpoint=)`, the
shipped shapes_tiny exits, and clear errors for checkpoints of another exit layout."""
from pathlib import Path

import pytest
import torch
from lavis.processors import load_processor
from omegaconf import OmegaConf

import lavis_free
from lavis_free.datasets.shapes import generate_item
from lavis_free.datasets.shapes_scene import render_scene
from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.models.early_exit_model import ExitCheckpointError
from lavis_free.reports.exit_quality import HEAD_ON_LAYER, layer_quality

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
    torch.save(trained.inference_state_dict(), path)
    return path


def test_inference_checkpoint_holds_exits_without_discriminators(trained):
    state = trained.inference_state_dict()
    assert any(k.startswith("early_exits.exits.") for k in state)
    assert not any("discriminators" in k for k in state)
    assert not any(k.startswith(("opt_model.", "visual_encoder.", "Qformer.")) for k in state)
    assert state["exit_layers"].tolist() == LAYERS


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
        ({"exits": {"layers": [1, 5, 8]}}, r"exits after layers \[2, 5, 8\].*model.exits.layers=\[1, 5, 8\]"),
        ({"exits": {"layers": LAYERS, "layout": "vanilla"}}, r"does not match exit layout 'vanilla'"),
        ({"opt_config": {"hidden_size": 64}}, r"has shape .*64.* \(a checkpoint of another architecture\)"),
    ],
    ids=["other-layers", "other-layout", "other-hidden-size"],
)
def test_mismatched_checkpoints_name_the_mismatch(inference_file, model, match):
    with pytest.raises(ExitCheckpointError, match=match):
        build(exits_checkpoint=str(inference_file), **model)


# ---- the exits shipped with shapes_tiny ---------------------------------------------------------

PACKAGE = Path(lavis_free.__file__).resolve().parent
PROJECT = Path(__file__).resolve().parents[1] / "projects" / "free" / "shapes_caption.yaml"


@pytest.fixture(scope="module")
def shapes_tiny():
    return lavis_free.load_model("blip2_opt_free", "shapes_tiny")


def test_shapes_tiny_loads_the_shipped_exits_of_the_project_layout(shapes_tiny):
    cfg = OmegaConf.load(Blip2OPTFree.default_config_path("shapes_tiny")).model
    shipped = torch.load(PACKAGE / cfg.exits_checkpoint, weights_only=True)
    assert shipped.keys() == shapes_tiny.inference_state_dict().keys()
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
