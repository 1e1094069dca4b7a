"""Trained exits on a backbone: `model.exits_checkpoint`, `load_model(..., checkpoint=)`, the
shipped shapes_tiny exits, and clear errors for checkpoints of another exit layout."""
import pytest
import torch
from omegaconf import OmegaConf

import lavis_free
from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.models.early_exit_model import ExitCheckpointError

LAYERS = [2, 5, 8]


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
