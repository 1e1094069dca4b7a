"""Runs never share a job dir, evaluations that evaluate nothing and train splits that give no
batch are errors, and a hung gloo rank is named within `run.dist_timeout_min`."""
import datetime
import json
import os
import runpy
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from lavis_free.common import paths
from lavis_free.common.dist import barrier, init_distributed_mode, on_main_process
from lavis_free.common.launch import build_runner, parse_args
from lavis_free.runners.loaders import check_train_split

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "projects" / "free" / "shapes_caption.yaml"


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- job dirs ---------------------------------------------------------------------------------

class _FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 1, 2, 3, 4, 5)


def test_runs_started_in_the_same_second_get_their_own_dirs(in_tmp_dir, monkeypatch):
    monkeypatch.setattr(paths.datetime, "datetime", _FrozenClock)
    claimed = [paths.claim_job_dir("output/x") for _ in range(3)]
    assert [p.name for p in claimed] == ["20250102030405", "20250102030405_1", "20250102030405_2"]
    assert all(p.is_dir() and p.parent == in_tmp_dir / "output" / "x" for p in claimed)


def test_an_explicit_job_id_is_used_once(in_tmp_dir):
    first = paths.claim_job_dir("output/x", "job")
    assert first == in_tmp_dir / "output" / "x" / "job" and first.is_dir()
    with pytest.raises(FileExistsError, match=r"--job-id 'job': .*output/x/job already exists.*run\.resume_ckpt_path"):
        paths.claim_job_dir("output/x", "job")


@pytest.mark.parametrize("job_id", ["a/b", "..", "."])
def test_a_job_id_must_be_a_plain_name(job_id):
    with pytest.raises(ValueError, match="must be a plain directory name"):
        paths.claim_job_dir("output/x", job_id)


def _build(*args):
    return build_runner(parse_args("test", ["--cfg-path", str(PROJECT), *args]))


def test_reusing_a_job_id_fails_before_any_work_and_leaves_the_old_run_alone(in_tmp_dir, monkeypatch):
    old = in_tmp_dir / "output" / "shapes_caption" / "done"
    old.mkdir(parents=True)
    (old / "checkpoint_0.pth").write_bytes(b"old run")
    monkeypatch.setattr("lavis.tasks.setup_task", lambda cfg: pytest.fail("work started"))
    with pytest.raises(FileExistsError, match=str(old)):
        _build("--job-id", "done")
    assert (old / "checkpoint_0.pth").read_bytes() == b"old run" and sorted(os.listdir(old)) == ["checkpoint_0.pth"]


# ---- runs that evaluate or train on nothing ------------------------------------------------------

def _run_script(name, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [name, "--cfg-path", str(PROJECT), *args])
    runpy.run_path(str(REPO / name), run_name="__main__")


def test_readme_evaluate_command_evaluates_the_test_split(in_tmp_dir, shapes_data_dir, monkeypatch):
    # python evaluate.py --cfg-path projects/free/shapes_caption.yaml, on the small data, short captions
    options = [f"datasets.shapes_caption.build_info.storage={shapes_data_dir}", "run.max_len=5", "run.report_metric=False"]
    _run_script("evaluate.py", monkeypatch, "--job-id", "readme", "--options", *options)
    rows = json.loads((in_tmp_dir / "output/shapes_caption/readme/result/test_epochbest.json").read_text())
    assert len(rows) == 8


def test_an_evaluation_of_no_split_is_an_error(in_tmp_dir, shapes_data_dir, monkeypatch):
    options = [f"datasets.shapes_caption.build_info.storage={shapes_data_dir}", "run.test_splits=[]"]
    with pytest.raises(ValueError, match=r"run\.test_splits is empty: nothing to evaluate"):
        _run_script("evaluate.py", monkeypatch, "--options", *options)
    with pytest.raises(ValueError, match=r"run\.evaluate is True but run\.valid_splits and run\.test_splits are empty"):
        _run_script("train.py", monkeypatch, "--options", *options, "run.evaluate=True")


def test_train_split_smaller_than_the_batch_is_an_error_before_training(in_tmp_dir, shapes_data_dir, monkeypatch):
    options = [f"datasets.shapes_caption.build_info.storage={shapes_data_dir}", "run.batch_size_train=100000"]
    with pytest.raises(ValueError, match=r"train split 'train' of datasets\.shapes_caption \(annotation file "
                                         r".*caption_train\.json\) has \d+ samples.*run\.batch_size_train=100000.*drop_last"):
        _run_script("train.py", monkeypatch, "--options", *options)


class Sized(Dataset):
    def __init__(self, n):
        self.n = n
        self.ann_path = f"ann_{n}.json"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_train_split_size_is_checked_per_process():
    check_train_split("train", {"d": {"train": Sized(16)}}, batch_size=8, world_size=2)  # one batch per rank
    with pytest.raises(ValueError, match=r"has 10 samples, 5 per process \(2 processes\), fewer than run\.batch_size_train=8"):
        check_train_split("train", {"d": {"train": Sized(10)}}, batch_size=8, world_size=2)
    with pytest.raises(ValueError, match=r"train split 'train' of datasets\.d \(annotation file ann_0\.json\) is empty"):
        check_train_split("train", {"d": {"train": Sized(0)}}, batch_size=8, world_size=1)
    with pytest.raises(ValueError, match=r"run\.train_splits names split 'trian', which none of the datasets \['d'\] has"):
        check_train_split("trian", {"d": {"train": Sized(16)}}, batch_size=8, world_size=1)


# ---- distributed: a hung rank, a failure on rank 0 --------------------------------------------

@pytest.mark.parametrize("value", ["soon", 0, -1])
def test_bad_dist_timeout_is_a_config_error(value):
    with pytest.raises(ValueError, match=r"run\.dist_timeout_min: .* is not a positive number of minutes \(default 30\)"):
        init_distributed_mode(OmegaConf.create({"device": "cpu", "dist_timeout_min": value}))




def _hang_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed_mode(OmegaConf.create({"device": "cpu", "dist_timeout_min": 0.05}))  # 3 s
    outcome = "no error"
    try:
        on_main_process(lambda: paths.claim_job_dir(out_dir, "taken"))  # exists: every rank must raise
    except FileExistsError as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(out_dir, f"claim{rank}.txt").write_text(outcome)
    try:
        if rank == 1:
            time.sleep(6)  # alive, but late: past the 3 s timeout
        barrier()
        outcome = "no error"
    except RuntimeError as err:
        outcome = str(err)
    Path(out_dir, f"barrier{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_a_hung_gloo_rank_is_named_after_the_timeout(tmp_path):
    (tmp_path / "taken").mkdir()
    started = time.monotonic()
    # fork: the workers inherit the imported modules instead of importing LAVIS again
    mp.start_processes(_hang_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    assert time.monotonic() - started < 60
    for rank in (0, 1):
        assert (tmp_path / f"claim{rank}.txt").read_text().startswith("FileExistsError: --job-id 'taken'")
    message = (tmp_path / "barrier0.txt").read_text()
    assert "rank 0: not every rank reached a barrier within run.dist_timeout_min=0.05 min" in message
    assert "Ranks 1 failed to pass monitoredBarrier" in message, message
