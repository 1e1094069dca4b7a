"""VisDial v1.0: the strict reader, the shapes files in that layout, the builders and the retrieval metrics."""
import json
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

import lavis_free  # noqa: F401  (registers the builders)
from lavis.common.registry import registry
from lavis_free.datasets.annotations import AnnotationError
from lavis_free.datasets.shapes import generate_dataset
from lavis_free.datasets.visdial import read_dense_annotations, read_visdial
from lavis_free.tasks.visdial_metrics import (
    mean_rank, mean_reciprocal_rank, ndcg, recall_at, retrieval_metrics, scores_to_ranks,
)

ANSWERS = [f"answer {i}" for i in range(120)]
QUESTIONS = ["is it red?", "where is it?", "how many?"]


def _turn(question, answer, gt_index=0):
    """A full round whose options are answers answer..answer+99, rotated so the answer sits at gt_index."""
    options = [(answer + k - gt_index) % len(ANSWERS) for k in range(100)]
    return {"question": question, "answer": answer, "answer_options": options, "gt_index": gt_index}


def _visdial(split, dialogs):
    return {"version": "1.0", "split": split, "data": {"questions": QUESTIONS, "answers": ANSWERS, "dialogs": dialogs}}


def _val_file():
    return _visdial("val", [
        {"image_id": 7, "caption": "a red square", "dialog": [_turn(0, 3, gt_index=5), _turn(1, 4)]},
        {"image_id": 9, "caption": "two stars", "dialog": [_turn(2, 10, gt_index=99)]},
    ])


def _test_file():
    """Official test layout: round_id = the last round, which has options and no answer/gt_index."""
    return _visdial("test", [{"image_id": 5, "caption": "a blue disk", "round_id": 2, "dialog": [
        {"question": 0, "answer": 1},
        {"question": 1, "answer_options": list(range(100))},
    ]}])


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def test_reader_gives_one_record_per_round(tmp_path):
    records = read_visdial(_write(tmp_path, "visdial_1.0_val.json", _val_file()), split="val")
    assert [(r["image_id"], r["round"], r["question_id"]) for r in records] == [(7, 1, 701), (7, 2, 702), (9, 1, 901)]
    first, second = records[0], records[1]
    assert first["question"] == "is it red?" and first["answer"] == "answer 3"
    assert first["gt_index"] == 5 and first["answer_options"][5] == "answer 3" and len(first["answer_options"]) == 100
    assert second["context"] == "a red square is it red? answer 3 where is it?"
    assert first["context"] == "a red square is it red?" and first["gt_relevance"] is None
    assert records[2]["gt_index"] == 99 and records[2]["answer_options"][99] == "answer 10"


def test_reader_official_test_layout(tmp_path):
    data = _test_file()
    data["split"] = "test2018"  # what the real file says
    records = read_visdial(_write(tmp_path, "visdial_1.0_test.json", data), split="test")
    history, open_round = records
    assert history["split"] == "test"
    assert history["answer"] == "answer 1" and history["answer_options"] is None
    assert open_round["answer"] is None and open_round["gt_index"] is None
    assert open_round["answer_options"] == ANSWERS[:100] and open_round["question_id"] == 502
    assert open_round["context"] == "a blue disk is it red? answer 1 where is it?"


def test_reader_without_options_for_training(tmp_path):
    data = _val_file()
    data["split"] = "train"
    data["data"]["dialogs"][0]["dialog"][0]["answer_options"] = [0]  # not checked when options are not read
    records = read_visdial(_write(tmp_path, "visdial_1.0_train.json", data), options=False)
    assert all(r["answer_options"] is None and r["gt_index"] is None for r in records) and len(records) == 3


def _error(tmp_path, data, name="visdial_1.0_val.json", **kwargs):
    path = _write(tmp_path, name, data)
    with pytest.raises(AnnotationError) as err:
        read_visdial(path, **kwargs)
    assert path in str(err.value)
    return str(err.value)


def test_reader_errors_name_file_dialog_and_key(tmp_path):
    data = _val_file()
    del data["data"]["dialogs"][1]["caption"]
    assert "dialog 1 has no key 'caption' (expected a string)" in _error(tmp_path, data)

    data = _val_file()
    data["data"]["dialogs"][0]["dialog"][1]["answer"] = 120
    message = _error(tmp_path, data)
    assert "dialog 0: round 2: 'answer' is 120, out of range" in message and "0..119" in message

    data = _val_file()
    data["data"]["dialogs"][1]["dialog"][0]["answer_options"] = list(range(99))
    message = _error(tmp_path, data)
    assert "dialog 1: round 1: 'answer_options' has 99 entries, expected a list of 100" in message

    data = _val_file()
    data["data"]["dialogs"][0]["dialog"][0]["gt_index"] = 6
    assert "not the round's answer 'answer 3'" in _error(tmp_path, data)

    assert "'val' split, but it is configured as the 'test' split" in _error(tmp_path, _val_file(), split="test")


def test_reader_test_split_errors(tmp_path):
    data = _test_file()
    del data["data"]["dialogs"][0]["round_id"]
    assert "dialog 0 has no key 'round_id'" in _error(tmp_path, data, name="visdial_1.0_test.json")
    data = _test_file()
    data["data"]["dialogs"][0]["round_id"] = 1
    assert "'round_id' is 1 but the dialog has 2 rounds" in _error(tmp_path, data, name="visdial_1.0_test.json")
    data = _test_file()
    del data["data"]["dialogs"][0]["dialog"][0]["answer"]
    assert "dialog 0: round 1 has no key 'answer'" in _error(tmp_path, data, name="visdial_1.0_test.json")


def test_dense_annotation_errors(tmp_path):
    entry = {"image_id": 7, "round_id": 2, "gt_relevance": [0.0] * 99}
    path = _write(tmp_path, "dense.json", [entry])
    with pytest.raises(AnnotationError, match=r"dense.json: entry 0: 'gt_relevance' has 99 entries"):
        read_dense_annotations(path)
    entry["gt_relevance"] = [1.5] + [0.0] * 99
    path = _write(tmp_path, "dense.json", [entry])
    with pytest.raises(AnnotationError, match=r"gt_relevance\[0\] is 1.5, expected a number in \[0, 1\]"):
        read_dense_annotations(path)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_visdial")
    generate_dataset(str(out), seed=0, sizes={"train": 4, "val": 2, "test": 2}, progress=False)
    return str(out)


def _load(root, name):
    with open(os.path.join(root, "annotations", name)) as f:
        return json.load(f)


def test_shapes_files_are_in_the_official_layout(shapes_dir):
    for split, size in (("train", 4), ("val", 2), ("test", 2)):
        records = read_visdial(os.path.join(shapes_dir, "annotations", f"visdial_1.0_{split}.json"), split=split)
        assert len(records) == 3 * size  # the shapes dialogues keep their 3 rounds
        dialogue = _load(shapes_dir, f"dialogue_{split}.json")
        assert [r["answer"] for r in records] == [t["answer"] for d in dialogue for t in d["dialog"]]
    test = _load(shapes_dir, "visdial_1.0_test.json")["data"]["dialogs"]
    assert all(d["round_id"] == 3 and "answer_options" not in d["dialog"][0] for d in test)
    assert "round_id" not in _load(shapes_dir, "visdial_1.0_val.json")["data"]["dialogs"][0]


def test_shapes_options_hold_the_answer_once_at_gt_index(shapes_dir):
    for split in ("train", "val", "test"):
        path = os.path.join(shapes_dir, "annotations", f"visdial_1.0_{split}.json")
        for record in read_visdial(path):
            options = record["answer_options"]
            if options is None:
                continue
            assert len(set(options)) == 100
            assert options.count(record["answer"]) == 1 and options[record["gt_index"]] == record["answer"]


def test_shapes_dense_relevance(shapes_dir):
    for split in ("val", "test"):
        records = {(r["image_id"], r["round"]): r
                   for r in read_visdial(os.path.join(shapes_dir, "annotations", f"visdial_1.0_{split}.json"))}
        dense_path = os.path.join(shapes_dir, "annotations", f"visdial_1.0_{split}_dense_annotations.json")
        dense = read_dense_annotations(dense_path)
        assert len(dense) == 2
        for key, (_, relevance) in dense.items():
            record = records[key]
            assert relevance[record["gt_index"]] == 1.0 and relevance.count(1.0) == 1
            assert set(relevance) <= {0.0, 0.5, 1.0}
            assert split == "val" or key[1] == 3  # test: the round_id round
    last = records[(900001, 3)]
    accepted = [o for o, r in zip(last["answer_options"], dense[(900001, 3)][1]) if r == 0.5]
    assert last["answer"] == "large" and accepted == ["big"]  # a synonym the captions use


def _build(name, root, **build_info):
    builder_cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(builder_cls.default_config_path()).datasets[name]
    cfg.build_info.storage = root
    for key, value in build_info.items():
        OmegaConf.update(cfg.build_info, key, value, merge=False)
    return builder_cls(cfg).build_datasets()


def test_shapes_visdial_builder(shapes_dir):
    ds = _build("shapes_visdial", shapes_dir)
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (12, 6, 2)
    sample = ds["train"][1]
    assert set(sample) == {"image", "text_input", "text_output", "image_id"} and sample["image"].shape == (3, 64, 64)
    caption = _load(shapes_dir, "visdial_1.0_train.json")["data"]["dialogs"][0]["caption"]
    assert not sample["text_input"].startswith(caption.lower())  # the default's dialogue format
    assert sample["text_input"] == ds["train"].text_processor(ds["train"].annotation[1]["dialogue_context"])
    with_caption = _build("shapes_visdial", shapes_dir, caption_in_context=True)["train"][1]["text_input"]
    assert with_caption == f"{caption.lower()} {sample['text_input']}"
    with pytest.raises(ValueError, match="build_info.caption_in_context must be true or false, got 'yes'"):
        _build("shapes_visdial", shapes_dir, caption_in_context="yes")
    val = [ds["val"][i] for i in range(len(ds["val"]))]
    assert [s["question_id"] for s in val] == [image_id * 100 + k for image_id in (800001, 800002) for k in (1, 2, 3)]
    assert sum(s["gt_relevance"] is not None for s in val) == 2
    assert all(len(s["answer_options"]) == 100 and isinstance(s["gt_index"], int) for s in val)
    batch = ds["val"].collater(val[:2])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["question_id"].tolist() == [80000101, 80000102]
    assert len(batch["answer_options"]) == 2 and len(batch["answer_options"][0]) == 100
    assert [s["question_id"] % 100 for s in (ds["test"][0], ds["test"][1])] == [3, 3]
    assert ds["test"][0]["gt_relevance"].shape == (100,)


def test_image_patterns(shapes_dir, tmp_path):
    patterns = ["no_such_dir/{image_id}.png", "images/{split}/{image_id:06d}.png"]
    ds = _build("shapes_visdial", shapes_dir, **{"images.val": patterns})
    assert ds["val"].annotation[0]["image"] == "images/val/800001.png"
    with pytest.raises(FileNotFoundError, match="tried no_such_dir/800001.png, other/800001.png"):
        _build("shapes_visdial", shapes_dir, **{"images.val": ["no_such_dir/{image_id}.png", "other/{image_id}.png"]})
    with pytest.raises(ValueError, match=r"build_info.images.val = '\{id\}.png' is not a valid filename pattern"):
        _build("shapes_visdial", shapes_dir, **{"images.val": "{id}.png"})
    no_images = _build("shapes_visdial", shapes_dir, **{"images.storage": str(tmp_path)})["val"]
    with pytest.raises(FileNotFoundError, match=r"800001.png: no such file; it is the image of dialog 0 \(round 2\) of "):
        no_images[1]


def test_visdial_builder_points_at_the_official_files(tmp_path):
    builder_cls = registry.get_builder_class("visdial")
    info = OmegaConf.load(builder_cls.default_config_path()).datasets.visdial.build_info
    assert info.annotations.val.dense == "visdial_1.0_val_dense_annotations.json"
    val_image = info.images.val.format(image_id=123, split="val")
    assert val_image == "VisualDialog_val2018/VisualDialog_val2018_000000000123.jpg"
    with pytest.raises(FileNotFoundError, match="visualdialog.org"):
        _build("visdial", str(tmp_path / "missing"))


def test_metrics_of_a_perfect_ranking():
    relevance = torch.zeros(2, 100)
    relevance[0, 3], relevance[0, 8], relevance[1, 0] = 1.0, 0.5, 0.25
    scores = relevance.clone()
    scores[1, 0] = 2.0
    ranks = scores_to_ranks(scores)
    gt_index = torch.tensor([3, 0])
    assert recall_at(ranks, gt_index, 1) == 1.0 and mean_rank(ranks, gt_index) == 1.0
    assert mean_reciprocal_rank(ranks, gt_index) == 1.0 and ndcg(ranks, relevance) == pytest.approx(1.0)


def test_metrics_of_a_reversed_ranking():
    scores = torch.arange(100, dtype=torch.float).repeat(2, 1)  # option 99 first, option 0 last
    ranks = scores_to_ranks(scores)
    assert ranks[0, 99] == 1 and ranks[0, 0] == 100
    gt_index = torch.tensor([0, 95])  # ranks 100 and 5
    assert [recall_at(ranks, gt_index, k) for k in (1, 5, 10)] == [0.0, 0.5, 0.5]
    assert mean_rank(ranks, gt_index) == 52.5
    assert mean_reciprocal_rank(ranks, gt_index) == pytest.approx((1 / 100 + 1 / 5) / 2)
    relevance = torch.zeros(1, 100)
    relevance[0, 0], relevance[0, 99] = 1.0, 0.5  # k = 2: the top two are options 99 (0.5) and 98 (0)
    expected = (0.5 / math.log2(2)) / (1.0 / math.log2(2) + 0.5 / math.log2(3))
    assert ndcg(ranks[:1], relevance) == pytest.approx(expected)
    assert ndcg(ranks[:1], relevance) == pytest.approx(0.380094, abs=1e-6)


def test_ndcg_counts_only_the_top_k():
    """k = 3 relevant options; ranked 1st, 2nd and 4th: the 4th is past k and gains nothing."""
    relevance = torch.zeros(1, 100)
    relevance[0, :3] = torch.tensor([1.0, 1.0, 1.0])
    scores = torch.zeros(1, 100)
    scores[0, :4] = torch.tensor([4.0, 3.0, 1.0, 2.0])
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg(scores_to_ranks(scores), relevance) == pytest.approx((1 + 1 / math.log2(3)) / ideal)


def test_retrieval_metrics_skip_rounds_without_ground_truth():
    scores = torch.arange(100, dtype=torch.float).repeat(3, 1)
    relevance = [None, [1.0] + [0.0] * 99, None]
    metrics = retrieval_metrics(scores, [99, None, 0], relevance)
    assert metrics["num_rounds"] == 2 and metrics["r@1"] == 0.5 and metrics["mean_rank"] == 50.5
    assert metrics["num_dense_rounds"] == 1 and metrics["ndcg"] == 0.0
    assert set(retrieval_metrics(scores, [None] * 3, [None] * 3)) == set()
    with pytest.raises(ValueError, match="no option of relevance > 0"):
        ndcg(scores_to_ranks(scores[:1]), torch.zeros(1, 100))
    with pytest.raises(ValueError, match="gt_index values must be option indices in 0..99"):
        recall_at(scores_to_ranks(scores[:1]), torch.tensor([100]), 1)


def test_visdial_builder_reads_a_small_tree_in_the_official_layout(tmp_path):
    """The `visdial` builder's default config on a tiny copy of the official download: the
    val2018/test2018 split names, VisDial's and COCO's image file names (train images in either
    COCO folder), the val dense annotations; text_input starts with the caption."""
    from PIL import Image

    root = tmp_path / "visdial"
    for folder, name in (("train2014", "COCO_train2014_000000000011.jpg"), ("val2014", "COCO_val2014_000000000012.jpg"),
                         ("VisualDialog_val2018", "VisualDialog_val2018_000000000007.jpg"),
                         ("VisualDialog_val2018", "VisualDialog_val2018_000000000009.jpg"),
                         ("VisualDialog_test2018", "VisualDialog_test2018_000000000005.jpg")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / folder / name)
    train = _visdial("train", [{"image_id": i, "caption": "a cat", "dialog": [{"question": 0, "answer": i}]} for i in (11, 12)])
    train["split"] = "train2018"
    val, test = _val_file(), _test_file()
    val["split"], test["split"] = "val2018", "test2018"
    _write(root, "visdial_1.0_train.json", train)
    _write(root, "visdial_1.0_val.json", val)
    _write(root, "visdial_1.0_test.json", test)
    _write(root, "visdial_1.0_val_dense_annotations.json",
           [{"image_id": 7, "round_id": 2, "gt_relevance": [1.0] + [0.0] * 99}])
    ds = _build("visdial", str(root))
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (2, 3, 1)
    first = ds["train"][0]
    assert first["image"].shape == (3, 224, 224) and first["text_output"] == "answer 11"
    assert first["text_input"] == "a cat is it red?"
    rounds = [ds["val"][i] for i in range(3)]
    assert [r["question_id"] for r in rounds] == [701, 702, 901]
    assert [r["gt_index"] for r in rounds] == [5, 0, 99] and rounds[0]["answer_options"][5] == "answer 3"
    assert rounds[1]["text_input"] == "a red square is it red? answer 3 where is it?"
    assert rounds[0]["gt_relevance"] is None and rounds[1]["gt_relevance"][0] == 1.0
    opened = ds["test"][0]
    assert opened["question_id"] == 502 and opened["gt_index"] is None and len(opened["answer_options"]) == 100
