"""Stage 0 of `shapes_frozen_lm` (lavis_free.pretraining): what each component learns from, and
that their files become the stage-1 model's weights and the exported type's."""
import json
import random
from types import SimpleNamespace

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_free.common.config import FreeConfig
from lavis_free.datasets.shapes import generate_item
from lavis_free.datasets.shapes_scene import Scene, ShapeObject
from lavis_free.hosts.blip2 import opt_training_text
from lavis_free.models import tiny
from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.pretraining import qformer, text_lm, vision
from lavis_free.pretraining.components import merge_components
from lavis_free.tasks.instruct import FreeInstructTask

STAGE1 = "projects/free/shapes_stage1_frozen_lm.yaml"


def _storage(data_dir):
    return [f"datasets.{n}.build_info.storage={data_dir}" for n in ("shapes_caption", "shapes_vqa", "shapes_dialogue")]


def test_the_text_lm_reads_exactly_the_texts_stage_1_trains_on(shapes_data_dir):
    """Stage 1's samples (LAVIS builders, processors, free_instruct, the OPT binding's joining)
    of the first train image are texts of the LM's corpus, and the corpus has nothing else of it."""
    cfg = FreeConfig(SimpleNamespace(cfg_path=STAGE1, options=_storage(shapes_data_dir)))
    task = FreeInstructTask.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    stage1 = set()
    for name in ("shapes_caption", "shapes_vqa", "shapes_dialogue"):
        train = datasets[name]["train"]
        for i in range(len(train)):
            if train.dataset.annotation[i]["image"].endswith("000001.png"):
                sample = train[i]
                stage1.add(opt_training_text(sample["text_input"], sample["text_output"]))
    corpus = set(text_lm.task_texts(generate_item(0, "train", 0).text, task.instructions))
    assert stage1 and stage1 <= corpus
    assert any(t.startswith("Question: ") and t.endswith("\n") for t in stage1)
    prefix, texts = text_lm.corpus("train", 1, task.instructions)[0]
    assert len(corpus) == len(set(texts)) and prefix == text_lm.scene_prefix(generate_item(0, "train", 0).scene)


def test_lm_rows_start_with_the_scene_prefix_where_stage_1_puts_the_queries():
    tokenizer = tiny.load_opt_tokenizer()
    scene = generate_item(0, "train", 3).scene
    words = text_lm.scene_prefix(scene).split()
    assert words[:4] == [scene.objects[0].size, scene.objects[0].colour, scene.objects[0].shape, *scene.objects[0].position.split()][:4]
    prefix = text_lm.prefix_ids(tokenizer, text_lm.scene_prefix(scene), 16)
    assert len(prefix) == 16 and prefix[-1] == tokenizer.pad_token_id
    with pytest.raises(ValueError, match="more than the 2 query positions"):
        text_lm.prefix_ids(tokenizer, text_lm.scene_prefix(scene), 2)
    texts = [tokenizer(t).input_ids for t in ("a red circle\n", "Question: what color is it? Answer: red\n", "two stars\n")]
    other = text_lm.prefix_ids(tokenizer, "small blue star top", 16)
    ids, mask, labels = text_lm.document_rows([(prefix, texts), (other, texts[:1])], block=30, pad_id=tokenizer.pad_token_id,
                                              rng=random.Random(0))
    assert len(ids) == 3  # the first scene's texts need two rows of 30, each with its prefix
    for row in range(3):
        assert ids[row, :16].tolist() in (prefix, other) and ids[row, 16] == tokenizer.bos_token_id
        assert (labels[row, :16] == -100).all() and (labels[row][mask[row] == 0] == -100).all()
        scored = labels[row][labels[row] != -100].tolist()
        assert scored == ids[row][16:16 + len(scored)].tolist() and mask[row, :16 + len(scored)].all()
    assert int((labels != -100).sum()) == sum(map(len, texts)) + len(texts[0])  # every text once, none cut


def test_scene_targets_put_each_object_in_its_cell():
    scene = Scene((ShapeObject("star", "blue", "large", (0, 2)), ShapeObject("circle", "red", "small", (2, 0))),
                  (245, 245, 245), ((0, 0), (0, 0)))
    targets = vision.scene_targets(scene)
    assert targets.shape == (9, 3)
    assert targets[vision.CELLS.index((0, 2))].tolist() == [3, 4, 3]  # blue, star, large (0 = empty)
    assert targets[vision.CELLS.index((2, 0))].tolist() == [1, 1, 1]
    assert int((targets.sum(1) > 0).sum()) == 2


def _stage1_model_from(pretrained):
    """The stage-1 model section (shapes_frozen_lm's architecture, components from `pretrained`)."""
    cfg = FreeConfig(SimpleNamespace(cfg_path=STAGE1, options=[f"model.pretrained={pretrained}"]))
    return cfg.model_cfg


def _stage1_model(out):
    return _stage1_model_from(out / "pretrained.pth")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage0")
    lm = text_lm.train_text_lm(STAGE1, str(out / "lm.pth"), images=4, epochs=1, batch_size=2, block=64, progress=False)
    seen = vision.train_vision(STAGE1, str(out / "vision.pth"), steps=3, batch_size=4, progress=False)
    merge_components([str(out / "lm.pth"), str(out / "vision.pth")], str(out / "vision_lm.pth"))
    read = qformer.train_qformer(STAGE1, str(out / "vision_lm.pth"), str(out / "qformer.pth"), steps=2, batch_size=4, progress=False)
    assert 0 <= read["val"]["prefix_word_accuracy"] <= 1
    trained = torch.load(out / "qformer.pth", weights_only=True)["model"]
    torch.manual_seed(0)  # train_qformer's seed: the same initial weights
    initial = Blip2OPTFree.from_config(_stage1_model_from(out / "vision_lm.pth")).state_dict()
    assert not torch.equal(trained["opt_proj.weight"], initial["opt_proj.weight"])
    assert not torch.equal(trained["query_tokens"], initial["query_tokens"])
    merge_components([str(out / "vision_lm.pth"), str(out / "qformer.pth")], str(out / "pretrained.pth"))
    return out, lm, seen


def test_stage_0_files_load_as_the_frozen_components_of_stage_1(components):
    out, lm, seen = components
    assert lm["steps"] > 0 and json.load(open(out / "lm.json"))["val_loss"] == lm["val_loss"]
    assert set(seen["val"]) >= {"colour", "shape", "size", "empty"}
    cfg = _stage1_model(out)
    torch.manual_seed(1)
    model = Blip2OPTFree.from_config(cfg)
    state = torch.load(out / "pretrained.pth", weights_only=True)["model"]
    own = model.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    assert any(k.startswith("opt_model.") for k in state) and any(k.startswith("visual_encoder.") for k in state)
    assert any(k.startswith("Qformer.") for k in state) and "query_tokens" in state and "opt_proj.weight" in state
    assert not any(p.requires_grad for p in model.opt_model.parameters())
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())


def test_merging_refuses_a_key_given_twice(components, tmp_path):
    out, _, _ = components
    with pytest.raises(ValueError, match="keys already given by an earlier component file"):
        merge_components([str(out / "lm.pth"), str(out / "lm.pth")], str(tmp_path / "x.pth"))


def test_export_lays_the_stage_1_checkpoint_over_the_frozen_components(components, tmp_path):
    from lavis_free.models.export import export_weights
    from lavis_free.runners.checkpoint import trainable_state_dict

    out, _, _ = components
    cfg = _stage1_model(out)
    model = Blip2OPTFree.from_config(cfg)
    with torch.no_grad():
        model.opt_proj.weight.add_(1.0)  # what stage 1 trained
    torch.save({"model": trainable_state_dict(model)}, tmp_path / "stage1.pth")
    with pytest.raises(ValueError, match="missing"):
        export_weights(str(tmp_path / "stage1.pth"), str(tmp_path / "w.pth"), model_type="shapes_frozen_lm")
    export_weights(str(tmp_path / "stage1.pth"), str(tmp_path / "w.pth"), model_type="shapes_frozen_lm",
                   base=[str(out / "pretrained.pth")])
    weights = torch.load(tmp_path / "w.pth", weights_only=True)["model"]
    assert torch.equal(weights["opt_proj.weight"], model.opt_proj.weight.half())
    pretrained = torch.load(out / "pretrained.pth", weights_only=True)["model"]
    key = "opt_model.model.decoder.layers.0.fc1.weight"
    assert torch.equal(weights[key], pretrained[key].half())
