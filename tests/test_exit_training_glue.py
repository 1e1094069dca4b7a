"""The glue around the FREE loop: settings, the no-exits fallback, optimizer groups, gradient
averaging and the feature cache's fingerprint (the parts mutation testing found unpinned)."""
import datetime

import pytest
import torch
import torch.distributed as dist
from lavis.tasks.base_task import BaseTask
from omegaconf import OmegaConf
from torch import nn

import lavis_free.tasks.exit_training as exit_training
from lavis_free.exits.feature_cache import FeatureCache, FeatureCacheError, sample_keys
from lavis_free.tasks.captioning import FreeCaptionTask
from lavis_free.tasks.exit_training import ExitTrainer, ExitTrainingSettings, PseudoLabels, _by_group, unwrap
from lavis_free.tasks.vqa import FreeVQATask
from lavis_free.hosts import exits_of

from helpers import tiny_model


@pytest.mark.parametrize("run_cfg", [None, {}, OmegaConf.create({"seed": 1})])
def test_settings_defaults(run_cfg):
    assert ExitTrainingSettings.from_run_config(run_cfg) == ExitTrainingSettings(
        feature_cache=None, feature_cache_dtype="float32", pseudo_max_len=30, pseudo_min_len=1
    )


def test_settings_read_the_run_keys():
    settings = ExitTrainingSettings.from_run_config(OmegaConf.create(
        {"exit_feature_cache": "/tmp/c", "exit_feature_cache_dtype": "float16", "max_len": 7, "min_len": 3}
    ))
    assert settings == ExitTrainingSettings("/tmp/c", "float16", 7, 3)


@pytest.mark.parametrize("value", ["", 3])
def test_settings_refuse_a_cache_that_is_not_a_path(value):
    with pytest.raises(ValueError, match=rf"run\.exit_feature_cache={value!r}: expected a directory path or null"):
        ExitTrainingSettings.from_run_config({"exit_feature_cache": value})


def test_a_task_trains_a_model_without_exits_with_lavis_loop_and_its_arguments(monkeypatch):
    """Stage 1 through a free task: LAVIS's train_epoch, given every argument unchanged."""
    seen = {}
    monkeypatch.setattr(BaseTask, "train_epoch", lambda self, **kwargs: seen.update(kwargs) or {"loss": "0"})
    model = tiny_model()
    task = FreeCaptionTask(num_beams=1, max_len=5, min_len=1, evaluate=False)
    arguments = dict(epoch=3, model=model, data_loader="loader", optimizer="opt", lr_scheduler="sched",
                     scaler="scaler", cuda_enabled=True, log_freq=7, accum_grad_iters=2)
    assert task.train_epoch(**arguments) == {"loss": "0"}
    assert seen == arguments


def test_by_group_wraps_a_single_optimizer_and_checks_every_mapping():
    assert _by_group("opt", "sched", ["generator"]) == ({"generator": "opt"}, {"generator": "sched"})
    groups = ["discriminator", "generator"]
    both = {"discriminator": 1, "generator": 2}
    assert _by_group(both, both, groups) == (both, both)
    with pytest.raises(ValueError, match=r"per group \['discriminator', 'generator'\]; got \['generator'\] and "
                                         r"\['discriminator', 'generator'\]"):
        _by_group({"generator": 2}, both, groups)
    with pytest.raises(ValueError, match=r"got \['discriminator', 'generator'\] and \['generator'\]"):
        _by_group(both, {"generator": 2}, groups)


def test_gradients_and_logs_are_averaged_over_the_processes(monkeypatch):
    """A faked 2-process group whose other rank holds 3x this rank's values: the mean is 2x."""
    monkeypatch.setattr(exit_training, "is_dist_avail_and_initialized", lambda: True)
    monkeypatch.setattr(exit_training, "get_world_size", lambda: 2)
    monkeypatch.setattr(exit_training, "collective_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(exit_training.dist, "all_reduce", lambda tensor: tensor.mul_(4))
    params = [nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2, dtype=torch.float64)),
              nn.Parameter(torch.zeros(3))]
    params[0].grad = torch.arange(6.0).view(2, 3)
    params[2].grad = torch.tensor([1.0, -2.0], dtype=torch.float64)  # params[1] got no gradient
    params[3].grad = torch.tensor([7.0, 8.0, 9.0])  # third of its dtype: its slice starts at 6 + 4
    logs = exit_training._average_across_processes(params, {"loss_a": 1.5, "loss_b": -0.25})
    assert logs == {"loss_a": 3.0, "loss_b": -0.5}
    torch.testing.assert_close(params[0].grad, 2 * torch.arange(6.0).view(2, 3))
    torch.testing.assert_close(params[1].grad, torch.zeros(4))
    torch.testing.assert_close(params[2].grad, torch.tensor([2.0, -4.0], dtype=torch.float64))
    torch.testing.assert_close(params[3].grad, torch.tensor([14.0, 16.0, 18.0]))


def test_unwrap_returns_the_module_inside_ddp(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        inner = nn.Linear(2, 2)
        assert unwrap(nn.parallel.DistributedDataParallel(inner)) is inner
        assert unwrap(inner) is inner
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("setting, first, second", [("prompt", "a photo of", "a picture of"), ("max_txt_len", 32, 16)])
def test_the_feature_cache_is_keyed_by_what_shapes_the_lm_input(tmp_path, setting, first, second):
    """Features depend on the prompt tokens and the truncation: a cache filled under one setting
    must not serve another; the cache's parent directories are created as needed."""
    root = tmp_path / "new" / "parents" / "cache"
    settings = ExitTrainingSettings(feature_cache=str(root))
    exits = {"exits": {"layers": [2, 5]}}
    filled = ExitTrainer(settings).feature_cache(exits_of(tiny_model(**{setting: first}, **exits)))
    manifest = sorted(root.iterdir())
    reused = ExitTrainer(settings).feature_cache(exits_of(tiny_model(**{setting: first}, **exits)))  # same settings: no error
    assert filled.root == reused.root == root and sorted(root.iterdir()) == manifest
    with pytest.raises(FeatureCacheError, match=rf"run\.exit_feature_cache='{root}' was filled .*differs in \['{setting}'\]"):
        ExitTrainer(settings).feature_cache(exits_of(tiny_model(**{setting: second}, **exits)))


def test_a_single_sample_batch_round_trips_through_the_feature_cache(tmp_path):
    host = tiny_model(exits={"layers": [2, 5]})
    samples = {"image": torch.randn(1, 3, 64, 64), "text_input": ["a red circle"]}
    fresh = exits_of(host).backbone_outputs(samples)
    cache = FeatureCache(str(tmp_path / "cache"), "float16", {"backbone": "x"})
    cache.store(sample_keys(samples), fresh)
    loaded = cache.load(sample_keys(samples), torch.device("cpu"), torch.float32)
    assert loaded.final_features.dtype == torch.float32 and loaded.final_features.shape == fresh.final_features.shape
    torch.testing.assert_close(loaded.final_features, fresh.final_features, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cache_entries_are_stored_in_the_cache_dtype(tmp_path, dtype):
    """`exit_feature_cache_dtype: float16` halves the disk: the files hold float16 features."""
    host = tiny_model(exits={"layers": [2, 5]})
    samples = {"image": torch.randn(2, 3, 64, 64), "text_input": ["a red circle", "two squares"]}
    FeatureCache(str(tmp_path / "cache"), dtype, {"backbone": "x"}).store(sample_keys(samples), exits_of(host).backbone_outputs(samples))
    entries = sorted((tmp_path / "cache").glob("*/*.pt"))
    assert len(entries) == 2
    assert {torch.load(e, weights_only=True)["features"].dtype for e in entries} == {getattr(torch, dtype)}


def test_exit_training_text_uses_the_task_prompt():
    task = FreeVQATask(num_beams=1, max_len=5, min_len=1, evaluate=False, num_ans_candidates=1, prompt="Question: {} Answer:")
    samples = task.exit_lm_samples({"text_input": ["what colour?"], "text_output": ["red"]})
    assert samples["text_input"] == ["Question: what colour? Answer:"]
    assert samples["text_output"] == ["red"]


def test_the_exit_loop_gets_the_runner_arguments(monkeypatch):
    seen = {}
    monkeypatch.setattr(ExitTrainer, "train_epoch", lambda self, *args, **kwargs: seen.update(args=args, **kwargs) or {})
    task = FreeCaptionTask(num_beams=1, max_len=5, min_len=1, evaluate=False)
    model = tiny_model(exits={"layers": [2, 5]})
    task.train_epoch(epoch=2, model=model, data_loader="loader", optimizer="opt", lr_scheduler="sched",
                     scaler="scaler", cuda_enabled=True, log_freq=9, accum_grad_iters=1)
    assert seen["args"] == (2, model, "loader", "opt", "sched")
    assert {k: seen[k] for k in ("scaler", "cuda_enabled", "log_freq", "accum_grad_iters")} == {
        "scaler": "scaler", "cuda_enabled": True, "log_freq": 9, "accum_grad_iters": 1}


class _RecordingHost:
    """Stands in for a model's attached exits: records what pseudo labels are generated from."""

    def __init__(self):
        self.calls = []
        self.model = type("Model", (), {"prompt": " a photo of "})()

    def generate_texts(self, images, prompts, **kwargs):
        self.calls.append((len(images), list(prompts), kwargs))
        return [f"text {i}" for i in range(len(prompts))]


def test_pseudo_labels_continue_the_right_prompts_with_the_run_lengths():
    host, labels = _RecordingHost(), PseudoLabels(max_len=7, min_len=2)
    images = torch.randn(2, 3, 8, 8)
    captions = labels.relabel(host, {"image": images, "text_input": ["x", "y"]})
    assert host.calls[-1] == (2, ["a photo of", "a photo of"],
                              {"num_beams": 1, "repetition_penalty": 1.0, "max_length": 7, "min_length": 2, "early_exit": False})
    # the prompt stays input (unscored), the continuation is the target: a T5 host's prompt goes to
    # its encoder and must not be part of the decoder's target
    assert captions["text_input"] == ["a photo of", "a photo of"]
    assert captions["text_output"] == ["text 0", "text 1"]
    questions = {"image": images + 1, "text_input": ["Q: q1 A:", "Q: q2 A:"], "text_output": ["a1", "a2"]}
    answers = labels.relabel(host, questions)
    assert host.calls[-1][1] == ["Q: q1 A:", "Q: q2 A:"]
    assert answers["text_input"] == questions["text_input"] and answers["text_output"] == ["text 0", "text 1"]


def test_the_cache_key_tells_apart_targets_of_one_instruction():
    """Instruction batches share `text_input` across an image's captions: the target is keyed too."""
    images = torch.zeros(2, 3, 8, 8)
    same_instruction = {"image": images, "text_input": ["describe", "describe"], "text_output": ["a red circle", "a big red circle"]}
    keys = sample_keys(same_instruction)
    assert keys[0] != keys[1]
    assert sample_keys({"image": images, "text_input": ["a", "b"]}) == [k.split("\n")[0] + "\na" for k in keys[:1]] + [keys[1].split("\n")[0] + "\nb"]
