"""The per-task table (lavis_free.evaluation.task_table): options per project, arguments, outputs."""
import argparse
import json

import pytest

from lavis_free.evaluation import task_table


def _row(task, headline, full, exits, layer, wall, split_ms):
    return {"project": task, "cfg_path": f"{task}.yaml", "task": task, "split": "test", "num_samples": 10,
            "exit_threshold": 0.4, "headline_metric": headline, "full_depth": {headline: full}, "exits": {headline: exits},
            "relative_change": (exits - full) / full, "avg_exit_layer": 12 / layer, "num_layers": 12,
            "layer_speedup": layer, "wallclock_speedup": wall, "num_tokens": 40,
            "time_split_ms": dict(zip(task_table.TIME_PARTS, split_ms)),
            "full_depth_time_split_ms": dict(zip(task_table.TIME_PARTS, [split_ms[0], split_ms[1] * 0.8, split_ms[2], split_ms[3] * 2]))}


def test_dataset_options_go_only_to_projects_with_that_dataset():
    options = ["model.exits_checkpoint=x.pth", "datasets.shapes_vqa.build_info.storage=/d",
               "datasets.shapes_visdial.build_info.storage=/d", "run.caption_scorers=[bleu,cider]"]
    assert task_table.options_for("projects/free/shapes_vqa_frozen_lm.yaml", options) == [
        "model.exits_checkpoint=x.pth", "datasets.shapes_vqa.build_info.storage=/d", "run.caption_scorers=[bleu,cider]"]
    assert "datasets.shapes_visdial.build_info.storage=/d" in task_table.options_for(
        "projects/free/shapes_visdial_frozen_lm.yaml", options)


def test_named_arguments_are_checked():
    parse = task_table.parse_named("--threshold", "vqa=0.4", task_table.threshold_value)
    assert parse("vqa=0.25") == ("vqa", 0.25) and parse("dialogue=off") == ("dialogue", "off")
    for bad in ("vqa", "=0.4", "vqa=", "vqa=high"):
        with pytest.raises(argparse.ArgumentTypeError, match="--threshold"):
            parse(bad)
    with pytest.raises(SystemExit):
        task_table.main(["--project", "vqa=projects/free/shapes_vqa_frozen_lm.yaml", "--threshold", "caption=0.1",
                         "--out", "/tmp/never"])


def test_outputs_hold_every_row_and_the_average(tmp_path):
    rows = [_row("captioning", "CIDEr", 2.0, 1.9, 2.4, 1.4, [1.0, 2.0, 0.0, 3.0]),
            _row("VQA", "accuracy", 70.0, 69.0, 1.3, 0.9, [1.0, 4.0, 0.0, 0.5]),
            {**_row("dialogue", "mrr", 0.8, 0.79, 1.5, 1.2, [1.0, 4.0, 30.0, 20.0]), "task": "dialogue ranking"},
            {**_row("dialogue", "answer_accuracy", 60.0, 60.0, 1.3, 0.8, [1.0, 4.0, 0.0, 0.5]), "task": "dialogue answers"}]
    table = {"rows": rows, "average": task_table.average_row(rows)}
    # dialogue's two rows count as one task: (2.4 + 1.3 + 1.4) / 3 and (1.4 + 0.9 + 1.0) / 3
    assert table["average"] == {"layer_speedup": pytest.approx(1.7), "wallclock_speedup": pytest.approx(1.1), "num_tasks": 3}
    paths = task_table.write_tasks(table, tmp_path)
    md = open(paths["md"]).read()
    assert "| captioning (threshold 0.4) | CIDEr 2.000 | CIDEr 1.900 | -5.0% CIDEr |" in md
    assert "| VQA (threshold 0.4) | accuracy 70.00 | accuracy 69.00 | -1.4% accuracy |" in md
    assert "1.0 (1.0) / 4.0 (3.2) / 0.0 (0.0) / 0.5 (1.0)" in md and "4.0 (3.2) / 30.0 (30.0) / 20.0 (40.0)" in md and "average over 3 tasks" in md and "1.70x | 1.10x" in md
    assert json.load(open(paths["json"]))["rows"][1]["task"] == "VQA"
    fig = task_table.tasks_figure(table)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("Speedup") and titles[1].startswith("Where the time goes")
    assert all(ax.get_ylabel() for ax in fig.axes) and fig._suptitle.get_text()
