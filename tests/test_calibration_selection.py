"""Threshold calibration end to end on a model whose caption quality depends on the threshold.

tests/test_sweep_calibrate.py runs the commands on the random `tiny` model, whose captions are
noise: CIDEr is 0.000 at every setting, so any threshold is "within tolerance" and its selection
assertions hold whatever is selected. Here the backbone is the trained `shapes_tiny` and its
exits are untrained (`init: last`, no exits checkpoint): a copy of the last decoder layer read
after layers 2, 5 and 8. Decoding the 8 shared val images (seed 0) with `max_prob`:
  - thresholds 0.0-0.2: most tokens leave at the first exits, whose guesses are often wrong:
    CIDEr 0.03-0.15 against 0.82 at full depth;
  - thresholds 0.85-0.99: only confident tokens leave; `recompute` matches full depth from 0.85
    on, `propagate` (projected KV) loses one caption at 0.85 and 0.9 (CIDEr 0.73) and matches
    from 0.95 on.
Thresholds 0.3-0.8 are left out of the grid: there CIDEr on 8 images wobbles around full depth
(above and below), which would make the "expected" answer depend on the rule's reading rather
than on its correctness. Every expectation is recomputed here from the decoded rows, by a
loop that shares no code with the selection; the facts above are asserted as preconditions.
"""
import json

import pytest
from omegaconf import OmegaConf

from lavis_free.evaluation import calibrate
from lavis_free.evaluation.calibrate import select_threshold

GRID = [0.0, 0.1, 0.2, 0.85, 0.9, 0.95, 0.99]
POLICIES = ["recompute", "propagate"]
TOLERANCE = 0.05  # not the CLI's default (0.01), so an ignored --tolerance would show


@pytest.fixture(scope="module")
def varied_yaml(shapes_data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("varied") / "project.yaml"
    OmegaConf.save(OmegaConf.create({
        "model": {"arch": "blip2_opt_free", "model_type": "shapes_tiny", "exits_checkpoint": "",
                  "exits": {"layers": [2, 5, 8], "init": "last"}},
        "datasets": {"shapes_caption": {"build_info": {"storage": shapes_data_dir}}},
        "run": {"task": "free_captioning", "caption_scorers": ["bleu", "cider"], "batch_size_eval": 8,
                "num_beams": 1, "max_len": 20, "min_len": 1, "seed": 42},
    }), path)
    return str(path)


def _calibrate(yaml, out, tolerance, policies, grid=GRID):
    paths = calibrate.main(["--cfg-path", yaml, "--calib-split", "val", "--test-split", "test",
                            "--thresholds", *map(str, grid), "--policies", *policies, "--tolerance", str(tolerance),
                            "--confidence", "max_prob",
                            "--threads", "1", "--out", str(out), "--no-progress"])
    with open(paths["json"]) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def calibration(varied_yaml, tmp_path_factory):
    return _calibrate(varied_yaml, tmp_path_factory.mktemp("calibration"), TOLERANCE, POLICIES)


def _curve(table, policy):
    """{threshold: row} of one policy, from the decoded sweep."""
    return {r["exit_threshold"]: r for r in table["rows"] if r["kv_policy"] == policy}


def _lowest_within(curve, full_quality, tolerance):
    """By hand: the smallest threshold whose CIDEr is at most `tolerance` (relative) below full depth."""
    ok = [t for t, row in curve.items() if full_quality - row["quality"] <= tolerance * full_quality]
    return min(ok) if ok else None


def test_quality_is_lower_at_low_thresholds_and_full_at_high_ones(calibration):
    """The preconditions that make the selection checkable (they fail if the threshold is ignored,
    if every token exits, or if rows carry the wrong threshold)."""
    table = calibration["calibration"]
    full = table["full_depth"]
    assert table["split"] == "val" and table["num_samples"] == 8 and full["avg_exit_layer"] == 12
    assert full["quality"] > 0.5, "full depth must caption well for drops to mean anything"
    for policy in POLICIES:
        curve = _curve(table, policy)
        assert sorted(curve) == GRID
        for t in (0.0, 0.1, 0.2):
            assert curve[t]["quality"] < 0.5 * full["quality"], (policy, t, curve[t]["quality"])
        assert curve[0.99]["quality"] == full["quality"]
        assert curve[0.99]["avg_exit_layer"] < 12, "tokens still exit at 0.99: equal quality is not full depth by construction"
        layers = [curve[t]["avg_exit_layer"] for t in GRID]
        assert layers == sorted(layers) and layers[0] < 4, (policy, layers)
    assert _curve(table, "recompute")[0.85]["quality"] == full["quality"]
    assert 0.05 < 1 - _curve(table, "propagate")[0.85]["quality"] / full["quality"] < 0.12


def test_calibration_selects_per_policy_the_lowest_threshold_within_tolerance(calibration):
    table = calibration["calibration"]
    full = table["full_depth"]["quality"]
    expected = {p: _lowest_within(_curve(table, p), full, TOLERANCE) for p in POLICIES}
    assert calibration["selected"] == expected
    for policy, threshold in expected.items():
        assert GRID[0] < threshold < GRID[-1], f"{policy}: {threshold} is not strictly inside the grid"
        below = [t for t in GRID if t < threshold]
        assert all(1 - _curve(table, policy)[t]["quality"] / full > TOLERANCE for t in below)
    assert expected["recompute"] < expected["propagate"], "the policies' curves must select differently"
    # the test split is then decoded at exactly the selected settings (and at full depth, its own reference)
    test = calibration["test"]
    assert test["split"] == "test" and test["complete"] and calibration["complete"]
    assert [(r["kv_policy"], r["exit_threshold"]) for r in test["rows"]] == list(expected.items())
    for row in test["rows"]:
        assert row["relative_drop"] == pytest.approx(1 - row["quality"] / test["full_depth"]["quality"])
        assert row["avg_exit_layer"] < 12


@pytest.mark.parametrize("tolerance", [0.0, 0.01, 0.05, 0.12, 0.9, 0.96, 0.99])
def test_select_threshold_on_the_decoded_rows_matches_the_hand_rule(calibration, tolerance):
    """`select_threshold` on the real sweep rows; 0.0 keeps only rows equal to full depth."""
    table = calibration["calibration"]
    full = table["full_depth"]["quality"]
    for policy in POLICIES:
        rows = [r for r in table["rows"] if r["kv_policy"] == policy]
        chosen = select_threshold(rows, full, tolerance)
        assert chosen is not None and chosen["exit_threshold"] == _lowest_within(_curve(table, policy), full, tolerance)


def test_looser_tolerances_select_lower_thresholds(calibration):
    table = calibration["calibration"]
    full = table["full_depth"]["quality"]
    for policy in POLICIES:
        rows = [r for r in table["rows"] if r["kv_policy"] == policy]
        picks = [select_threshold(rows, full, tol)["exit_threshold"] for tol in (0.0, 0.12, 0.9, 0.96, 0.99)]
        assert picks == sorted(picks, reverse=True), (policy, picks)
        assert picks[-1] == 0.0 and picks[2] == 0.2 and picks[0] >= 0.85, (policy, picks)
    assert [select_threshold(_curve(table, "propagate").values(), full, tol)["exit_threshold"] for tol in (0.05, 0.12)] \
        == [0.95, 0.85]


def test_a_looser_tolerance_end_to_end_selects_a_lower_threshold(varied_yaml, calibration, tmp_path):
    """`propagate` again with --tolerance 0.12: the one-caption loss at 0.85 (about 11%) is now
    accepted, so calibration moves below what 0.05 selected, and the test split follows (a shorter
    grid, still with a row below the answer, keeps it quick)."""
    grid = [0.2, 0.85, 0.95, 0.99]
    looser = _calibrate(varied_yaml, tmp_path, 0.12, ["propagate"], grid)
    table = looser["calibration"]
    expected = _lowest_within(_curve(table, "propagate"), table["full_depth"]["quality"], 0.12)
    assert looser["selected"] == {"propagate": expected}
    assert grid[0] < expected < calibration["selected"]["propagate"]
    assert [(r["kv_policy"], r["exit_threshold"]) for r in looser["test"]["rows"]] == [("propagate", expected)]
