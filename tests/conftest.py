"""Shared fixtures.

The offline switches are set before anything imports transformers (it reads them at import);
one intra-op thread per process (inherited by the subprocesses tests start) because the tiny
models' ops are too small to gain from threads, and on a loaded 2-core machine torch's thread
pool made training steps about 10x slower; then ``import lavis_free``, which must precede any
lavis import (compat fixes, registrations).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

import lavis_free  # noqa: E402,F401

SHAPES_SIZES = {"train": 16, "val": 8, "test": 8}


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A small shapes dataset (seed 0; 16 train, 8 val, 8 test images), generated once per session."""
    from lavis_free.datasets.shapes import generate_dataset

    out = tmp_path_factory.mktemp("shapes_data")
    generate_dataset(str(out), seed=0, sizes=SHAPES_SIZES, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def project_yaml(shapes_data_dir, tmp_path_factory):
    """A captioning project on `tiny` with exits after layers 2, 5, 8 over the session's shapes data."""
    from omegaconf import OmegaConf

    path = tmp_path_factory.mktemp("project") / "project.yaml"
    OmegaConf.save(OmegaConf.create({
        "model": {"arch": "blip2_opt_free", "model_type": "tiny", "exits": {"layers": [2, 5, 8]}},
        "datasets": {"shapes_caption": {"build_info": {"storage": shapes_data_dir}}},
        "run": {"task": "free_captioning", "caption_scorers": ["bleu", "cider"], "batch_size_eval": 2,
                "num_beams": 1, "max_len": 6, "min_len": 1, "seed": 42},
    }), path)
    return str(path)
