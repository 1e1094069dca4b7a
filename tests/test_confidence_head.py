"""The learned exit check end to end: fitting on a project, the exits file it writes, decoding
with it (one head application per token), and the AUC it reports.

The rule itself (which rows leave, that the head runs only on them) is pinned on a hand-made
stub in test_exit_rule.py; here the model is `tiny` with exits after layers 2, 5, 8.
"""
import json

import pytest
import torch
from omegaconf import OmegaConf

from lavis_free.evaluation import fit_confidence
from lavis_free.exits.options import ExitConfigError
from lavis_free.hosts import exits_of
from lavis_free.models.blip2_opt_free import Blip2OPTFree


@pytest.fixture(scope="module")
def fitted(project_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("confidence")
    paths = fit_confidence.main(["--cfg-path", project_yaml, "--max-samples", "10", "--val-samples", "6",
                                 "--epochs", "30", "--threads", "1", "--no-progress", "--out", str(out)])
    return paths, json.loads(open(paths["json"]).read())


def tiny_model(checkpoint=None):
    cfg = OmegaConf.merge(OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model,
                          {"exits": {"layers": [2, 5, 8]}})
    torch.manual_seed(42)
    model = Blip2OPTFree.from_config(cfg).eval()
    if checkpoint is not None:
        exits_of(model).load_checkpoint(checkpoint)
    return model


def test_fitting_learns_and_reports_every_exit(fitted):
    _, report = fitted
    assert [row["layer"] for row in report["exits"]] == [2, 5, 8]
    for row in report["exits"]:
        assert row["train_tokens"] > 0 and row["val_tokens"] > 0
        assert 0.0 <= row["val_agreement"] <= 1.0
        assert row["loss_per_epoch"][-1] < row["loss_per_epoch"][0]
        for check in ("learned", "max_prob"):
            assert [t["threshold"] for t in row[check]["thresholds"]] == [0.5, 0.8, 0.9]
            shares = [t["leave_share"] for t in row[check]["thresholds"]]
            assert shares == sorted(shares, reverse=True)  # a higher threshold lets fewer tokens leave


def test_the_exits_file_carries_fitted_heads_and_decodes_with_one_head_per_token(fitted):
    paths, _ = fitted
    plain, loaded = tiny_model(), tiny_model(paths["checkpoint"])
    assert not bool(plain.early_exits.confidence_fitted) and bool(loaded.early_exits.confidence_fitted)
    assert not torch.equal(plain.early_exits.confidence_heads[0].net[0].weight,
                           loaded.early_exits.confidence_heads[0].net[0].weight)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    samples = {"image": images}
    _, learned = loaded.generate(samples, num_beams=1, max_length=6, exit_threshold=0.5, confidence="learned",
                                 return_exit_stats=True)
    _, softmax = loaded.generate(samples, num_beams=1, max_length=6, exit_threshold=0.5, confidence="max_prob",
                                 return_exit_stats=True)
    # learned: the head runs once per token (at the exit it leaves at, or at full depth)
    assert all(h == 1 for row in learned["heads_run"] for h in row)
    # max_prob: every check that ran read the head (more than one head for tokens past an exit)
    for heads, blocks in zip(softmax["heads_run"], softmax["exit_blocks_run"]):
        assert all(h >= b for h, b in zip(heads, blocks)) and sum(heads) > len(heads)
    _, first = loaded.generate(samples, num_beams=1, max_length=6, exit_threshold=0.0, confidence="learned",
                               return_exit_stats=True)
    assert all(layers == 3 for row in first["exit_layers"] for layers in row[1:])  # threshold 0: the first exit
    with pytest.raises(ExitConfigError, match="confidence='learned'"):
        plain.generate(samples, num_beams=1, max_length=6, exit_threshold=0.5, confidence="learned")


def test_roc_auc_counts_ties_as_half():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.1])
    agree = torch.tensor([True, False, True, False])
    # pairs (agreeing, not): (0.9, 0.8) 1, (0.9, 0.1) 1, (0.8, 0.8) 0.5, (0.8, 0.1) 1 -> 3.5 / 4
    assert fit_confidence.roc_auc(scores, agree) == pytest.approx(0.875)
    assert fit_confidence.roc_auc(scores, torch.ones(4, dtype=torch.bool)) is None


def test_bad_sample_counts_are_refused(project_yaml, tmp_path):
    with pytest.raises(ValueError, match="--max-samples \\+ --val-samples"):
        fit_confidence.main(["--cfg-path", project_yaml, "--max-samples", "10", "--val-samples", "100",
                             "--no-progress", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        fit_confidence.main(["--cfg-path", project_yaml, "--epochs", "0", "--out", str(tmp_path)])
