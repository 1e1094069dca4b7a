"""Per-attribute caption accuracy against the stored scenes (lavis_free.tasks.scene_metrics)."""
import json
import os

import pytest

from lavis_free.datasets.annotations import load_caption_gt
from lavis_free.tasks.caption_metrics import caption_metrics
from lavis_free.tasks.scene_metrics import ATTRIBUTES, parse_caption, scene_accuracy, load_scenes

SCENE = [
    {"colour": "red", "shape": "circle", "size": "small", "position": "top left"},
    {"colour": "blue", "shape": "star", "size": "large", "position": "right"},
    {"colour": "blue", "shape": "star", "size": "medium", "position": "bottom right"},
]


def _gt(split_dir):
    return os.path.join(split_dir, "annotations", "caption_val_gt.json")


def test_every_reference_caption_reads_back_right_on_every_attribute(shapes_data_dir):
    """The parser covers every template of the shapes language: references are all right."""
    gt = _gt(shapes_data_dir)
    references, scenes = load_caption_gt(gt), load_scenes(gt)
    assert scenes.keys() == references.keys()
    for k in range(5):
        scores = scene_accuracy({i: refs[k] for i, refs in references.items()}, scenes)
        for attribute in ATTRIBUTES:
            assert scores[f"scene_{attribute}"] in (None, 1.0), (k, attribute, scores)
    stated = scene_accuracy({i: " and ".join(refs) for i, refs in references.items()}, scenes)
    assert all(stated[f"scene_{a}_n"] > 0 for a in ATTRIBUTES)


@pytest.mark.parametrize("caption, wrong", [
    ("a small red circle in the top left corner and a large blue star on the right", None),
    ("a small green circle in the top left corner and a large blue star on the right", "colour"),
    ("a small red square in the upper left and a large blue star on the right", "shape"),
    ("a big red circle in the upper left and a large blue star on the right", "size"),
    ("a small red circle at the bottom and a large blue star on the right", "position"),
    ("three blue stars and a red circle", "count"),
    ("two shapes including two blue stars", "count"),
])
def test_a_wrong_attribute_is_scored_wrong_and_only_that_one(caption, wrong):
    scores = scene_accuracy({1: caption}, {1: SCENE})
    for attribute in ATTRIBUTES:
        value = scores[f"scene_{attribute}"]
        if value is not None:
            assert (value < 1.0) == (attribute == wrong), (attribute, scores)


def test_groups_and_totals_are_counted():
    mentions, totals = parse_caption("a medium sized blue star and two other shapes")
    assert [(m.colour, m.shape, m.size) for m in mentions] == [("blue", "star", "medium")]
    assert totals == [(2, "others")]
    scores = scene_accuracy({1: "two blue stars and a red circle"}, {1: SCENE})
    assert scores["scene_count"] == 1.0 and scores["scene_coverage"] == 1.0
    assert scene_accuracy({1: "a blue star"}, {1: SCENE})["scene_coverage"] == pytest.approx(1 / 3)


def test_caption_metrics_report_the_attributes_when_the_ground_truth_has_scenes(shapes_data_dir, tmp_path):
    gt = _gt(shapes_data_dir)
    references = load_caption_gt(gt)
    predictions = [{"image_id": i, "caption": refs[0]} for i, refs in references.items()]
    scores = caption_metrics(predictions, gt, scorers=("cider",))
    assert scores["scene_colour"] == 1.0 and scores["CIDEr"] > 0
    plain = json.load(open(gt))
    for image in plain["images"]:
        del image["scene"]
    real_like = tmp_path / "gt.json"
    real_like.write_text(json.dumps(plain))
    assert not any(key.startswith("scene_") for key in caption_metrics(predictions, str(real_like), scorers=("cider",)))
