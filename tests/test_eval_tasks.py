"""Evaluation tasks free_captioning / free_vqa / free_dialogue and their runner-free metric functions."""
import json
import os

import pytest
from omegaconf import OmegaConf

import lavis_free  # noqa: F401  (registers the tasks)
from lavis.common.registry import registry
from lavis_free.datasets.annotations import load_caption_gt
from lavis_free.datasets.shapes import generate_dataset
from lavis_free.tasks import caption_metrics, dialogue_metrics, vqa_accuracy, vqa_metrics
from lavis_free.tasks.baselines import most_frequent_caption_baseline

SIZES = {"train": 30, "val": 24, "test": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(str(out), seed=0, sizes=SIZES, progress=False)
    return str(out)


@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """LAVIS's output/result dirs, restored afterwards (the registry refuses re-registration)."""
    paths = registry.mapping["paths"]
    monkeypatch.setitem(paths, "output_dir", str(tmp_path))
    monkeypatch.setitem(paths, "result_dir", str(tmp_path))
    return tmp_path


def _ann(data_dir, name):
    with open(os.path.join(data_dir, "annotations", name)) as f:
        return json.load(f)


def _cfg(**run):
    return OmegaConf.create({"run_cfg": run})


class RecordingModel:
    """Stands in for blip2_opt_free: records the generation arguments and answers from a table."""

    def __init__(self, captions=None, answers=None):
        self.captions, self.answers, self.calls = captions or {}, answers or {}, []

    def generate(self, samples, **kwargs):
        self.calls.append(kwargs)
        return [self.captions.get(int(i), "a red circle") for i in samples["image_id"]]

    def predict_answers(self, samples, **kwargs):
        self.calls.append(kwargs)
        return [self.answers.get(int(q), "blue") for q in samples["question_id"]]


def test_vqa_accuracy_formula():
    ten = lambda right, n: [right] * n + ["x"] * (10 - n)  # noqa: E731
    assert vqa_accuracy("red", ten("red", 10)) == 1.0
    assert vqa_accuracy("red", ten("red", 0)) == 0.0
    assert vqa_accuracy("red", ten("red", 4)) == 1.0
    assert vqa_accuracy("red", ten("red", 3)) == pytest.approx(0.9)
    assert vqa_accuracy("red", ten("red", 2)) == pytest.approx(0.6)
    assert vqa_accuracy("red", ten("red", 1)) == pytest.approx(0.3)
    assert vqa_accuracy("Two.", ten("2", 10)) == 1.0  # VQAv2 normalisation: number words, punctuation
    assert vqa_accuracy("a circle", ["circle"]) == 1.0  # articles


def test_vqa_metrics_majority_vs_wrong(data_dir):
    rows = _ann(data_dir, "vqa_val.json")
    path = os.path.join(data_dir, "annotations", "vqa_val.json")
    majority = [{"question_id": r["question_id"], "answer": max(r["answer"], key=r["answer"].count)} for r in rows]
    good = vqa_metrics(majority, path)
    assert good["accuracy"] == 100.0 and good["agg_metrics"] == 100.0 and good["num_questions"] == len(rows)
    assert "accuracy_color" in good and "accuracy_yes/no" in good
    wrong = vqa_metrics([{"question_id": r["question_id"], "answer": "zebra"} for r in rows], path)
    assert wrong["accuracy"] == 0.0
    with pytest.raises(ValueError, match="question_id 12345"):
        vqa_metrics([{"question_id": 12345, "answer": "red"}], path)


def test_dialogue_metrics(data_dir):
    path = os.path.join(data_dir, "annotations", "dialogue_val.json")
    preds = [{"question_id": d["image_id"] * 10 + k, "answer": t["answer"]}
             for d in _ann(data_dir, "dialogue_val.json") for k, t in enumerate(d["dialog"])]
    assert dialogue_metrics(preds, path)["accuracy"] == 100.0
    preds[0]["answer"] = "zebra"
    metrics = dialogue_metrics(preds, path)
    assert metrics["accuracy"] < 100.0 and metrics["accuracy_round1"] < 100.0 == metrics["accuracy_round3"]


def test_caption_task_scores_perfect_far_above_wrong_and_constant(data_dir, run_dirs):
    """METEOR is left out here only for speed (its JVM loads a 60 MB table); scorers are configurable."""
    gt_path = os.path.join(data_dir, "annotations", "caption_val_gt.json")
    refs = load_caption_gt(gt_path)
    ids = sorted(refs)
    task = registry.get_task_class("free_captioning").setup_task(
        _cfg(num_beams=2, max_len=20, min_len=1, evaluate=True, caption_scorers=["bleu", "rouge", "cider"]))
    task.gt_files = {"val": gt_path}
    perfect = [{"image_id": i, "caption": refs[i][0]} for i in ids]
    metrics = task.after_evaluation(val_result=perfect, split_name="val", epoch=0)
    assert metrics["agg_metrics"] == metrics["CIDEr"] > 1.5
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(metrics) and "SPICE" not in metrics
    assert metrics["num_images"] == SIZES["val"]
    assert os.path.isfile(run_dirs / "val_epoch0.json")
    with open(run_dirs / "evaluate.txt") as f:
        assert json.loads(f.readline())["val"]["CIDEr"] == metrics["CIDEr"]

    other_images = [{"image_id": i, "caption": refs[ids[(k + 1) % len(ids)]][0]} for k, i in enumerate(ids)]
    wrong = caption_metrics(other_images, gt_path, scorers=("cider",))
    constant = most_frequent_caption_baseline(data_dir, "val", scorers=("cider",))
    assert 0 < wrong["CIDEr"] < metrics["CIDEr"] / 4
    assert 0 < constant["CIDEr"] < metrics["CIDEr"] / 4
    assert constant["caption"] in {r["caption"] for r in _ann(data_dir, "caption_train.json")}


def test_caption_metrics_errors(data_dir, tmp_path):
    gt_path = os.path.join(data_dir, "annotations", "caption_val_gt.json")
    with pytest.raises(ValueError, match="unknown caption scorers"):
        caption_metrics([{"image_id": 800001, "caption": "a red circle"}], gt_path, scorers=("cider", "bert"))
    with pytest.raises(ValueError, match="image_id 5"):
        caption_metrics([{"image_id": 5, "caption": "a red circle"}], gt_path)
    with pytest.raises(ValueError, match="'caption'"):
        caption_metrics([{"image_id": 800001}], gt_path)
    with pytest.raises(FileNotFoundError, match="python -m lavis_free.datasets.shapes"):
        caption_metrics([{"image_id": 1, "caption": "x"}], str(tmp_path / "annotations" / "caption_val_gt.json"))


def test_valid_steps_pass_run_config_and_generate_kwargs():
    extra = {"exit_threshold": 0.8, "return_exit_stats": False}
    caption_task = registry.get_task_class("free_captioning").setup_task(
        _cfg(num_beams=3, max_len=12, min_len=2, evaluate=True, generate_kwargs=extra))
    model = RecordingModel(captions={7: "two blue stars"})
    out = caption_task.valid_step(model, {"image_id": [7, 8]})
    assert out == [{"caption": "two blue stars", "image_id": 7}, {"caption": "a red circle", "image_id": 8}]
    assert model.calls[0] == dict(use_nucleus_sampling=False, num_beams=3, max_length=12, min_length=2, **extra)

    vqa_task = registry.get_task_class("free_vqa").setup_task(
        _cfg(num_beams=1, max_len=5, min_len=1, prompt="Question: {} Short answer:", generate_kwargs=extra))
    model = RecordingModel(answers={71: "red"})
    assert vqa_task.valid_step(model, {"question_id": [71]}) == [{"question_id": 71, "answer": "red"}]
    call = model.calls[0]
    assert call["prompt"] == "Question: {} Short answer:" and call["inference_method"] == "generate"
    assert (call["num_beams"], call["max_len"], call["min_len"], call["exit_threshold"]) == (1, 5, 1, 0.8)

    with pytest.raises(ValueError, match="unknown caption scorers"):
        registry.get_task_class("free_captioning").setup_task(_cfg(caption_scorers=["cider", "bert"]))
    with pytest.raises(ValueError, match="run.generate_kwargs"):
        registry.get_task_class("free_vqa").setup_task(_cfg(generate_kwargs=[1, 2]))


def test_dialogue_task_evaluates_from_annotation_file(data_dir, run_dirs):
    task = registry.get_task_class("free_dialogue").setup_task(_cfg(max_len=5))
    task.gt_files = {"val": os.path.join(data_dir, "annotations", "dialogue_val.json")}
    results = [{"question_id": d["image_id"] * 10 + k, "answer": t["answer"]}
               for d in _ann(data_dir, "dialogue_val.json") for k, t in enumerate(d["dialog"])]
    metrics = task.after_evaluation(val_result=results, split_name="val")
    assert metrics["agg_metrics"] == 100.0
    assert os.path.isfile(run_dirs / "val_dialogue_result.json")


def _visdial_rows(scores, gt_index, answers, gt_answers):
    return [{"question_id": i, "answer": a, "scores": s, "gt_index": g, "gt_answer": ga, "gt_relevance": None}
            for i, (s, g, a, ga) in enumerate(zip(scores, gt_index, answers, gt_answers))]


def test_visdial_metrics_of_result_rows():
    from lavis_free.tasks import visdial_metrics

    perfect = visdial_metrics(_visdial_rows([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]], [1, 0], ["Red.", "two"], ["red", "2"]))
    assert perfect["mrr"] == perfect["r@1"] == 1.0 and perfect["answer_accuracy"] == 100.0  # normalised as VQA
    assert perfect["agg_metrics"] == perfect["mrr"]
    worst = visdial_metrics(_visdial_rows([[0.9, 0.0, 0.5], [0.0, 0.1, 0.2]], [1, 0], ["blue", "no"], ["red", "2"]))
    assert worst["mean_rank"] == 3.0 and worst["mrr"] == pytest.approx(1 / 3) and worst["answer_accuracy"] == 0.0
    unranked = visdial_metrics(_visdial_rows([None, None], [1, 0], ["red", "x"], ["red", "2"]))
    assert "mrr" not in unranked and unranked["agg_metrics"] == 50.0


def test_visdial_task_ranks_and_answers_with_exit_figures_for_each(data_dir, run_dirs):
    """free_visdial end to end on the shipped model and shapes val (official layout): the 100
    options ranked far above chance (random MRR is about 0.05), answers generated, and exit
    figures (layers, wall-clock, time split) for generation and, prefixed, for ranking."""
    from lavis.models import load_model

    model = load_model("blip2_opt_free", "shapes_frozen_lm", is_eval=True)
    builder_cls = registry.get_builder_class("shapes_visdial")
    ds_cfg = OmegaConf.load(builder_cls.default_config_path()).datasets.shapes_visdial
    ds_cfg.build_info.storage = data_dir
    val = builder_cls(ds_cfg).build_datasets()["val"]
    batches = [val.collater([val[i] for i in range(k, min(k + 8, len(val)))]) for k in range(0, 32, 8)]
    task = registry.get_task_class("free_visdial").setup_task(_cfg(
        max_len=5, num_beams=1, prompt="Dialogue: {} Answer:", compare_full_depth=True,
        generate_kwargs={"exit_threshold": 0.4}))
    results = task.evaluation(model, batches, cuda_enabled=False)
    metrics = task.after_evaluation(val_result=results, split_name="val")
    assert metrics["num_rounds"] == 32 and metrics["mrr"] > 0.4 and metrics["answer_accuracy"] > 30, metrics
    assert 0 < metrics["ndcg"] <= 1 and metrics["num_dense_rounds"] >= 1
    for prefix, parts in (("", ("image", "prefill", "decode")), ("ranking_", ("image", "prefill", "copy", "decode"))):
        assert metrics[f"{prefix}layer_speedup"] > 1 and f"{prefix}wallclock_speedup" in metrics, metrics
        assert all(metrics[f"{prefix}{side}time_{part}_s"] > 0 for side in ("", "full_depth_") for part in parts)
    assert "time_copy_s" not in metrics  # one answer per round: nothing is copied
    assert metrics["ranking_num_tokens"] > 30 * metrics["num_tokens"]  # 100 options per round, scored token by token
    with pytest.raises(ValueError, match="run.rank_options must be true or false"):
        registry.get_task_class("free_visdial").setup_task(_cfg(rank_options="no"))
