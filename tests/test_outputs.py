"""Evaluation outputs: the output directory is checked before any work, files are written
atomically, report lines add up, and every plot has a title, axis labels, a legend off the data
and threshold labels that do not overlap. Fake result dicts only: no model is built."""
import json
import os
import re

import pytest

from lavis_free.evaluation import calibrate, oracle, plots, report, sweep
from lavis_free.evaluation.outputs import OutputDirError, atomic_write, prepare_output_dir
from lavis_free.reports import exit_quality


# ---- output directory and atomic writes ---------------------------------------------------

def _unwritable(tmp_path):
    """(kind, --out value, expected message) for paths no command can write."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [("a file", a_file, "exists and is not a directory"),
             ("a path under a file", a_file / "sub" / "dir", "a part of the path is a file")]
    if os.geteuid() != 0:  # root writes into read-only directories
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        cases.append(("a read-only dir", read_only / "out", "cannot write there"))
    return cases


def test_prepare_output_dir_creates_and_probes(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # the probe is gone
    for kind, path, message in _unwritable(tmp_path):
        with pytest.raises(OutputDirError, match=re.escape(f"--out {path}: {message}")):
            prepare_output_dir(path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    atomic_write(target, '{"old": 1}')
    assert json.loads(target.read_text()) == {"old": 1}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b'{"new": 2}')
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left


@pytest.mark.parametrize("command", ["sweep", "calibrate", "oracle", "report", "exit_quality"])
def test_every_command_refuses_an_unwritable_out_before_any_work(command, tmp_path):
    """The inputs do not exist: an error about --out proves it was checked first."""
    mains = {
        "sweep": (sweep.main, ["--cfg-path", "missing.yaml"]),
        "calibrate": (calibrate.main, ["--cfg-path", "missing.yaml"]),
        "oracle": (oracle.main, ["--cfg-path", "missing.yaml"]),
        "report": (report.main, ["--calibration", "missing.json", "--no-progress"]),
        "exit_quality": (exit_quality.main, ["--cfg-path", "missing.yaml", "--free", "missing.pth"]),
    }
    main, args = mains[command]
    for kind, path, message in _unwritable(tmp_path):
        with pytest.raises(OutputDirError, match=re.escape(message)):
            main(args + ["--out", str(path)])


def test_empty_out_is_refused_rather_than_the_current_directory():
    with pytest.raises(OutputDirError, match="--out is empty"):
        sweep.main(["--cfg-path", "missing.yaml", "--out", ""])


def test_plots_command_refuses_a_directory_as_png_and_plots_a_stopped_sweep(tmp_path):
    with pytest.raises(OutputDirError, match="is a directory"):
        plots.main(["--sweep", "missing.json", "--out", str(tmp_path)])
    partial = tmp_path / "sweep.json"
    partial.write_text(json.dumps(dict(_sweep_table(), complete=False)))
    plots.main(["--sweep", str(partial), "--out", str(tmp_path / "sweep.png")])
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_report_inputs_that_are_not_what_the_flag_expects(tmp_path):
    garbage, swept = tmp_path / "garbage.json", tmp_path / "sweep.json"
    garbage.write_bytes(b"\x80PNG not json")
    swept.write_text(json.dumps(_sweep_table()))
    out = str(tmp_path / "report")
    with pytest.raises(ValueError, match=re.escape(f"--calibration {garbage}: not a JSON file")):
        report.main(["--calibration", str(garbage), "--out", out, "--no-progress"])
    with pytest.raises(ValueError, match=re.escape(f"--calibration {swept}: has no ['selected', 'test', 'oracle', 'calibration']")):
        report.main(["--calibration", str(swept), "--out", out, "--no-progress"])
    with pytest.raises(ValueError, match=re.escape(f"--sweep {garbage}: not a JSON file")):
        plots.main(["--sweep", str(garbage), "--out", str(tmp_path / "x.png")])


# ---- fake results -------------------------------------------------------------------------

def _row(policy, threshold, quality, layer_speedup, ms, full_ms, tokens, full_tokens, samples=10):
    """A sweep row as `compared_figures` makes it; seconds and tokens/s derived from ms and tokens."""
    seconds, full_seconds = ms * samples / 1000, full_ms * samples / 1000
    return {
        "kv_policy": policy, "exit_threshold": threshold, "quality": quality, "relative_drop": (1.0 - quality) / 1.0,
        "avg_exit_layer": 12 / layer_speedup, "layer_speedup": layer_speedup, "wallclock_speedup": full_seconds / seconds,
        "ms_per_sample": ms, "full_depth_ms_per_sample": full_ms,
        "tokens_per_s": tokens / seconds, "full_depth_tokens_per_s": full_tokens / full_seconds,
        "num_samples": samples, "num_tokens": tokens, "full_depth_num_tokens": full_tokens,
        "seconds": seconds, "full_depth_seconds": full_seconds, "histogram": [0, 0, 0, 30, 0, 0, 5, 0, 0, 5, 0, 0, 10],
    }


def _sweep_table(thresholds=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99), complete=True):
    # dense on purpose: twelve thresholds within a few percent of speedup, as on shapes
    rows = [_row(policy, t, 0.98 + 0.0005 * i, 2.3 - 0.003 * i, 40 + 0.3 * i, 60, 300 - i, 260)
            for policy in ("recompute", "propagate") for i, t in enumerate(thresholds)]
    return {"cfg_path": "p.yaml", "split": "val", "num_samples": 10, "metric": "CIDEr", "num_layers": 12,
            "exit_layers": [2, 5, 8], "num_settings": len(rows), "complete": complete,
            "full_depth": _row(None, 2.0, 1.0, 1.0, 60, 60, 260, 260), "rows": rows}


def _calibration():
    table = _sweep_table()
    # the case of the issue: a 1.50x per-sample speedup with tokens/s 2099 vs 1578 (more tokens when exiting)
    test_row = _row("recompute", 0.0, 1.3, 2.35, 40.0, 60.0, 8396, 9468 * 2 // 3)
    return {
        "cfg_path": "p.yaml", "metric": "CIDEr", "tolerance": 0.01, "calib_split": "val", "test_split": "test",
        "complete": True, "selected": {"recompute": 0.0, "propagate": None}, "calibration": table,
        "test": {"split": "test", "num_samples": 10, "metric": "CIDEr", "num_layers": 12, "exit_layers": [2, 5, 8],
                 "num_settings": 1, "complete": True, "full_depth": _row(None, 2.0, 1.0, 1.0, 60, 60, 6312, 6312),
                 "rows": [test_row]},
        "oracle": {"num_tokens": 50, "num_layers": 12, "avg_exit_layer": 5.0, "layer_speedup": 1.9,
                   "ideal_layer_speedup": 2.1, "histogram": [0, 0, 0, 30, 0, 0, 5, 0, 0, 5, 0, 0, 10]},
    }


def _numbers(text):
    return [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]


# ---- report lines add up ------------------------------------------------------------------

def test_summary_speedup_is_the_ratio_of_the_per_sample_times_it_prints():
    lines = report.summary_lines(_calibration())
    wall = next(line for line in lines if "wall-clock" in line)
    match = re.search(r"wall-clock speedup ([\d.]+)x per sample \(([\d.]+) vs ([\d.]+) ms per sample at full depth\); "
                      r"throughput (\d+) vs (\d+) tokens/s \((\d+) vs (\d+) tokens generated\)", wall)
    assert match, wall
    speedup, ms, full_ms, rate, full_rate, tokens, full_tokens = map(float, match.groups())
    assert speedup == pytest.approx(full_ms / ms, abs=0.01)
    # tokens/s follow from the same times and the token counts printed beside them
    assert rate / full_rate == pytest.approx((tokens / ms) / (full_tokens / full_ms), rel=0.01)
    assert speedup != pytest.approx(rate / full_rate, abs=0.05)  # the case of the issue: they differ
    assert "avg layers run 5.11 of 12" in lines[1] and "avg layers run 5.00 of 12" in lines[-1]


def test_sweep_markdown_columns_add_up_and_name_their_units():
    text = sweep.sweep_markdown(_sweep_table())
    header = next(line for line in text.splitlines() if line.startswith("| policy"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert {"avg layers run", "layer-count speedup", "ms / sample", "full depth ms / sample",
            "wall-clock speedup per sample", "tokens/s"} <= set(columns)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| policy", "|---"))]
    assert len(rows) == 1 + 24
    for line in rows:
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        speedup = float(cells["wall-clock speedup per sample"].rstrip("x"))
        assert speedup == pytest.approx(float(cells["full depth ms / sample"]) / float(cells["ms / sample"]), abs=0.01)
        layers = float(cells["avg layers run"])
        assert float(cells["layer-count speedup"].rstrip("x")) == pytest.approx(12 / layers, abs=0.02)
    assert "exits after layers [2, 5, 8] (0-based" in text and "Partial" not in text
    partial = sweep.sweep_markdown(dict(_sweep_table(), complete=False, rows=_sweep_table()["rows"][:3]))
    assert "**Partial: 3 of 24 settings measured" in partial


def test_calibration_markdown_uses_layers_run(tmp_path):
    text = calibrate.calibration_markdown(_calibration())
    assert "| avg layers run | layer-count speedup | ideal layer-count speedup | tokens |" in text
    assert "avg exit layer" not in text and "1-based" not in text


def test_report_refuses_an_unfinished_calibration(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(dict(_calibration(), complete=False)))
    with pytest.raises(ValueError, match=re.escape(f"--calibration {path}: that run did not finish")):
        report.main(["--calibration", str(path), "--out", str(tmp_path / "report"), "--no-progress"])


# ---- plots --------------------------------------------------------------------------------

def _assert_readable(fig):
    """Every Axes has a title and axis labels; every legend lies outside the data area or in a
    corner the data leave free."""
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
        legend = ax.get_legend()
        if legend is not None:
            box = legend.get_window_extent(renderer)
            frame = ax.get_window_extent(renderer)
            if box.overlaps(frame):
                inverse = ax.transData.inverted()
                (x0, y0), (x1, y1) = inverse.transform([(box.x0, box.y0), (box.x1, box.y1)])
                for line in ax.get_lines():
                    for x, y in line.get_xydata():
                        assert not (x0 <= x <= x1 and y0 <= y <= y1), f"legend of {ax.get_title()!r} covers ({x}, {y})"
                for patch in ax.patches:
                    assert not patch.get_window_extent(renderer).overlaps(box) or patch.get_height() == 0


def test_sweep_plot_is_readable_and_its_threshold_labels_do_not_overlap(tmp_path):
    fig = plots.sweep_figure(_sweep_table())
    _assert_readable(fig)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [text.get_window_extent(renderer) for text in ax.texts]
        assert len(boxes) >= 2, "the sweep's ends must be labelled"
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert len(boxes) < 24  # the dense middle is left unlabelled
    path = plots.plot_sweep(_sweep_table(), tmp_path / "sweep.png")
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_histogram_plot_is_readable(tmp_path):
    histograms = {"recompute @ 0": [0, 0, 0, 90, 0, 0, 5, 0, 0, 5, 0, 0, 0], "oracle": [0] * 12 + [100]}
    _assert_readable(plots.exit_histogram_figure(histograms))  # the default title too
    path = plots.plot_exit_histograms(histograms, tmp_path / "hist.png")
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_exit_quality_plots_are_readable():
    per_layer = [{"layers_run": i + 1, "accuracy": 0.5 + i / 40, "agreement": 0.6 + i / 30} for i in range(12)]
    exits = [{"exit_layer": l, "layers_run": l + 1, "accuracy": 0.66, "agreement": 0.93} for l in (2, 5, 8)]
    fake = {"split": "val", "exit_layers": [2, 5, 8],
            "quality": {"num_tokens": 100, exit_quality.HEAD_ON_LAYER: per_layer, "free": exits, "vanilla": exits},
            "parameters": {"free": {"per_exit": [198000] * 3, "total": 594000},
                           "vanilla": {"per_exit": [65792] * 3, "total": 197376}}}
    _assert_readable(exit_quality.quality_figure(fake))
    fig = exit_quality.parameters_figure(fake)
    _assert_readable(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"exit after layer {l}" for l in (2, 5, 8)]
