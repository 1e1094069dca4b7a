"""Reference points for caption scores: the constant "most frequent caption" baseline.

    python -m lavis_free.tasks.baselines --data data/shapes --split test

predicts, for every image of ``split``, the caption that occurs most often in the train
annotations, and scores it like a model. A trained model has to beat it clearly to show it
looks at the image.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Dict, Optional, Sequence, Union

from lavis_free.datasets.annotations import CAPTION_TRAIN, load_annotation_file, load_caption_gt
from lavis_free.tasks.caption_metrics import DEFAULT_SCORERS, caption_metrics


def most_frequent_caption(data_dir: str) -> str:
    """The most frequent train caption (ties: alphabetically first, so the result is stable)."""
    rows = load_annotation_file(os.path.join(data_dir, "annotations", "caption_train.json"), CAPTION_TRAIN, root=data_dir)
    counts = Counter(row["caption"] for row in rows)
    return min(counts, key=lambda c: (-counts[c], c))


def most_frequent_caption_baseline(data_dir: str, split: str = "test",
                                   scorers: Sequence[str] = DEFAULT_SCORERS) -> Dict[str, Union[float, str]]:
    """Caption metrics of predicting the most frequent train caption for every ``split`` image."""
    caption = most_frequent_caption(data_dir)
    gt_path = os.path.join(data_dir, "annotations", f"caption_{split}_gt.json")
    predictions = [{"image_id": image_id, "caption": caption} for image_id in load_caption_gt(gt_path)]
    metrics: Dict[str, Union[float, str]] = dict(caption_metrics(predictions, gt_path, scorers))
    metrics["caption"] = caption
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.tasks.baselines", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/shapes", help="data directory of the shapes generator")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    args = parser.parse_args(argv)
    print(json.dumps(most_frequent_caption_baseline(args.data, args.split), indent=2))


if __name__ == "__main__":
    main()
