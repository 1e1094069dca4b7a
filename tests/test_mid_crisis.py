"""The two-backbone mid-crisis report (lavis_free.reports.mid_crisis)."""
import json

import pytest

from lavis_free.reports.mid_crisis import main, write_mid_crisis


def _report(path, split, accuracies):
    rows = [{"layers_run": i + 1, "accuracy": a, "agreement": a / accuracies[-1]} for i, a in enumerate(accuracies)]
    path.write_text(json.dumps({"config": "x.yaml", "split": split, "quality": {"num_tokens": 10, "head_on_layer": rows}}))
    return str(path)


def test_both_backbones_in_one_table_and_plot(tmp_path, capsys):
    a = _report(tmp_path / "a.json", "val", [0.1, 0.2, 0.9])
    b = _report(tmp_path / "b.json", "val", [0.5, 0.6, 0.7])
    main(["--report", f"frozen_lm={a}", "--report", f"end_to_end={b}", "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "mid_crisis.md").read_text()
    assert "| 1 | 0.100 / 0.111 | 0.500 / 0.714 |" in table
    assert "| 3 | 0.900 / 1.000 | 0.700 / 1.000 |" in table
    assert (tmp_path / "out" / "mid_crisis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "mid_crisis.json").read_text())["end_to_end"]["layers"][0]["accuracy"] == 0.5
    assert "frozen_lm: accuracy / agreement" in capsys.readouterr().out


def test_reports_of_different_splits_are_refused(tmp_path):
    a = _report(tmp_path / "a.json", "val", [0.1, 0.9])
    b = _report(tmp_path / "b.json", "test", [0.1, 0.9])
    with pytest.raises(ValueError, match="different splits"):
        write_mid_crisis({"a": a, "b": b}, str(tmp_path / "out"))
    with pytest.raises(SystemExit):
        main(["--report", "no_path", "--out", str(tmp_path / "o2")])
