"""Unknown `run.*` / `model.*` keys are errors naming the key and a close match; valid configs pass."""
import argparse
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lavis

from lavis_free.common.config import FreeConfig, check_known_keys, keys_read, known_model_keys, known_run_keys

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "projects" / "free" / "shapes_caption.yaml"


def config(cfg_path, *options):
    return FreeConfig(argparse.Namespace(cfg_path=str(cfg_path), options=list(options)))


@pytest.mark.parametrize(
    "option, message",
    [
        ("run.max_epoh=1", r"run\.max_epoh: unknown key \(did you mean run\.max_epoch\?\)"),
        ("model.exit=[1]", r"model\.exit: unknown key \(did you mean model\.exits\?\)"),
        ("model.exits_checkpint=x.pth", r"model\.exits_checkpint: unknown key \(did you mean model\.exits_checkpoint\?\)"),
        ("run.dist_timeout=5", r"run\.dist_timeout: unknown key \(did you mean run\.dist_timeout_min\?\)"),
        ("run.zzz=1", r"run\.zzz: unknown key; known run keys: .*max_epoch.*projects/free"),
        ("runn.max_epoch=1", r"runn: unknown top-level section \(did you mean run\?\)"),
        ("datasets.shapes_caption.build_info.storag=/x",
         r"datasets\.shapes_caption\.build_info\.storag: unknown key \(did you mean datasets\.shapes_caption\.build_info\.storage\?\)"),
        ("datasets.shapes_caption.vis_procesor.eval.name=x",
         r"datasets\.shapes_caption\.vis_procesor: unknown key \(did you mean datasets\.shapes_caption\.vis_processor\?\)"),
        ("run.max_epoch=0", r"run\.max_epoch=0 is invalid: expected an integer >= 1"),
        ("run.batch_size_train=0", r"run\.batch_size_train=0 is invalid: expected an integer >= 1"),
        ("run.batch_size_eval=2.5", r"run\.batch_size_eval=2\.5 is invalid: expected an integer >= 1"),
    ],
)
def test_unknown_option_key_is_an_error_with_a_close_match(option, message):
    with pytest.raises(ValueError, match=message):
        config(PROJECT, option)


def test_unknown_key_in_the_project_yaml_names_the_model_yamls(tmp_path):
    project = OmegaConf.load(PROJECT)
    project.model.freeze_vti = True
    path = tmp_path / "typo.yaml"
    OmegaConf.save(project, path)
    with pytest.raises(ValueError, match=r"model\.freeze_vti: .*freeze_vit.*blip2_opt_free_shapes_tiny\.yaml"):
        config(path)


@pytest.mark.parametrize("project", sorted((REPO / "projects" / "free").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_project_yaml_passes(project):
    cfg = config(project)
    assert cfg.run_cfg.runner == "runner_free"


LAVIS_PROJECTS = sorted((Path(lavis.__file__).parent / "projects").rglob("*.yaml"))


@pytest.mark.parametrize("project", LAVIS_PROJECTS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_lavis_project_yaml_passes(project):
    """A LAVIS user's own YAMLs (`datasets.*.type`, `model.load_pretrained`, ...) are not refused."""
    check_known_keys(OmegaConf.load(project))


def test_known_keys_come_from_what_lavis_and_the_plugin_read():
    run = known_run_keys()
    # LAVIS's runner (resume_ckpt_path, amp), its VQA task (num_ans_candidates), the plugin's
    # runner (find_unused_parameters), dist set-up (dist_timeout_min) and tasks (caption_scorers)
    assert {"resume_ckpt_path", "amp", "num_ans_candidates", "find_unused_parameters", "dist_timeout_min",
            "caption_scorers", "init_lr"} <= run
    plugin = known_model_keys("blip2_opt_free")
    assert {"exits", "exits_checkpoint", "opt_config", "load_finetuned", "arch", "model_type"} <= plugin
    # LAVIS's classes with a host binding take the section the plugin's tasks attach; others do not
    assert {"opt_model", "exits", "exits_checkpoint"} <= known_model_keys("blip2_opt")
    assert {"t5_model", "exits", "exits_checkpoint"} <= known_model_keys("blip2_t5")
    assert "exits" not in known_model_keys("blip_caption")


def test_keys_read_finds_get_subscript_and_attribute_reads():
    source = "def f(self, cfg):\n    a = cfg.get('one', 1) + self.x.cfg['two'] + cfg.three\n    cfg.items(); other.get('no')\n"
    assert keys_read(source, {"cfg"}) == {"one", "two", "three"}
