"""No code runs from files: webdataset shards with pickle/torch members, and pickle payloads or
broken files given through every route the plugin loads checkpoints from (YAML keys, arguments,
the runner, export, the feature cache). Errors name the file and where it came from."""
import contextlib
import io
import itertools
import json
import logging
import pickle
import re
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import lavis_free
from lavis_free.common.launch import build_runner, parse_args
from lavis_free.common.safe_load import CheckpointLoadError, forced_weights_only, load_torch_file
from lavis_free.datasets.shards import shard_train_pipeline
from lavis_free.exits.feature_cache import FeatureCache
from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.hosts import ExitCheckpointError
from lavis_free.models import tiny
from lavis_free.models.export import export_weights
from lavis_free.hosts import exits_of

from helpers import tiny_model

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "projects" / "free" / "shapes_caption.yaml"
BACKBONE = REPO / "lavis_free" / "models" / "assets" / "shapes_tiny" / "blip2_opt_free_shapes_tiny.pth"


class Payload:
    """Unpickling this creates `marker`: the stand-in for attacker code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """The marker file a payload would create; torch's unsafe default forced on for every load
    that does not pass weights_only itself."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return tmp_path / "code_ran"


def payload_files(directory, marker):
    """The two pickle formats torch.load reads: a torch.save zip and a bare (legacy) pickle."""
    zipped, legacy = directory / "payload_zip.pth", directory / "payload_legacy.pth"
    torch.save({"model": Payload(marker)}, zipped)
    legacy.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=2))
    return [zipped, legacy]


def test_the_payloads_are_live(tmp_path, marker):
    """Control: without weights_only the payloads do run (so the tests below mean something)."""
    for path in payload_files(tmp_path, marker):
        with contextlib.suppress(RuntimeError):  # the legacy reader runs it, then misses its magic number
            torch.load(path, weights_only=False)
        assert marker.exists(), path
        marker.unlink()


def test_library_loaders_the_plugin_routes_are_weights_only(tmp_path, marker):
    """transformers 4.26's from_pretrained (and LAVIS's ViT loaders) call a bare torch.load; the
    plugin's component hooks run them under forced_weights_only."""
    local_opt = tmp_path / "opt"
    tokenizer = tiny.load_opt_tokenizer()
    tiny.build_opt(OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model.opt_config, tokenizer).save_pretrained(local_opt)
    tokenizer.save_pretrained(local_opt)
    torch.save({"model.decoder.embed_tokens.weight": Payload(marker)}, local_opt / "pytorch_model.bin")
    with pytest.raises(OSError, match="Unable to load weights"):
        Blip2OPTFree.init_opt(str(local_opt))
    assert not marker.exists()
    original = torch.load
    with forced_weights_only(), pytest.raises(pickle.UnpicklingError):
        torch.load(payload_files(tmp_path, marker)[0], weights_only=False)
    assert not marker.exists() and torch.load is original


# ---- webdataset shards -------------------------------------------------------------------------

def _shard(path, marker):
    image = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(image, format="PNG")
    record = {"image_id": 1, "image": "images/train/000001.png", "captions": ["a red square"]}
    evil = pickle.dumps(Payload(marker))
    torch_evil = io.BytesIO()
    torch.save(Payload(marker), torch_evil)
    members = {"png": image.getvalue(), "json": json.dumps(record).encode(), "pyd": evil, "pkl": evil,
               "pickle": evil, "pth": torch_evil.getvalue()}
    with tarfile.open(path, "w") as tar:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"000001.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shard_members_other_than_image_and_json_are_never_decoded(tmp_path, marker):
    shard = tmp_path / "train-000000.tar"
    _shard(shard, marker)
    stream = shard_train_pipeline("caption", [str(shard)], lambda image: image.size, str.upper, shuffle_buffer=1)
    samples = list(itertools.islice(iter(stream), 3))
    assert not marker.exists()
    assert [s["image"] for s in samples] == [(8, 8)] * 3
    assert [s["text_input"] for s in samples] == ["A RED SQUARE"] * 3


# ---- checkpoint routes ---------------------------------------------------------------------------

EXITS = {"exits": {"layers": [2, 5, 8]}}
MODEL_ROUTES = {
    "model.finetuned": lambda path: tiny_model(load_finetuned=True, finetuned=str(path)),
    "model.pretrained": lambda path: tiny_model(load_finetuned=False, pretrained=str(path)),
    "model.exits_checkpoint": lambda path: tiny_model(exits_checkpoint=str(path), **EXITS),
    "load_model(checkpoint=)": lambda path: lavis_free.load_model("blip2_opt_free", "tiny", checkpoint=str(path)),
    "--checkpoint": lambda path: export_weights(str(path), str(path.with_name("out.pth"))),
}


def _refused(load, path, origin, marker):
    with pytest.raises(CheckpointLoadError) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and f"({origin})" in message, message
    assert "weights_only" not in message and "safe_globals" not in message, message  # no unsafe re-run offered
    assert not marker.exists()
    return message


@pytest.mark.parametrize("origin", list(MODEL_ROUTES))
def test_payloads_are_refused_through_every_model_route(tmp_path, marker, origin):
    for path in payload_files(tmp_path, marker):
        assert "was refused: loading it would call io.open" in _refused(MODEL_ROUTES[origin], path, origin, marker)


def test_pretrained_override_is_safe_when_called_directly(tmp_path, marker):
    model = tiny_model()
    for path in payload_files(tmp_path, marker):
        _refused(model.load_from_pretrained, path, "model.pretrained", marker)


def broken_files(directory):
    torch.save({"model": {"x": torch.ones(64)}}, directory / "whole.pth")
    whole = (directory / "whole.pth").read_bytes()
    files = {
        "empty": (b"", "is empty"),
        "truncated": (whole[: len(whole) // 2], "truncated or not a torch checkpoint"),
        "random bytes": (bytes(range(256)) * 8, "not a torch checkpoint"),
        "text": (b"model: weights\n", "not a torch checkpoint"),
    }
    for name, (data, _) in files.items():
        (directory / f"{name}.pth").write_bytes(data)
    torch.save([torch.ones(2)], directory / "list.pth")
    return {directory / f"{name}.pth": match for name, (_, match) in files.items()} | {
        directory / "list.pth": "holds a list, not a dict"
    }


@pytest.mark.parametrize("origin", ["model.finetuned", "model.exits_checkpoint", "load_model(checkpoint=)"])
def test_broken_files_name_the_file_and_the_key(tmp_path, marker, origin):
    for path, match in broken_files(tmp_path).items():
        assert match in _refused(MODEL_ROUTES[origin], path, origin, marker)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere.pth \(model.exits_checkpoint\): no such file"):
        load_torch_file(str(tmp_path / "nothere.pth"), "model.exits_checkpoint")


@pytest.mark.parametrize(
    "state", [{}, {"fc.weight": torch.ones(2)}, {"model": {"fc.weight": "not a tensor"}}],
    ids=["empty-dict", "foreign-state-dict", "not-tensors"],
)
@pytest.mark.parametrize(
    "origin, match",
    [("model.finetuned", "holds none of this model's tensors"), ("load_model(checkpoint=)", "holds none of this model's tensors"),
     ("model.exits_checkpoint", "holds no exit tensors")],
)
def test_files_without_tensors_of_the_model_are_refused(tmp_path, origin, match, state):
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    if "model" in state:
        match = "is not a state dict"
    with pytest.raises(ExitCheckpointError, match=rf"{re.escape(str(path))} \({re.escape(origin)}\) {match}"):
        MODEL_ROUTES[origin](path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("origin", ["model.finetuned", "model.exits_checkpoint"])
def test_non_finite_tensors_are_refused(tmp_path, origin, bad):
    """A diverged run's weights would decode garbage (or nothing) without a word."""
    source = tiny_model(**EXITS)
    state = exits_of(source).inference_state_dict() if origin == "model.exits_checkpoint" else source.state_dict()
    key = sorted(k for k, v in state.items() if v.is_floating_point())[-1]
    state = {**state, key: torch.full_like(state[key], bad)}
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(ExitCheckpointError, match=rf"\({re.escape(origin)}\): {re.escape(key)} holds NaN or infinite"):
        MODEL_ROUTES[origin](path)


@pytest.mark.parametrize(
    "origin, load",
    [("model.exits_checkpoint", MODEL_ROUTES["model.exits_checkpoint"]),
     ("load_model(checkpoint=)", lambda path: tiny_model(**EXITS).load_checkpoint(str(path)))],
    ids=["exits_checkpoint", "checkpoint-argument"],
)
def test_a_backbone_file_is_not_taken_for_exits(origin, load):
    """The shapes_tiny backbone fits the tiny architecture but holds no exits: refused, not a
    model that decodes with untrained exits at its calibrated threshold."""
    with pytest.raises(ExitCheckpointError, match=rf"{re.escape(str(BACKBONE))} \({re.escape(origin)}\) holds no exit tensors"):
        load(BACKBONE)


# ---- runner routes -------------------------------------------------------------------------------

def runner(data_dir, job_id):
    options = [
        "model.model_type=tiny", "model.load_finetuned=False", "model.exits_checkpoint=", "model.exits.layers=[2,5,8]",
        f"datasets.shapes_caption.build_info.storage={data_dir}", "run.max_epoch=1", "run.batch_size_train=8",
        "run.valid_splits=[]", "run.test_splits=[]",
    ]
    return build_runner(parse_args("test", ["--cfg-path", str(PROJECT), "--job-id", job_id, "--options", *options]))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runner_loads_refuse_payloads_and_broken_files(shapes_data_dir, in_tmp, marker):
    run = runner(shapes_data_dir, "payloads")
    best = Path(run.output_dir) / "checkpoint_best.pth"
    for path in [*payload_files(in_tmp, marker), *broken_files(in_tmp)]:
        _refused(run._load_checkpoint, path, "run.resume_ckpt_path", marker)
        best.write_bytes(path.read_bytes())
        _refused(lambda _: run._reload_best_model(run.unwrap_dist_model(run.model)), best, "best checkpoint of this run", marker)


# ---- feature cache -------------------------------------------------------------------------------

def test_corrupted_feature_cache_entries_are_misses(tmp_path, marker, caplog):
    cache = FeatureCache(str(tmp_path / "cache"), "float32", {"backbone": "x"})
    entry = cache._path("sample")
    entry.parent.mkdir(parents=True)
    for path in [*payload_files(tmp_path, marker), *broken_files(tmp_path)]:
        entry.write_bytes(path.read_bytes())
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert cache.load(["sample"], torch.device("cpu"), torch.float32) is None
        assert not marker.exists()
        assert [str(entry) in r.getMessage() for r in caplog.records] == [True]
    torch.save({"labels": torch.ones(2)}, entry)
    assert cache.load(["sample"], torch.device("cpu"), torch.float32) is None
    assert cache.misses == 8 and cache.hits == 0
