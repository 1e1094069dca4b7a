"""runner_free in one process, with toy models: training, checkpoints, resume, optimizer groups, errors."""
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from lavis.tasks.base_task import BaseTask
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset, default_collate

from lavis_free.runners.runner_free import RunnerFree


class ToyData(Dataset):
    def __init__(self, n):
        gen = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}

    def collater(self, samples):
        return default_collate(samples)


class ToyModel(BaseModel):
    """A frozen backbone and a trainable head holding a BatchNorm (buffers to checkpoint)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 8).requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

    def forward(self, samples):
        return {"loss": F.cross_entropy(self.head(self.backbone(samples["x"])), samples["y"])}


class ToyTask(BaseTask):
    """LAVIS's own training loop; a validation metric that never improves (as in smoke runs)."""

    def valid_step(self, model, samples):
        return [{"loss": model(samples)["loss"].item()}]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        return {"agg_metrics": 0.0, "batches": len(val_result)}


class ToyGanModel(ToyModel):
    def __init__(self):
        super().__init__()
        self.disc = nn.Linear(2, 1)

    def forward(self, samples):
        logits = self.head(self.backbone(samples["x"]))
        return {"loss": F.cross_entropy(logits, samples["y"]) + self.disc(logits).pow(2).mean()}

    def optimizer_groups(self):
        return {"generator": list(self.head.parameters()), "discriminator": list(self.disc.parameters())}


class ToyGanTask(ToyTask):
    """Alternates one step per optimizer group, as FREE's exit training does."""

    def train_epoch(self, epoch, model, data_loader, optimizer, lr_scheduler, **kwargs):
        assert isinstance(optimizer, dict) and isinstance(lr_scheduler, dict)
        for step in range(len(data_loader)):
            samples = next(data_loader)
            for group in ("discriminator", "generator"):
                lr_scheduler[group].step(cur_epoch=epoch, cur_step=step)
                optimizer[group].zero_grad()
                model(samples)["loss"].backward()
                optimizer[group].step()
        return {"steps": len(data_loader)}


class ToyConfig:
    """The part of lavis.common.config.Config a runner reads."""

    def __init__(self, **run):
        base = dict(
            task="toy", device="cpu", output_dir="output/toy", max_epoch=2, init_lr=1e-2, min_lr=1e-4,
            warmup_lr=1e-3, warmup_steps=2, weight_decay=0.05, lr_sched="linear_warmup_cosine_lr",
            batch_size_train=4, batch_size_eval=4, num_workers=0, seed=0, distributed=False,
            train_splits=["train"], valid_splits=[], test_splits=[], evaluate=False, log_freq=1,
        )
        self.config = OmegaConf.create({"run": {**base, **run}, "model": {}, "datasets": {}})

    @property
    def run_cfg(self):
        return self.config.run

    def to_dict(self):
        return OmegaConf.to_container(self.config)


def toy_datasets():
    return {"toy": {"train": ToyData(16), "val": ToyData(8), "test": ToyData(8)}}


def make_runner(job_id, model=None, task=None, **run):
    torch.manual_seed(0)
    return RunnerFree(ToyConfig(**run), task or ToyTask(), model or ToyModel(), toy_datasets(), job_id)


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_trains_with_validation_and_falls_back_when_metric_never_improves(in_tmp_dir, caplog):
    runner = make_runner("job", valid_splits=["val"], test_splits=["test"])
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        runner.train()

    output_dir = in_tmp_dir / "output" / "toy" / "job"
    assert Path(runner.output_dir) == output_dir
    assert registry.get_path("result_dir") == str(output_dir / "result")
    assert not str(output_dir).startswith(registry.get_path("library_root"))
    assert "No " in caplog.text and "checkpoint_best.pth" in caplog.text
    assert not (output_dir / "checkpoint_best.pth").exists()

    after = runner.model.state_dict()
    assert torch.equal(after["backbone.weight"], before["backbone.weight"])
    assert not torch.equal(after["head.0.weight"], before["head.0.weight"])

    checkpoint = torch.load(output_dir / "checkpoint_latest.pth", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert set(checkpoint["model"]) == {
        "head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias", "head.1.running_mean",
        "head.1.running_var", "head.1.num_batches_tracked", "head.2.weight", "head.2.bias",
    }
    logged = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines() if line.startswith('{"train')]
    assert [set(entry) >= {"train_loss", "train_lr"} for entry in logged] == [True, True]


def test_resume_restores_weights_optimizer_and_epoch(in_tmp_dir, caplog):
    first = make_runner("first", max_epoch=1)
    first.train()
    path = Path(first.output_dir) / "checkpoint_0.pth"
    assert path.is_file()

    second = make_runner("second", max_epoch=2, resume_ckpt_path=str(path))
    second._load_checkpoint(str(path))
    assert second.start_epoch == 1
    for key, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value), key
    state_first, state_second = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert state_first.keys() == state_second.keys() and len(state_first) > 0
    for index in state_first:
        assert torch.equal(state_first[index]["exp_avg"], state_second[index]["exp_avg"])

    resumed = make_runner("resumed", max_epoch=2, resume_ckpt_path=str(path))
    with caplog.at_level(logging.WARNING):
        resumed.train()
    assert "'max_epoch': (1, 2)" in caplog.text  # the config's new schedule wins, and says so
    out = Path(resumed.output_dir)
    assert (out / "checkpoint_1.pth").is_file() and not (out / "checkpoint_0.pth").exists()
    assert torch.load(out / "checkpoint_1.pth", weights_only=True)["epoch"] == 1


def test_resume_rejects_checkpoint_of_another_model(in_tmp_dir):
    runner = make_runner("run", max_epoch=1)
    runner.train()
    path = Path(runner.output_dir) / "checkpoint_0.pth"
    checkpoint = torch.load(path, weights_only=True)

    checkpoint["model"]["extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, in_tmp_dir / "extra.pth")
    with pytest.raises(ValueError, match="extra.weight"):
        make_runner("extra")._load_checkpoint(str(in_tmp_dir / "extra.pth"))

    del checkpoint["model"]["extra.weight"], checkpoint["model"]["head.2.bias"]
    torch.save(checkpoint, in_tmp_dir / "missing.pth")
    with pytest.raises(ValueError, match="lacks trainable keys.*head.2.bias"):
        make_runner("missing")._load_checkpoint(str(in_tmp_dir / "missing.pth"))


def test_two_runners_in_one_process_keep_separate_output_dirs(in_tmp_dir):
    one = make_runner("one", max_epoch=1)
    two = make_runner("two", max_epoch=1, output_dir=str(in_tmp_dir / "elsewhere"))
    one.train()
    two.train()
    assert (in_tmp_dir / "output" / "toy" / "one" / "checkpoint_0.pth").is_file()
    assert (in_tmp_dir / "elsewhere" / "two" / "checkpoint_0.pth").is_file()
    assert registry.get_path("output_dir") == str(in_tmp_dir / "elsewhere" / "two")


def test_optimizer_groups_get_own_optimizers_saved_and_restored(in_tmp_dir):
    overrides = {"discriminator": {"init_lr": 0.5, "lr_sched": "linear_warmup_step_lr"}}
    runner = make_runner("gan", model=ToyGanModel(), task=ToyGanTask(), max_epoch=1, optim=overrides)
    assert set(runner.optimizers) == set(runner.lr_schedulers) == {"generator", "discriminator"}
    assert runner.optimizers["discriminator"].defaults["lr"] == 0.5
    assert runner.optimizers["generator"].defaults["lr"] == 1e-2
    assert type(runner.lr_schedulers["discriminator"]).__name__ == "LinearWarmupStepLRScheduler"
    with pytest.raises(AttributeError, match="optimizers"):
        runner.optimizer
    runner.train()

    path = Path(runner.output_dir) / "checkpoint_0.pth"
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["optimizers"]) == {"generator", "discriminator"}
    assert checkpoint["lr_schedulers"]["discriminator"]["init_lr"] == 0.5

    resumed = make_runner("gan2", model=ToyGanModel(), task=ToyGanTask(), max_epoch=2, optim=overrides)
    resumed._load_checkpoint(str(path))
    for group in ("generator", "discriminator"):
        saved = runner.optimizers[group].state_dict()["state"]
        loaded = resumed.optimizers[group].state_dict()["state"]
        assert saved.keys() == loaded.keys() and len(saved) > 0
        for index in saved:
            assert torch.equal(saved[index]["exp_avg_sq"], loaded[index]["exp_avg_sq"])
            assert saved[index]["step"] == loaded[index]["step"]


@pytest.mark.parametrize(
    "run, message",
    [
        ({"optim": {"generator": {"init_lrr": 1.0}}}, r"run\.optim\.generator\.init_lrr: unknown key"),
        ({"optim": {"critic": {"init_lr": 1.0}}}, r"run\.optim\.critic: no optimizer group.*discriminator"),
        ({"lr_sched": "cosine"}, r"run\.lr_sched: 'cosine' is not a registered LR scheduler"),
        ({"init_lr": None}, r"run\.init_lr is required"),
        ({"weight_decay": "a lot"}, r"run\.weight_decay: 'a lot' is not a valid float"),
    ],
)
def test_bad_optimizer_config_is_an_error_naming_the_key(in_tmp_dir, run, message):
    runner = make_runner("bad", model=ToyGanModel(), task=ToyGanTask(), **run)
    with pytest.raises(ValueError, match=message):
        runner.train()


def test_optimizer_groups_must_cover_every_trainable_parameter(in_tmp_dir):
    model = ToyGanModel()
    model.optimizer_groups = lambda: {"generator": list(model.head.parameters())}
    with pytest.raises(ValueError, match="in no optimizer group: .*disc.bias"):
        make_runner("partial", model=model).optimizers


def _run_script(name, monkeypatch, *args):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", [name, "--cfg-path", str(repo / "projects/free/shapes_caption.yaml"), *args])
    runpy.run_path(str(repo / name), run_name="__main__")


def test_train_then_evaluate_scripts_with_the_tiny_model(in_tmp_dir, shapes_data_dir, monkeypatch):
    options = [
        f"datasets.shapes_caption.build_info.storage={shapes_data_dir}", "run.batch_size_train=8",
        "run.batch_size_eval=8", "run.valid_splits=[]", "run.test_splits=[test]", "run.report_metric=False",
        "run.max_len=5", "run.max_epoch=1",
    ]
    library_root = Path(registry.get_path("library_root"))
    lavis_files_before = {p for p in library_root.rglob("*") if "__pycache__" not in p.parts}
    _run_script("train.py", monkeypatch, "--job-id", "trained", "--options", *options, "run.test_splits=[]")
    trained = in_tmp_dir / "output" / "shapes_caption" / "trained"
    checkpoint = torch.load(trained / "checkpoint_0.pth", weights_only=True)
    # shapes_caption.yaml trains FREE exits: one optimizer for the exits, one for the discriminators
    assert checkpoint["model"] and set(checkpoint["optimizers"]) == {"generator", "discriminator"}
    assert all(key.startswith("early_exits.") for key in checkpoint["model"])
    assert checkpoint["epoch"] == 0 and not list((trained / "result").iterdir())

    _run_script("evaluate.py", monkeypatch, "--job-id", "evaluated", "--options", *options)
    results = json.loads((in_tmp_dir / "output/shapes_caption/evaluated/result/test_epochbest.json").read_text())
    assert len(results) == 8 and all(isinstance(row["caption"], str) for row in results)
    assert not (in_tmp_dir / "output/shapes_caption/evaluated/checkpoint_0.pth").exists()
    assert {p for p in library_root.rglob("*") if "__pycache__" not in p.parts} == lavis_files_before


@pytest.mark.parametrize(
    "options, message",
    [
        (["run.runner=runner_fre"], r"run\.runner: 'runner_fre' is not a registered runner.*runner_free"),
        (["model.arch", "blip2_opt_fre"], r"model\.arch: 'blip2_opt_fre' is not a registered model"),
    ],
)
def test_unknown_registered_name_is_an_error_naming_the_key(in_tmp_dir, monkeypatch, options, message):
    with pytest.raises(ValueError, match=message):
        _run_script("train.py", monkeypatch, "--options", *options)
