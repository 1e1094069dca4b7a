"""`--options model.model_type=X` selects type X's model YAML (LAVIS 1.0.2 ignores it)."""
import argparse

from lavis_free.common.config import FreeConfig


def test_model_type_option_switches_the_default_model_yaml():
    cfg = FreeConfig(argparse.Namespace(
        cfg_path="projects/free/shapes_stage1.yaml",  # model_type: tiny (no weights)
        options=["model.model_type=shapes_tiny"],
    ))
    assert cfg.model_cfg.model_type == "shapes_tiny"
    assert cfg.model_cfg.finetuned.endswith("blip2_opt_free_shapes_tiny.pth")


def test_project_model_type_is_kept_without_the_option():
    cfg = FreeConfig(argparse.Namespace(cfg_path="projects/free/shapes_stage1.yaml", options=[]))
    assert cfg.model_cfg.model_type == "tiny"
    assert not cfg.model_cfg.finetuned
