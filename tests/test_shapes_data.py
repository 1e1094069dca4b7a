"""The shapes generator: determinism, on-disk format (docs/DESIGN.md "Data formats"), content sanity."""
import filecmp
import json
import os
import tarfile

import pytest
from PIL import Image

from lavis_free.datasets.shapes import corpus_texts, generate_dataset, generate_item, main
from lavis_free.datasets.shapes_scene import COLOURS, SHAPES

SIZES = {"train": 12, "val": 4, "test": 4}


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _load(root, name):
    with open(os.path.join(root, "annotations", name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(str(out), seed=0, sizes=SIZES, shards=2, progress=False)
    return str(out)


def test_same_seed_gives_identical_files(data_dir, tmp_path):
    main(["--out", str(tmp_path), "--seed", "0", "--train", "12", "--val", "4", "--test", "4", "--shards", "2"])
    files = _tree(data_dir)
    assert files == _tree(str(tmp_path))
    _, mismatch, errors = filecmp.cmpfiles(data_dir, str(tmp_path), files, shallow=False)
    assert mismatch == [] and errors == []


def test_different_seed_gives_different_data(data_dir, tmp_path):
    generate_dataset(str(tmp_path), seed=1, sizes=SIZES, progress=False)
    assert _load(data_dir, "caption_train.json") != _load(str(tmp_path), "caption_train.json")
    with open(os.path.join(data_dir, "images/train/000001.png"), "rb") as a, \
            open(os.path.join(str(tmp_path), "images/train/000001.png"), "rb") as b:
        assert a.read() != b.read()


def test_eval_splits_do_not_depend_on_train_size(data_dir, tmp_path):
    generate_dataset(str(tmp_path), seed=0, sizes={"train": 3, "val": 4}, progress=False)
    assert _load(data_dir, "caption_val.json") == _load(str(tmp_path), "caption_val.json")


def test_caption_formats(data_dir):
    train = _load(data_dir, "caption_train.json")
    assert len(train) == 5 * SIZES["train"]
    assert set(train[0]) == {"image", "caption", "image_id"} and isinstance(train[0]["caption"], str)
    for split in ("val", "test"):
        rows = _load(data_dir, f"caption_{split}.json")
        assert len(rows) == SIZES[split]
        for row in rows:
            assert len(row["caption"]) == 5 and len(set(row["caption"])) == 5
            img = Image.open(os.path.join(data_dir, row["image"]))
            assert img.size == (64, 64) and img.mode == "RGB"
            assert row["image"] == f"images/{split}/{row['image_id']:06d}.png"
        gt = _load(data_dir, f"caption_{split}_gt.json")
        assert [im["id"] for im in gt["images"]] == [r["image_id"] for r in rows]
        assert len(gt["annotations"]) == 5 * SIZES[split]
        assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])


def test_vqa_and_dialogue_formats(data_dir):
    vqa = _load(data_dir, "vqa_val.json")
    assert {q["question_type"] for q in vqa} <= {"color", "shape", "count", "position", "yes/no", "size"}
    assert len({q["question_id"] for q in vqa}) == len(vqa)
    for q in vqa:
        assert set(q) == {"question_id", "image", "question", "answer", "question_type"}
        assert len(q["answer"]) == 10 and q["question"].endswith("?")
    dialogue = _load(data_dir, "dialogue_val.json")
    assert len(dialogue) == SIZES["val"]
    for d in dialogue:
        assert len(d["dialog"]) == 3 and all(set(t) == {"question", "answer"} for t in d["dialog"])


def test_meta_and_shards(data_dir):
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    assert meta["seed"] == 0 and meta["sizes"] == SIZES
    assert "annotations/caption_val_gt.json" in meta["checksums"]
    shards = sorted(os.listdir(os.path.join(data_dir, "shards")))
    assert shards == ["train-000000.tar", "train-000001.tar"]
    with tarfile.open(os.path.join(data_dir, "shards", shards[0])) as tar:
        names = tar.getnames()
    assert names[:2] == ["000001.json", "000001.png"] and len(names) == 2 * 6


def test_answers_match_the_scene():
    """The majority VQA answer is the true attribute of the scene."""
    for index in range(30):
        item = generate_item(3, "train", index)
        objs = item.scene.objects
        for qa in item.text.questions:
            majority = max(set(qa.answers), key=qa.answers.count)
            if qa.question == "how many shapes are there?":
                assert majority == str(len(objs))
            elif qa.question_type == "color":
                assert majority in COLOURS and any(o.colour == majority for o in objs)
            elif qa.question_type == "shape":
                assert majority in SHAPES and any(o.shape == majority for o in objs)
            elif qa.question_type == "position":
                assert majority in {o.position for o in objs}


def test_corpus_contains_all_kinds_of_text():
    texts = corpus_texts(seed=0, num_images=20)
    assert any(t.startswith("how many shapes") for t in texts)
    assert any(" and " in t for t in texts)
    assert "yes" in texts and "no" in texts


def test_bad_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--val"):
        generate_dataset(str(tmp_path), sizes={"val": -1}, progress=False)
