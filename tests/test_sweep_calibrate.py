"""Threshold sweep, calibration and the oracle exit: selection logic on numbers, the oracle on a
hand-made case and on a real decode, and both commands end to end on a tiny model with random
exits and a few generated images."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lavis_free.evaluation import calibrate, report, sweep
from lavis_free.evaluation import oracle as oracle_cli
from lavis_free.evaluation.calibrate import select_threshold
from lavis_free.evaluation.oracle import capture_decodes, ideal_costs, oracle_row, oracle_stats, teacher_forced_argmax
from lavis_free.evaluation.sweep import relative_drop
from lavis_free.models.blip2_opt_free import Blip2OPTFree

# A synthetic calibration curve: full depth scores 100; quality rises with the threshold.
CURVE = [(0.5, 80.0), (0.6, 95.0), (0.7, 98.9), (0.8, 99.0), (0.9, 99.5), (0.95, 100.0), (0.99, 100.2)]


def _rows(curve):
    return [{"exit_threshold": t, "quality": q} for t, q in curve]


def test_relative_drop():
    assert relative_drop(99.0, 100.0) == pytest.approx(0.01)
    assert relative_drop(101.0, 100.0) == pytest.approx(-0.01)
    assert relative_drop(0.0, 0.0) == 0.0 and relative_drop(-1.0, 0.0) == float("inf")


def test_calibration_picks_the_most_aggressive_threshold_within_tolerance():
    rows = _rows(CURVE)
    assert select_threshold(rows, 100.0, 0.01)["exit_threshold"] == 0.8  # 98.9 is a 1.1% drop
    assert select_threshold(rows, 100.0, 0.05)["exit_threshold"] == 0.6
    assert select_threshold(rows, 100.0, 0.0)["exit_threshold"] == 0.95
    assert select_threshold(list(reversed(rows)), 100.0, 0.25)["exit_threshold"] == 0.5
    assert select_threshold(_rows([(0.5, 50.0), (0.9, 90.0)]), 100.0, 0.01) is None
    for tolerance in (0.0, 0.003, 0.01, 0.02, 0.1):
        chosen = select_threshold(rows, 100.0, tolerance)
        assert relative_drop(chosen["quality"], 100.0) <= tolerance
        assert all(relative_drop(q, 100.0) > tolerance for t, q in CURVE if t < chosen["exit_threshold"])
    with pytest.raises(ValueError, match="--tolerance"):
        select_threshold(rows, 100.0, -0.1)


def test_oracle_row_on_a_hand_made_case():
    # exits after decoder layers 2, 5, 8 (run 3, 6, 9 layers) of a 12-layer LM
    final = [7, 4, 4, 9, 2]
    exit_tokens = [
        [-1, 4, 1, 1, 1],  # exit 0 agrees on token 1
        [-1, 4, 4, 1, 1],  # exit 1 on tokens 1, 2
        [-1, 4, 4, 9, 1],  # exit 2 on tokens 1, 2, 3; nobody on token 4
    ]
    layers, blocks, heads = oracle_row(exit_tokens, final, [2, 5, 8], 12)
    assert layers == [12, 3, 6, 9, 12]
    assert blocks == [0, 1, 2, 3, 3]
    assert heads == [1, 1, 2, 3, 4]
    ideal = ideal_costs({"exit_layers": [layers], "exit_blocks_run": [blocks], "heads_run": [heads], "num_layers": 12})
    assert ideal["exit_blocks_run"] == [[0, 1, 1, 1, 0]] and ideal["heads_run"] == [[1] * 5]
    layers, blocks, heads = oracle_row(exit_tokens, final, [2, 5, 8], 12, min_exit_layer=5)
    assert layers == [12, 6, 6, 9, 12] and blocks == [0, 1, 1, 2, 2] and heads == [1, 1, 1, 2, 3]


@pytest.fixture(scope="module")
def tiny_exit_model():
    cfg = OmegaConf.merge(OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model, {"exits": {"layers": [2, 5, 8]}})
    torch.manual_seed(0)
    return Blip2OPTFree.from_config(cfg).eval()


def test_oracle_teacher_forcing_reproduces_the_decode(tiny_exit_model):
    model = tiny_exit_model
    torch.manual_seed(3)
    images = torch.randn(3, 3, 64, 64)
    with capture_decodes(model) as calls:
        captions, stats = model.generate({"image": images, "prompt": ["a", "a photo of", ""]}, num_beams=1,
                                         max_length=8, min_length=6, early_exit=False, return_exit_stats=True)
    assert "early_exit_decode" not in model.__dict__ and len(calls) == 1
    lengths = [len(row) for row in stats["exit_layers"]]
    per_exit, final = teacher_forced_argmax(model, calls[0], max(lengths))
    for row, length in enumerate(lengths):
        assert final[row, :length].tolist() == calls[0].result.tokens[row, :length].tolist()
    oracle = oracle_stats(model, calls)
    assert [len(r) for r in oracle["exit_layers"]] == lengths
    assert any(run < 12 for row in oracle["exit_layers"] for run in row), "the case must include early exits"
    for row, layers in enumerate(oracle["exit_layers"]):
        assert layers[0] == 12 and set(layers) <= {3, 6, 9, 12}
        for t, run in enumerate(layers[1:], start=1):
            if run < 12:
                k = [3, 6, 9].index(run)
                assert per_exit[k, row, t] == final[row, t]
                assert all(per_exit[j, row, t] != final[row, t] for j in range(k))
    with capture_decodes(model) as calls:
        model.generate({"image": images}, num_beams=1, max_length=4, exit_threshold=0.5)
    with pytest.raises(ValueError, match="full-depth"):
        oracle_stats(model, calls)


def test_sweep_writes_one_row_per_setting_and_a_plot(project_yaml, tmp_path):
    paths = sweep.main(["--cfg-path", project_yaml, "--split", "val", "--thresholds", "0.9", "0.0",
                        "--policies", "recompute", "propagate", "--max-samples", "4", "--threads", "1",
                        "--out", str(tmp_path), "--no-progress"])
    with open(paths["json"]) as f:
        table = json.load(f)
    assert [(r["kv_policy"], r["exit_threshold"]) for r in table["rows"]] == [
        ("recompute", 0.0), ("recompute", 0.9), ("propagate", 0.0), ("propagate", 0.9)]
    assert table["num_samples"] == 4 and table["metric"] == "CIDEr" and table["exit_layers"] == [2, 5, 8]
    assert table["complete"] and table["num_settings"] == 4
    full = table["full_depth"]
    assert full["avg_exit_layer"] == 12 and full["layer_speedup"] == pytest.approx(1.0)
    for row in table["rows"]:
        assert {"Bleu_4", "CIDEr"} <= set(row["metrics"])
        assert row["wallclock_speedup"] > 0 and row["tokens_per_s"] > 0
        # the units add up: time per sample, throughput per token, the speedup is the ratio of the times
        assert row["num_samples"] == 4 and row["ms_per_sample"] == pytest.approx(1000 * row["seconds"] / 4)
        assert row["wallclock_speedup"] == pytest.approx(row["full_depth_ms_per_sample"] / row["ms_per_sample"])
        assert row["tokens_per_s"] == pytest.approx(row["num_tokens"] / row["seconds"])
        assert row["full_depth_tokens_per_s"] == pytest.approx(row["full_depth_num_tokens"] / row["full_depth_seconds"])
        if row["exit_threshold"] == 0.0:  # every token leaves at the first exit after the prefill token
            assert row["avg_exit_layer"] < 12 and row["layer_speedup"] > 1
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
    assert open(paths["md"]).read().count("\n| ") == 2 + 4  # header, full depth, 4 rows
    with pytest.raises(ValueError, match="--thresholds"):
        sweep.main(["--cfg-path", project_yaml, "--thresholds", "1.5", "--out", str(tmp_path)])


def _interrupt_at(monkeypatch, module, call):
    """`module.run_setting` raises KeyboardInterrupt (as Ctrl-C would) at its `call`-th call."""
    calls = []
    real = module.run_setting

    def run_setting(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "run_setting", run_setting)


def test_an_interrupted_sweep_keeps_the_rows_it_measured(project_yaml, tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, sweep, 3)  # full depth and one row done, the second row interrupted
    with pytest.raises(KeyboardInterrupt):
        sweep.main(["--cfg-path", project_yaml, "--thresholds", "0.9", "0.0", "--policies", "recompute",
                    "--max-samples", "2", "--threads", "1", "--out", str(tmp_path), "--no-progress"])
    table = json.loads((tmp_path / "sweep.json").read_text())
    assert not table["complete"] and [r["exit_threshold"] for r in table["rows"]] == [0.0]
    assert "Partial: 1 of 2 settings measured" in (tmp_path / "sweep.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json", "sweep.md"]  # no plot, no temporary file


def test_an_interrupted_calibration_keeps_its_sweep_and_selection(project_yaml, tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, calibrate, 2)  # the test split's full depth done, its threshold row interrupted
    with pytest.raises(KeyboardInterrupt):
        calibrate.main(["--cfg-path", project_yaml, "--thresholds", "0.0", "--policies", "recompute", "--tolerance",
                        "0.99", "--max-samples", "2", "--threads", "1", "--out", str(tmp_path), "--no-progress"])
    result = json.loads((tmp_path / "calibration.json").read_text())
    assert not result["complete"] and result["selected"] == {"recompute": 0.0}
    assert result["calibration"]["complete"] and result["test"]["rows"] == [] and result["oracle"]["num_tokens"] > 0
    assert (tmp_path / "calib_sweep.png").is_file() and not (tmp_path / "calibration.md").exists()
    with pytest.raises(ValueError, match="did not finish"):
        report.main(["--calibration", str(tmp_path / "calibration.json"), "--out", str(tmp_path), "--no-progress"])


def test_bad_splits_and_batch_size_are_refused_before_any_decoding(project_yaml, tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before checking the arguments")

    monkeypatch.setattr(sweep, "warm_up", no_decoding)
    monkeypatch.setattr(calibrate, "run_sweep", no_decoding)
    common = ["--cfg-path", project_yaml, "--threads", "1", "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(ValueError, match=r"--split train: no ground truth known for this split \(splits with one: \['test', 'val'\]\)"):
        sweep.main(common + ["--split", "train"])
    with pytest.raises(ValueError, match="--test-split train: no ground truth"):
        calibrate.main(common + ["--test-split", "train"])
    with pytest.raises(ValueError, match="--calib-split nope: no ground truth"):
        calibrate.main(common + ["--calib-split", "nope"])
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):  # not the YAML's batch size
        sweep.main(common + ["--batch-size", "0"])


def test_calibration_reports_test_split_and_oracle_and_the_report_gathers_it(project_yaml, tmp_path):
    paths = calibrate.main(["--cfg-path", project_yaml, "--thresholds", "0.0", "0.99", "--policies", "recompute",
                            "--tolerance", "0.5", "--max-samples", "4", "--threads", "1", "--out", str(tmp_path),
                            "--no-progress"])
    with open(paths["json"]) as f:
        result = json.load(f)
    calib = result["calibration"]
    expected = select_threshold(calib["rows"], calib["full_depth"]["quality"], 0.5)
    assert result["selected"] == {"recompute": None if expected is None else expected["exit_threshold"]}
    assert result["test"]["split"] == "test" and len(result["test"]["rows"]) == (expected is not None)
    oracle = result["oracle"]
    assert oracle["num_tokens"] == result["test"]["full_depth"]["num_tokens"]
    assert 1 <= oracle["avg_exit_layer"] <= 12 and sum(oracle["histogram"]) == oracle["num_tokens"]
    for key in ("md", "histogram_png", "calib_sweep_png", "calib_sweep_json"):
        assert os.path.getsize(paths[key]) > 0
    assert oracle["ideal_layer_speedup"] >= oracle["layer_speedup"]
    alone = oracle_cli.main(["--cfg-path", project_yaml, "--split", "test", "--max-samples", "4", "--threads", "1",
                             "--out", str(tmp_path / "oracle"), "--no-progress"])
    assert alone["histogram"] == oracle["histogram"] and (tmp_path / "oracle" / "oracle_histogram.png").is_file()

    out = tmp_path / "report"
    written = report.main(["--calibration", paths["json"], "--out", str(out), "--no-progress"])
    text = open(written["md"]).read()
    assert "oracle exit ceiling" in text and "![exit layers](exit_histogram.png)" in text
    assert (out / "exit_histogram.png").is_file() and (out / "calib_sweep.png").is_file()
    assert json.load(open(written["json"]))["calibration"]["selected"] == result["selected"]
    with pytest.raises(FileNotFoundError, match="--sweep"):
        report.main(["--calibration", paths["json"], "--sweep", str(tmp_path / "nope.json"), "--out", str(out)])
    with pytest.raises(ValueError, match="--tolerance"):
        calibrate.main(["--cfg-path", project_yaml, "--tolerance", "2", "--out", str(tmp_path)])


def test_demo_runs_every_step_at_toy_size(tmp_path):
    """The main job (run_scripts/demo.sh) end to end on a few images, in the current environment."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "data"), "SKIP_SETUP": "1", "PYTHON": sys.executable,
        "SHAPES_ARGS": "--train 8 --val 4 --test 4",
        "TRAIN_OPTIONS": "run.max_epoch=1 run.batch_size_train=4 run.warmup_steps=1",
        "EVAL_ARGS": "--thresholds 0.5 --policies recompute --no-progress", "QUALITY_LIMIT": "8",
        "FRONTIER_ARGS": "--num-samples 2 --thresholds 0.5", "TASK_SAMPLES": "6", "TASK_ARGS": "--max-samples 6",
    }
    proc = subprocess.run(["bash", "run_scripts/demo.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = [line.split("] ", 1)[1].split(" ", 1)[0] for line in proc.stdout.splitlines() if line.startswith("== demo [")]
    assert stages == ["1/10", "2/10", "3/10", "3/10", "3/10", "4/10", "5/10", "5/10", "6/10", "7/10", "8/10", "9/10", "10/10"]
    report_md = tmp_path / "out" / "report.md"
    assert f"report: {report_md}" in proc.stdout and "calibrated threshold (recompute" in proc.stdout
    report_json = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report_json["calibration"]["test"]["num_samples"] == 4 and "exit_quality" in report_json
    assert {r["method"] for r in report_json["frontier"]["rows"]} == {"lavis", "engine", "free", "no_adversarial", "vanilla", "static"}
    assert set(report_json["exit_quality"]["quality"]) >= {"free", "no_adversarial", "vanilla"}
    assert report_json["exits_by_kind"]["counts"]
    rows = report_json["tasks"]["rows"]
    assert [r["task"] for r in rows] == ["captioning", "VQA", "dialogue ranking", "dialogue answers"]
    # test: 4 images, 4 dialogue rounds (the open one per dialog), 6 of the 20 questions (TASK_ARGS)
    assert [r["num_samples"] for r in rows] == [4, 6, 4, 4], rows
    assert all(r["num_tokens"] > 0 and r["time_split_ms"]["prefill"] > 0 for r in rows), rows
    assert set(report_json["task_calibrations"]) == {"vqa", "dialogue"}
    report_text = report_md.read_text()
    assert "## Every task: full depth vs exits" in report_text and "### dialogue: full depth vs calibrated exits" in report_text
    for name in ("exit_histogram.png", "calib_sweep.png", "exit_quality.png", "frontier.png", "exits_by_kind.png",
                 "tasks.png", "vqa_calib_sweep.png", "dialogue_exit_histogram.png"):
        assert (tmp_path / "out" / name).is_file()
    # the backbone feature cache went to a temporary directory, removed at the end
    cache = re.search(r"feature cache, removed at exit: (\S+)\)", proc.stdout).group(1)
    assert not os.path.exists(cache) and not str(cache).startswith(str(tmp_path / "out"))
    assert not [p for p in (tmp_path / "out").rglob("*") if "feature" in p.name]
