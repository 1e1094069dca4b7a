"""FREE exit training: gradients, alternation, loss modes, non-finite losses, feature cache.

The loop-level tests use the random `tiny` model and hand-made batches (fast); the runner-level
tests (resume, 2 processes) go through train.py on the shared generated shapes data.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lavis_free.common.launch import build_runner, parse_args
from lavis_free.exits import losses
from lavis_free.exits.feature_cache import FeatureCache, FeatureCacheError, sample_keys
from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.runners import optim
from lavis_free.hosts import exits_of
from lavis_free.tasks.exit_training import (
    DISCRIMINATOR,
    GENERATOR,
    ExitTrainer,
    ExitTrainingSettings,
    NonFiniteLossError,
    answer_lm_samples,
    discriminator_step,
    generator_step,
    train_step,
)

from helpers import free_port

EXIT_LAYERS = [2, 5, 8]
RUN = {"init_lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.0, "lr_sched": "linear_warmup_cosine_lr"}


def exit_model(**exits):
    cfg = OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model
    cfg = OmegaConf.merge(cfg, {"exits": {"layers": EXIT_LAYERS, **exits}})
    torch.manual_seed(0)
    return Blip2OPTFree.from_config(cfg).train()


def optimizers_for(model):
    groups = optim.parameter_groups(model)
    settings = optim.group_settings(RUN, list(groups))
    return {name: optim.build_optimizer(params, settings[name]) for name, params in groups.items()}


def batch(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    texts = ["a red circle", "two blue squares at the top left", "one green triangle", "a small yellow star on the right"]
    return {
        "image": torch.randn(n, 3, 64, 64, generator=gen),
        "text_input": [texts[i % len(texts)] for i in range(n)],
        "image_id": torch.arange(n) + 100 * seed,
    }


@pytest.fixture(scope="module")
def free_model():
    return exit_model()


@pytest.fixture(scope="module")
def backbone(free_model):
    return exits_of(free_model).backbone_outputs(batch())


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def grads(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def names(model, prefix):
    return {n for n, p in model.named_parameters() if n.startswith(prefix)}


def test_backbone_is_frozen_and_outputs_need_no_autograd(free_model, backbone):
    trainable = {n for n, p in free_model.named_parameters() if p.requires_grad}
    # exits and discriminators train; the confidence heads are fitted afterwards (fit_confidence)
    assert trainable == names(free_model, "early_exits.") - names(free_model, "early_exits.confidence_heads.")
    assert names(free_model, "early_exits.exits.") <= trainable
    assert not any(t.requires_grad for t in [*backbone.exit_inputs, backbone.final_features])
    assert backbone.final_features.grad_fn is None


def test_gradients_reach_only_discriminators_then_only_exits(backbone):
    model = exit_model()
    opts = optimizers_for(model)
    outputs = model.early_exits.exit_outputs(exits_of(model).adapter, backbone)
    discriminator_step(exits_of(model), outputs, backbone, opts[DISCRIMINATOR], 0, 0)
    assert grads(model) == names(model, "early_exits.discriminators.")
    model.zero_grad(set_to_none=True)
    generator_step(exits_of(model), outputs, backbone, opts[GENERATOR], 0, 0)
    assert grads(model) == names(model, "early_exits.exits.")
    assert all(p.requires_grad for p in model.early_exits.discriminators.parameters())


def test_alternation_steps_only_the_group_of_each_phase(backbone):
    model = exit_model()
    opts = optimizers_for(model)
    outputs = model.early_exits.exit_outputs(exits_of(model).adapter, backbone)
    before = snapshot(model)
    discriminator_step(exits_of(model), outputs, backbone, opts[DISCRIMINATOR], 0, 0)
    assert changed(before, model) == names(model, "early_exits.discriminators.")
    before = snapshot(model)
    logs = generator_step(exits_of(model), outputs, backbone, opts[GENERATOR], 0, 0)
    assert changed(before, model) == names(model, "early_exits.exits.")
    assert {"loss_adv", "loss_gen", "loss_token_exit0", "loss_token_exit2"} <= set(logs)


def test_generator_step_plays_against_the_updated_discriminator(backbone):
    """Features computed once serve both phases: the G loss is that of the D after its steps."""
    model = exit_model(loss={"disc_steps": 2, "adv_weight": 1.0})
    opts = optimizers_for(model)
    exits = model.early_exits
    with torch.no_grad():
        features = exits.exit_outputs(exits_of(model).adapter, backbone).features
    initial_discs = copy.deepcopy(exits.discriminators)
    stats = train_step(exits_of(model), backbone, opts, 0, 0)
    assert opts[DISCRIMINATOR].state_dict()["state"][0]["step"].item() == 2
    assert opts[GENERATOR].state_dict()["state"][0]["step"].item() == 1
    mask = losses.scored_mask(backbone.labels)

    def adversarial(discs):
        with torch.no_grad():
            return torch.stack([losses.generator_adversarial_loss(d(f), mask) for d, f in zip(discs, features)]).mean().item()

    assert stats["loss_adv"] == pytest.approx(adversarial(exits.discriminators), rel=1e-5)
    assert stats["loss_adv"] != pytest.approx(adversarial(initial_discs), rel=1e-3)


@pytest.mark.parametrize("layout", ["no_adversarial", "vanilla"])
def test_baselines_have_one_group_and_train_only_their_exits(backbone, layout):
    model = exit_model(layout=layout)
    opts = optimizers_for(model)
    assert set(opts) == {GENERATOR} and len(model.early_exits.discriminators) == 0
    before = snapshot(model)
    stats = train_step(exits_of(model), backbone, opts, 0, 0)
    assert changed(before, model) == names(model, "early_exits.exits.")
    assert "loss_adv" not in stats and "loss_disc" not in stats


def test_distill_mode_trains_without_labels(backbone):
    model = exit_model(loss={"mode": "distill", "kd_temperature": 2.0})
    stats = train_step(exits_of(model), backbone, optimizers_for(model), 0, 0)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["loss_token_exit0"] >= 0


def test_pseudo_labels_are_generated_once_per_image_at_full_depth(monkeypatch):
    model = exit_model(loss={"mode": "pseudo"})
    calls = []
    host = exits_of(model)
    real = host.generate_texts

    def spy(image, prompts, **kwargs):
        calls.append((image.shape[0], kwargs))
        return real(image, prompts, **kwargs)

    monkeypatch.setattr(host, "generate_texts", spy)
    trainer = ExitTrainer(ExitTrainingSettings(pseudo_max_len=5))
    first = trainer.lm_samples(host, batch(), lambda s: s)
    again = trainer.lm_samples(host, batch(), lambda s: s)
    assert len(calls) == 1 and calls[0][0] == 4
    assert calls[0][1]["num_beams"] == 1 and calls[0][1]["early_exit"] is False
    assert first["text_output"] == again["text_output"] != batch()["text_input"]
    trainer.lm_samples(exits_of(model), batch(seed=2), lambda s: s)
    assert len(calls) == 2


def test_answers_are_scored_but_their_prompts_are_not(free_model):
    samples = {**batch(2), "text_input": ["what colour is the circle?", "how many squares?"],
               "answer": ["red", "blue", "two"], "weight": torch.tensor([0.7, 0.3, 1.0]), "n_answers": torch.tensor([2, 1])}
    lm = answer_lm_samples(samples, "Question: {} Answer:")
    assert lm["text_input"] == ["Question: what colour is the circle? Answer:", "Question: how many squares? Answer:"]
    assert lm["text_output"] == ["red", "two"]
    outputs = ExitTrainer(ExitTrainingSettings()).backbone_outputs(exits_of(free_model), lm)
    scored = [free_model.opt_tokenizer.decode(row[row != -100]) for row in outputs.labels]
    assert [s.strip() for s in scored] == [" red\n".strip(), " two\n".strip()]


def test_non_finite_losses_stop_training_and_name_the_loss(backbone):
    model = exit_model()
    opts = optimizers_for(model)
    bad = copy.copy(backbone)
    bad.final_features = torch.full_like(backbone.final_features, float("nan"))
    before = snapshot(model)
    with pytest.raises(NonFiniteLossError, match=r"loss_disc=nan in the discriminator step at epoch 3, iteration 7"):
        train_step(exits_of(model), bad, opts, 3, 7)
    assert not changed(before, model)

    bad = copy.copy(backbone)
    bad.exit_inputs = [torch.full_like(x, float("inf")) for x in backbone.exit_inputs]
    vanilla = exit_model(layout="vanilla")
    with pytest.raises(NonFiniteLossError, match=r"loss_token_exit0=nan in the generator step at epoch 0, iteration 2"):
        train_step(exits_of(vanilla), bad, optimizers_for(vanilla), 0, 2)


def _valid(outputs):
    mask = outputs.attention_mask.bool()
    return [x[mask] for x in [*outputs.exit_inputs, outputs.final_features, outputs.labels]]


def test_feature_cache_returns_a_fresh_computation(free_model, tmp_path):
    samples = batch(4, seed=3)
    fresh = exits_of(free_model).backbone_outputs(samples)
    assert not fresh.attention_mask.all(), "the batch must hold padding"
    cache = FeatureCache(str(tmp_path / "cache"), "float32", {"backbone": "x"})
    keys = sample_keys(samples)
    assert cache.load(keys, torch.device("cpu"), torch.float32) is None
    cache.store(keys, fresh)
    # a batch in another order and composition, re-padded from per-sample files
    order = [2, 0, 3]
    loaded = cache.load([keys[i] for i in order], torch.device("cpu"), torch.float32)
    subset = exits_of(free_model).backbone_outputs({k: (v[order] if torch.is_tensor(v) else [v[i] for i in order]) for k, v in samples.items()})
    for a, b in zip(_valid(loaded), _valid(subset)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    model = free_model.early_exits
    got = model.generator_loss(exits_of(free_model).adapter, model.exit_outputs(exits_of(free_model).adapter, loaded), loaded)[1]
    want = model.generator_loss(exits_of(free_model).adapter, model.exit_outputs(exits_of(free_model).adapter, subset), subset)[1]
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key

    with pytest.raises(FeatureCacheError, match="differs in \\['backbone'\\]"):
        FeatureCache(str(tmp_path / "cache"), "float32", {"backbone": "y"})
    with pytest.raises(FeatureCacheError, match="differs in \\['dtype'\\]"):
        FeatureCache(str(tmp_path / "cache"), "float16", {"backbone": "x"})


def test_trainer_fills_the_cache_once_and_reads_it_after(free_model, tmp_path):
    trainer = ExitTrainer(ExitTrainingSettings(feature_cache=str(tmp_path / "c"), feature_cache_dtype="float16"))
    samples = batch(4, seed=4)
    first = trainer.backbone_outputs(exits_of(free_model), samples)
    second = trainer.backbone_outputs(exits_of(free_model), samples)
    cache = trainer.feature_cache(exits_of(free_model))
    assert (cache.misses, cache.hits) == (1, 1)
    for a, b in zip(_valid(first), _valid(second)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    keys = sample_keys(samples)
    assert len(set(keys)) == 4 and sample_keys(samples) == keys
    changed_image = {**samples, "image": samples["image"].clone()}
    changed_image["image"][0, 0, 0, 0] += 1
    assert sample_keys(changed_image)[1:] == keys[1:] and sample_keys(changed_image)[0] != keys[0]


def test_bad_cache_settings_are_named():
    with pytest.raises(ValueError, match="run.exit_feature_cache_dtype"):
        ExitTrainingSettings.from_run_config({"exit_feature_cache": "x", "exit_feature_cache_dtype": "int8"})
    with pytest.raises(ValueError, match="run.exit_feature_cache="):
        ExitTrainingSettings.from_run_config({"exit_feature_cache": 3})


# ---- through train.py and runner_free --------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "projects" / "free" / "shapes_caption.yaml"


def train_options(data_dir, *extra):
    return [
        "model.model_type=tiny", "model.load_finetuned=False", "model.exits_checkpoint=", "model.exits.layers=[2,5,8]",
        "model.exits.layout=free", f"datasets.shapes_caption.build_info.storage={data_dir}", "run.max_epoch=1",
        "run.batch_size_train=8", "run.valid_splits=[]", "run.test_splits=[]", "run.log_freq=100", *extra,
    ]


def build(job_id, options):
    return build_runner(parse_args("test", ["--cfg-path", str(PROJECT), "--job-id", job_id, "--options", *options]))


def test_resume_restores_both_optimizers_and_continues(shapes_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = build("first", train_options(shapes_data_dir, "run.exit_feature_cache=cache"))
    first.train()
    path = Path(first.output_dir) / "checkpoint_0.pth"
    saved = torch.load(path, weights_only=True)
    assert set(saved["optimizers"]) == {GENERATOR, DISCRIMINATOR}
    assert not any(k.startswith("opt_model.") or k.startswith("visual_encoder.") for k in saved["model"])
    steps = len(first.train_loader)
    assert (tmp_path / "cache" / "manifest.json").is_file()

    resumed = build("resumed", train_options(shapes_data_dir, "run.max_epoch=2", f"run.resume_ckpt_path={path}", "run.exit_feature_cache=cache"))
    resumed._load_checkpoint(str(path))
    for group in (GENERATOR, DISCRIMINATOR):
        restored = resumed.optimizers[group].state_dict()["state"]
        for index, state in saved["optimizers"][group]["state"].items():
            assert torch.equal(restored[index]["exp_avg"], state["exp_avg"]), (group, index)
    resumed.train()
    continued = torch.load(Path(resumed.output_dir) / "checkpoint_1.pth", weights_only=True)
    assert continued["epoch"] == 1
    for group in (GENERATOR, DISCRIMINATOR):
        assert continued["optimizers"][group]["state"][0]["step"].item() == 2 * steps, group
    assert resumed.task.exit_trainer.feature_cache(exits_of(resumed.model)).hits == steps


def test_two_gloo_processes_train_exits(shapes_data_dir, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
        str(REPO / "train.py"), "--cfg-path", str(PROJECT), "--job-id", "ddp",
        "--options", *train_options(shapes_data_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Train exits (free, supervised)" in log
    assert "trainable-weight checksum agrees across 2 ranks" in log
    checkpoint = torch.load(tmp_path / "output" / "shapes_caption" / "ddp" / "checkpoint_0.pth", weights_only=True)
    assert set(checkpoint["optimizers"]) == {GENERATOR, DISCRIMINATOR}


