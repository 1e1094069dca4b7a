"""Builders shapes_caption / shapes_vqa / shapes_dialogue: datasets, batches, shards, error paths."""
import json
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf

import lavis_free  # noqa: F401  (registers the builders)
from lavis.common.registry import registry
from lavis_free.datasets.annotations import AnnotationError
from lavis_free.datasets.shapes import generate_dataset

SIZES = {"train": 6, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(str(out), seed=0, sizes=SIZES, shards=2, progress=False)
    return str(out)


def _config(name, root, **build_info):
    builder_cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(builder_cls.default_config_path()).datasets[name]
    cfg.build_info.storage = root
    for key, value in build_info.items():
        cfg.build_info[key] = value
    return builder_cls, cfg


def _build(name, root, **build_info):
    builder_cls, cfg = _config(name, root, **build_info)
    return builder_cls(cfg).build_datasets()


def test_builders_are_registered():
    for name in ("shapes_caption", "shapes_vqa", "shapes_dialogue"):
        assert registry.get_builder_class(name) is not None


def test_caption_datasets(data_dir):
    ds = _build("shapes_caption", data_dir)
    assert sorted(ds) == ["test", "train", "val"]
    assert len(ds["train"]) == 5 * SIZES["train"] and len(ds["val"]) == SIZES["val"]
    sample = ds["train"][0]
    assert set(sample) == {"image", "text_input", "image_id"}
    assert sample["image"].shape == (3, 64, 64) and isinstance(sample["text_input"], str)
    batch = ds["val"].collater([ds["val"][0], ds["val"][1]])
    assert batch["image"].shape == (2, 3, 64, 64)
    assert batch["image_id"].tolist() == [800001, 800002]
    assert ds["test"].gt_path == os.path.join(data_dir, "annotations", "caption_test_gt.json")


def test_images_are_not_randomly_cropped(data_dir):
    ds = _build("shapes_caption", data_dir)
    assert torch.equal(ds["train"][0]["image"], ds["train"][0]["image"])


def test_vqa_datasets(data_dir):
    ds = _build("shapes_vqa", data_dir)
    sample = ds["train"][0]
    assert set(sample) == {"image", "text_input", "answers", "weights", "question_id"}
    assert sample["text_input"].endswith("?") and abs(sum(sample["weights"]) - 1.0) < 1e-6
    batch = ds["train"].collater([ds["train"][0], ds["train"][1]])
    assert batch["n_answers"].sum().item() == len(batch["answer"]) == batch["weight"].numel()
    assert batch["question_id"].tolist() == [sample["question_id"], ds["train"][1]["question_id"]]
    eval_batch = ds["val"].collater([ds["val"][0], ds["val"][1]])
    assert set(eval_batch) == {"image", "text_input", "question_id", "instance_id"}
    assert ds["val"].ann_path.endswith("vqa_val.json")


def test_dialogue_datasets_carry_history(data_dir):
    ds = _build("shapes_dialogue", data_dir)
    assert len(ds["train"]) == 3 * SIZES["train"]
    with open(os.path.join(data_dir, "annotations", "dialogue_train.json")) as f:
        first = json.load(f)[0]["dialog"]
    second_round = ds["train"][1]
    assert set(second_round) == {"image", "text_input", "text_output", "image_id"}
    assert second_round["text_input"].startswith(first[0]["question"])
    assert first[0]["answer"] in second_round["text_input"] and second_round["text_output"] == first[1]["answer"]
    assert set(ds["val"][2]) == {"image", "text_input", "question_id", "instance_id"}
    assert ds["val"][2]["question_id"] == 800001 * 10 + 2


def test_train_split_from_shards(data_dir):
    ds = _build("shapes_caption", data_dir, shards="shards")
    sample = next(iter(ds["train"]))
    assert set(sample) == {"image", "text_input", "image_id"} and sample["image"].shape == (3, 64, 64)
    dialogue = next(iter(_build("shapes_dialogue", data_dir, shards="shards/train-{000000..000001}.tar")["train"]))
    assert set(dialogue) == {"image", "text_input", "text_output", "image_id"}
    assert len(ds["val"]) == SIZES["val"]


def test_shard_errors(data_dir):
    with pytest.raises(ValueError, match="VQA"):
        _build("shapes_vqa", data_dir, shards="shards")
    with pytest.raises(FileNotFoundError, match="--shards"):
        _build("shapes_caption", data_dir, shards="no_such_dir/*.tar")


def test_builders_never_download(data_dir, monkeypatch):
    import lavis.datasets.builders.base_dataset_builder as base

    def no_network(*args, **kwargs):
        raise AssertionError("the builder tried to download")

    monkeypatch.setattr(base, "download_url", no_network)
    assert "val" in _build("shapes_vqa", data_dir)


def test_missing_data_dir_says_how_to_generate(tmp_path):
    missing = str(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError) as err:
        _build("shapes_caption", missing)
    message = str(err.value)
    assert missing in message and f"python -m lavis_free.datasets.shapes --out {missing} --seed 0" in message


@pytest.fixture
def data_copy(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(data_dir, "annotations"), copy / "annotations")
    return copy


def test_missing_annotation_file(data_copy):
    path = data_copy / "annotations" / "vqa_val.json"
    path.unlink()
    with pytest.raises(FileNotFoundError) as err:
        _build("shapes_vqa", str(data_copy))
    assert str(path) in str(err.value) and "python -m lavis_free.datasets.shapes" in str(err.value)


def test_corrupt_annotation_file(data_copy):
    path = data_copy / "annotations" / "caption_val.json"
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match="caption_val.json is not valid JSON"):
        _build("shapes_caption", str(data_copy))


def test_wrong_schema_names_file_row_and_key(data_copy):
    path = data_copy / "annotations" / "vqa_train.json"
    rows = json.loads(path.read_text())
    del rows[1]["question"]
    path.write_text(json.dumps(rows))
    with pytest.raises(AnnotationError, match=r"vqa_train.json: row 1 has no key 'question'"):
        _build("shapes_vqa", str(data_copy))
    path.write_text(json.dumps({"rows": rows}))
    with pytest.raises(AnnotationError, match="expected a JSON list"):
        _build("shapes_vqa", str(data_copy))
