"""Data loaders for the plugin runner that need no CUDA.

LAVIS wraps every map-style loader in ``PrefetchLoader``, which creates a ``torch.cuda.Stream``
(``dataloader_utils.py:56``) and so cannot run on CPU; its ``IterLoader`` also sleeps 2 s at each
epoch boundary. Here the CUDA prefetcher is used only on CUDA, and training loaders are wrapped
in :class:`EpochLoader`, which re-iterates without sleeping and reshuffles the distributed
sampler per epoch. Webdataset pipelines and multi-dataset mixing use LAVIS's own classes.

Training loaders drop the last incomplete batch (``drop_last``), so a train split with fewer
samples per process than ``run.batch_size_train`` gives an epoch of no batch: LAVIS then
divides by zero, and an empty split fails inside torch's sampler.
:func:`check_train_split` says so up front.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import math

import webdataset as wds
from lavis.common.dist_utils import get_rank, get_world_size
from lavis.datasets.datasets.dataloader_utils import MultiIterLoader, PrefetchLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data.dataset import ChainDataset


def _describe(name: str, dataset: Any) -> str:
    """``datasets.<name>`` and its annotation file when the dataset records one."""
    ann_path = getattr(dataset, "ann_path", None)
    return f"datasets.{name}" + (f" (annotation file {ann_path})" if ann_path else "")


def check_train_split(split: str, datasets_by_name: Mapping[str, Mapping[str, Any]], batch_size: int, world_size: int) -> None:
    """Refuse a train split that would give no batch in an epoch, naming the split, its datasets
    and files, ``run.batch_size_train`` and the number of processes."""
    parts = {name: splits[split] for name, splits in datasets_by_name.items() if split in splits}
    if not parts:
        raise ValueError(f"run.train_splits names split {split!r}, which none of the datasets {sorted(datasets_by_name)} has")
    if not all(hasattr(d, "__len__") for d in parts.values()):
        return  # a webdataset pipeline: its length is unknown until it is read
    total = sum(len(d) for d in parts.values())
    per_process = math.ceil(total / world_size)  # DistributedSampler pads every rank to this
    where = ", ".join(_describe(name, d) for name, d in parts.items())
    if total == 0:
        raise ValueError(f"train split {split!r} of {where} is empty: there is nothing to train on")
    if per_process < batch_size:
        processes = f", {per_process} per process ({world_size} processes)" if world_size > 1 else ""
        raise ValueError(
            f"train split {split!r} of {where} has {total} samples{processes}, fewer than "
            f"run.batch_size_train={batch_size}: training drops the last incomplete batch (drop_last), so an "
            f"epoch would have no batch. Set run.batch_size_train to at most {per_process}, or use more data."
        )


class EpochLoader:
    """An endless iterator over a DataLoader; ``len()`` is one epoch's number of batches."""

    def __init__(self, loader: Any, sampler: Optional[DistributedSampler] = None):
        self._loader = loader
        self._sampler = sampler
        self._epoch = 0
        self._iterator = self._start_epoch()

    @property
    def epoch(self) -> int:
        return self._epoch

    def _start_epoch(self) -> Iterator:
        if self._sampler is not None:
            self._sampler.set_epoch(self._epoch)
        return iter(self._loader)

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            self._epoch += 1
            self._iterator = self._start_epoch()
            return next(self._iterator)

    def __iter__(self) -> "EpochLoader":
        return self

    def __len__(self) -> int:
        return len(self._loader)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    is_train: bool,
    collate_fn: Optional[Callable],
    distributed: bool,
    dist_eval_sampler: bool,
    cuda: bool,
) -> Any:
    """One loader for one dataset: a DataLoader (prefetched to CUDA when ``cuda``), endless when training."""
    if isinstance(dataset, (ChainDataset, wds.DataPipeline)):
        return iter(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=cuda))
    sampler = None
    if distributed and (is_train or dist_eval_sampler):
        sampler = DistributedSampler(dataset, shuffle=is_train, num_replicas=get_world_size(), rank=get_rank())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=cuda,
        sampler=sampler,
        shuffle=sampler is None and is_train,
        collate_fn=collate_fn,
        drop_last=is_train,
    )
    if cuda:
        loader = PrefetchLoader(loader)
    return EpochLoader(loader, sampler) if is_train else loader


def build_loaders(
    datasets: Sequence[Any],
    batch_sizes: Sequence[int],
    is_trains: Sequence[bool],
    collate_fns: Sequence[Any],
    num_workers: int,
    distributed: bool,
    dist_eval_sampler: bool,
    cuda: bool,
    dataset_ratios: Optional[Sequence[float]] = None,
) -> list:
    """Loaders per split; a split holding several datasets gets LAVIS's ``MultiIterLoader``."""
    loaders = []
    for dataset, batch_size, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
        if isinstance(dataset, (list, tuple)):
            parts = [
                build_loader(d, batch_size, num_workers, is_train, fn, distributed, dist_eval_sampler, cuda)
                for d, fn in zip(dataset, collate_fn)
            ]
            loaders.append(MultiIterLoader(loaders=parts, ratios=dataset_ratios))
        else:
            loaders.append(
                build_loader(dataset, batch_size, num_workers, is_train, collate_fn, distributed, dist_eval_sampler, cuda)
            )
    return loaders
