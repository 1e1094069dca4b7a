"""Data parallel exit training: what each rank trains on, and that the ranks stay one model.

The gloo test forks two workers (they inherit the imported modules, as in test_exit_eval.py)
that each build the real runner with `build_runner` (the `tiny` model, the shared shapes data)
and run one epoch of `runner_free`'s exit training; every batch the training loop consumes is
recorded. The loader test fakes a 2-process world around `build_loader` to pin the sampler's
padding and drop_last semantics on hand-countable sizes, without processes.
"""
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from lavis_free.common.launch import build_runner, parse_args
from lavis_free.runners import loaders
from lavis_free.tasks import exit_training

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "projects" / "free" / "shapes_caption.yaml"
WORLD = 2
# The shared shapes train split has 80 rows (16 images x 5 captions). 80 / 2 ranks = 40 rows per
# rank, 40 / 20 = 2 steps: no sampler padding, no batch dropped, so the shards are a partition.
TRAIN_ROWS, BATCH = 80, 20




def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_worker(rank: int, port: int, data_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    runner = build_runner(parse_args("test", [
        "--cfg-path", str(PROJECT), "--job-id", "shards", "--options",
        "model.model_type=tiny", "model.load_finetuned=False", "model.exits_checkpoint=", "model.exits.layers=[2,5,8]",
        "model.exits.layout=free", f"datasets.shapes_caption.build_info.storage={data_dir}",
        f"run.output_dir={out_dir}/output", "run.max_epoch=1", f"run.batch_size_train={BATCH}",
        "run.warmup_steps=0", "run.valid_splits=[]", "run.test_splits=[]", "run.log_freq=100",
        "run.dist_timeout_min=2",  # a rank that dies fails the other within minutes, not after 30
    ]))
    host = runner.unwrap_dist_model(runner.model)  # wrapping in DDP broadcasts rank 0's weights
    before = _trainable(host)
    train_set = runner._datasets_by_name["shapes_caption"]["train"]
    rows = [(int(s["image_id"]), s["text_input"]) for s in (train_set[i] for i in range(len(train_set)))]
    seen = []
    real_prepare = exit_training.prepare_sample

    def recording_prepare(samples, **kwargs):  # what the training loop actually trains on
        seen.extend(zip(samples["image_id"].tolist(), samples["text_input"]))
        return real_prepare(samples, **kwargs)

    exit_training.prepare_sample = recording_prepare
    try:
        runner.train_epoch(0)
    finally:
        exit_training.prepare_sample = real_prepare
    torch.save({"rows": rows, "seen": seen, "steps": len(runner.train_loader), "before": before,
                "after": _trainable(host)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_epoch(shapes_data_dir, tmp_path_factory):
    """Per rank: the split's rows, the rows trained on in one epoch, trainable weights before and after."""
    out = tmp_path_factory.mktemp("gloo_shards")
    mp.start_processes(_train_worker, args=(free_port(), shapes_data_dir, str(out)), nprocs=WORLD, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_each_rank_trains_on_its_own_shard_and_together_on_the_whole_split(gloo_epoch):
    """Catches every rank training on all the data (no DistributedSampler) or on the same shard."""
    rows = gloo_epoch[0]["rows"]
    assert len(rows) == TRAIN_ROWS and len(set(rows)) == TRAIN_ROWS, "the split's rows must be distinguishable"
    assert gloo_epoch[1]["rows"] == rows
    shards = [Counter(rank["seen"]) for rank in gloo_epoch]
    for rank in gloo_epoch:
        assert rank["steps"] == TRAIN_ROWS // WORLD // BATCH == 2
        assert len(rank["seen"]) == TRAIN_ROWS // WORLD and len(set(rank["seen"])) == len(rank["seen"])
    assert not set(shards[0]) & set(shards[1]), "ranks trained on the same rows"
    assert shards[0] + shards[1] == Counter(rows)


def test_ranks_hold_identical_trainable_weights_after_training_on_different_data(gloo_epoch):
    """Different batches per rank, yet exits and discriminators end bit-identical: gradients were
    averaged across the ranks (a rank stepping on its own gradients diverges at the first step)."""
    first, second = gloo_epoch
    names = set(first["after"])
    assert any(n.startswith("early_exits.exits.") for n in names)
    assert any(n.startswith("early_exits.discriminators.") for n in names)
    assert set(second["after"]) == names
    for name in names:
        assert torch.equal(first["before"][name], second["before"][name]), f"{name} differed before training"
        assert torch.equal(first["after"][name], second["after"][name]), f"{name} differs across ranks after training"
    for group in ("early_exits.exits.", "early_exits.discriminators."):
        assert any(not torch.equal(first["before"][n], first["after"][n]) for n in names if n.startswith(group)), \
            f"{group} did not train"


class _Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


@pytest.mark.parametrize("n, batch", [(12, 3), (11, 2), (11, 4)])
def test_train_loader_shards_pad_and_drop_as_distributed_sampler_does(monkeypatch, n, batch):
    """`build_loader` under a (faked) 2-process world, 2 epochs. DistributedSampler pads the
    shuffled indices to a multiple of the world size by repeating the first ones, every rank
    takes every 2nd index, and drop_last drops each rank's incomplete last batch:
      12 rows, batch 3: 6 per rank, 2 batches each, a partition of the 12;
      11 rows, batch 2: padded to 12, 3 batches each, all 11 covered, exactly one row twice;
      11 rows, batch 4: 6 per rank, 1 batch each (2 dropped per rank), 8 distinct rows."""
    per_rank = math.ceil(n / WORLD)
    kept = per_rank // batch * batch
    epochs = []
    for epoch in range(2):
        shards = []
        for rank in range(WORLD):
            monkeypatch.setattr(loaders, "get_world_size", lambda: WORLD)
            monkeypatch.setattr(loaders, "get_rank", lambda rank=rank: rank)
            loader = loaders.build_loader(_Indices(n), batch, 0, True, None, True, False, False)
            for _ in range(epoch * len(loader)):  # EpochLoader: the next epoch starts after len() batches
                next(loader)
            assert len(loader) == per_rank // batch
            shards.append([i for _ in range(len(loader)) for i in next(loader).tolist()])
        epochs.append(shards)
        for shard in shards:
            assert len(shard) == kept and len(set(shard)) == kept
        counts = Counter(shards[0]) + Counter(shards[1])
        if kept == per_rank:  # nothing dropped: all rows covered, the padding rows twice
            assert set(counts) == set(range(n))
            assert sum(c - 1 for c in counts.values()) == WORLD * per_rank - n
        else:
            assert set(counts) < set(range(n)) and sum(counts.values()) == WORLD * kept
    assert epochs[0] != epochs[1], "the sampler was not reshuffled for the second epoch"
