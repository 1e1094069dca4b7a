"""Install/import: compat fixes, registrations, cache root, nothing written into site-packages."""
import os
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from lavis.common.registry import registry

from lavis_free.common.paths import cache_root
from lavis_free.compat import torchvision_ops

LAVIS_DEFAULT_CACHE = "/export/home/.cache/lavis"


def test_fresh_process_imports_lavis_after_lavis_free_with_our_cache_root(tmp_path):
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        """
        import json, lavis_free, lavis
        from lavis.common.registry import registry
        print(json.dumps({
            "cache_root": registry.get_path("cache_root"),
            "runners": registry.list_runners(),
            "lr_schedulers": registry.list_lr_schedulers(),
        }))
        """
    )
    env = {**os.environ, "LAVIS_FREE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["cache_root"] == str(cache.resolve())
    assert "runner_free" in found["runners"]
    assert {"linear_warmup_cosine_lr", "linear_warmup_step_lr"} <= set(found["lr_schedulers"])


def test_cache_root_is_ours_writable_and_outside_site_packages():
    root = registry.get_path("cache_root")
    assert root == str(cache_root()) and root != LAVIS_DEFAULT_CACHE
    assert not root.startswith(os.path.dirname(registry.get_path("library_root")))
    existing = root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    assert os.access(existing, os.W_OK)


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LAVIS_FREE_CACHE", str(tmp_path / "c"))
    assert cache_root() == (tmp_path / "c").resolve()
    monkeypatch.delenv("LAVIS_FREE_CACHE")
    assert cache_root() == Path("~/.cache/lavis_free").expanduser().resolve()


def test_torchvision_imports_and_fallback_only_when_compiled_ops_fail():
    import torchvision  # noqa: F401  (crashed before the fix on a CPU torch)

    assert torchvision_ops.fallback_installed() == (not torchvision_ops.compiled_ops_load())


def test_fallback_left_out_when_compiled_ops_load(monkeypatch):
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.setattr(torchvision_ops, "_fallback_library", None)
    assert torchvision_ops.install_if_needed(ops_load=lambda: True) is False
    assert torchvision_ops._fallback_library is None


def test_reference_nms_keeps_highest_scoring_non_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert torchvision_ops.nms_reference(boxes, scores, 0.5).tolist() == [3, 2]
    assert torchvision_ops.nms_reference(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    assert torchvision_ops.nms_reference(boxes[:0], scores[:0], 0.5).numel() == 0
    if torchvision_ops.fallback_installed():
        assert torch.ops.torchvision.nms(boxes, scores, 0.5).tolist() == [3, 2]


def test_project_yamls_load_with_lavis_config_and_use_runner_free():
    import argparse

    from lavis.common.config import Config

    repo = Path(__file__).resolve().parents[1]
    for name, dataset in (("shapes_caption", "shapes_caption"), ("coco_caption", "coco_caption")):
        cfg = Config(argparse.Namespace(cfg_path=str(repo / "projects" / "free" / f"{name}.yaml"), options=[]))
        assert cfg.run_cfg.runner == "runner_free"
        assert cfg.model_cfg.arch == "blip2_opt_free"
        assert dataset in cfg.datasets_cfg
