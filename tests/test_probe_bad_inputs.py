"""run_scripts/probe_bad_inputs.py: its verdicts come from encoded checks, and one probe's hang,
payload or dead worker is recorded without stopping the others."""
import importlib.util
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe_mod():
    spec = importlib.util.spec_from_file_location("probe_bad_inputs", REPO / "run_scripts/probe_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ctx(probe_mod, tmp_path):
    (tmp_path / "probes").mkdir()
    return probe_mod.Ctx(root=tmp_path, data=str(tmp_path / "data"))


def _probe(probe_mod, fn, expect=(), reject=(), timeout=30, warn_ok=False):
    return probe_mod.Probe(fn.__name__, "test", "tried", fn, tuple(expect), tuple(reject), timeout, warn_ok)


def test_matches_ignores_case_spaces_and_quotes_and_honours_rejects(probe_mod):
    assert probe_mod.matches("exits after layers [2, 5, 8], model has `[1, 4, 7]`", ["[2,5,8]", "[1,4,7]"])
    assert probe_mod.matches("bad kv_policy", [("policy", "confidence")])
    assert not probe_mod.matches("bad value", ["kv_policy"])
    assert not probe_mod.matches("f.pth: retry with weights_only set to `False`", ["f.pth"], probe_mod.UNSAFE_INVITATIONS)


def test_verdicts(probe_mod, ctx):
    def clear(c):
        raise ValueError("model.exits.layout='x': allowed values are free, vanilla")

    def vague(c):
        raise ValueError("something went wrong")

    def internal(c):
        return 1 // 0

    def accepted(c):
        return None

    def warned(c):
        import warnings

        warnings.warn("num_beams=3: exits are not used")

    def hangs(c):
        time.sleep(10)

    def payload(c):
        Path(c.marker).write_text("code ran")
        raise ValueError("model.exits.layout refused")

    expect = ["layout"]
    verdicts = {
        fn.__name__: probe_mod.run_one(_probe(probe_mod, fn, expect, timeout=timeout), ctx)["verdict"]
        for fn, timeout in ((clear, 30), (vague, 30), (internal, 30), (accepted, 30), (hangs, 1), (payload, 30))
    }
    assert verdicts == {"clear": "clear error", "vague": "unhelpful error", "internal": "crash",
                        "accepted": "silently accepted", "hangs": "hang", "payload": "code ran"}
    record = probe_mod.run_one(_probe(probe_mod, warned, ["num_beams"], warn_ok=True), ctx)
    assert record["verdict"] == "handled" and "num_beams" in record["message"]


def test_a_dead_worker_is_a_crash_and_the_next_probe_still_runs(probe_mod, tmp_path):
    (tmp_path / "probes").mkdir()
    unknown = _probe(probe_mod, lambda c: None)  # the worker has no such probe: it dies on the KeyError
    unknown.name = "no_such_probe"
    known = next(p for p in probe_mod.PROBES if p.name == "unknown_model_name")
    results = probe_mod.run_probes([unknown, known], str(tmp_path), str(tmp_path / "data"))
    assert [r["verdict"] for r in results] == ["crash", "clear error"]
    assert "no_such_probe" in results[0]["message"]


def test_docs_group_by_class_and_count_verdicts(probe_mod, tmp_path):
    results = [
        {"class": "security", "tried": "a|b", "verdict": "code ran", "exception": "", "message": "", "note": "x",
         "seconds": 0.1},
        {"class": "runs", "tried": "c", "verdict": "clear error", "exception": "ValueError", "message": "m",
         "seconds": 0.2},
    ]
    probe_mod.write_docs(results, tmp_path / "b.md", tmp_path / "b.json", 1.0)
    text = (tmp_path / "b.md").read_text()
    assert "| code ran | 1 |" in text and "## security (1)" in text and "## runs (1)" in text
    assert "a\\|b" in text and "`ValueError`: m" in text
