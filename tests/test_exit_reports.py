"""The exit quality report on the tiny model and the shared shapes data: JSON, plots, sanity of the numbers."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.reports.exit_quality import HEAD_ON_LAYER, format_table, main, write_report
from lavis_free.hosts import exits_of

PROJECT = Path(__file__).resolve().parents[1] / "projects" / "free" / "shapes_caption.yaml"
LAYERS = [2, 5, 8]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Untrained exits of each layout (vanilla's start as copies of the frozen norm and head)."""
    out = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for layout in ("free", "vanilla", "no_adversarial"):
        cfg = OmegaConf.merge(OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model,
                              {"exits": {"layers": LAYERS, "layout": layout}})
        torch.manual_seed(0)
        paths[layout] = str(out / f"{layout}.pth")
        torch.save(exits_of(Blip2OPTFree.from_config(cfg)).inference_checkpoint(), paths[layout])
    return paths


@pytest.fixture(scope="module")
def report(checkpoints, shapes_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    options = ["model.model_type=tiny", "model.exits_checkpoint=", f"model.exits.layers={LAYERS}",
               f"datasets.shapes_caption.build_info.storage={shapes_data_dir}"]
    write_report(str(PROJECT), checkpoints, "val", str(out), options, batch_size=8, limit=12)
    return out


def test_writes_json_and_plots(report):
    data = json.loads((report / "exit_quality.json").read_text())
    assert (report / "exit_quality.png").stat().st_size > 0 and (report / "exit_parameters.png").stat().st_size > 0
    quality = data["quality"]
    assert quality["num_sequences"] == 12 and quality["num_tokens"] > 12
    assert [r["layers_run"] for r in quality[HEAD_ON_LAYER]] == list(range(1, 13))
    for name in ("free", "vanilla", "no_adversarial"):
        assert [r["exit_layer"] for r in quality[name]] == LAYERS
    assert len(format_table(data).splitlines()) == 13


def test_numbers_are_consistent(report):
    data = json.loads((report / "exit_quality.json").read_text())
    quality = data["quality"]
    assert quality[HEAD_ON_LAYER][-1]["agreement"] == 1.0
    # untrained vanilla exits are copies of the frozen norm + head: they read exactly what (a) reads
    head = {r["layers_run"]: r for r in quality[HEAD_ON_LAYER]}
    for row in quality["vanilla"]:
        assert row["accuracy"] == head[row["layers_run"]]["accuracy"]
        assert row["agreement"] == head[row["layers_run"]]["agreement"]
    # free and no_adversarial exits start as the same copies of the last layer
    assert quality["free"] == quality["no_adversarial"]


def test_parameter_counts_free_vs_vanilla(report):
    params = json.loads((report / "exit_quality.json").read_text())["parameters"]
    hidden, vocab = 128, 512
    assert params["free"]["per_exit"] == [params["lm_decoder_layer"]] * 3
    assert params["vanilla"]["per_exit"] == [vocab * hidden + 2 * hidden] * 3  # projection + norm
    assert params["free"]["total"] == 3 * params["lm_decoder_layer"]
    assert params["free"]["discriminators_training_only"] > 0
    assert params["no_adversarial"]["discriminators_training_only"] == 0


def test_command_needs_a_checkpoint_and_names_missing_files(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        main(["--cfg-path", str(PROJECT), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="--free nope.pth"):
        main(["--cfg-path", str(PROJECT), "--out", str(tmp_path), "--free", "nope.pth", "--options", "model.model_type=tiny"])
