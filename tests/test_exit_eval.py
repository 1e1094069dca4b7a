"""Exit figures of the free_* tasks: the tally's formulas, the evaluator, the task hooks, and
summing over 2 gloo processes."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from lavis.common.registry import registry
from lavis_free.hosts import AttachedExits
from lavis_free.tasks.exit_eval import ExitEvaluator, ExitTally

from helpers import free_port

# Two samples on a 12-layer LM, head_cost 0.5: tokens ran 12, 3, 6 and 12, 9 layers.
STATS = {
    "exit_layers": [[12, 3, 6], [12, 9]],
    "exit_blocks_run": [[0, 1, 2], [0, 3]],
    "heads_run": [[1, 1, 2], [1, 3]],
    "num_layers": 12,
    "head_cost": 0.5,
}
FULL_COST = 5 * (12 + 0.5)
RUN_COST = (12 + 0 + 0.5) + (3 + 1 + 0.5) + (6 + 2 + 1.0) + (12 + 0 + 0.5) + (9 + 3 + 1.5)


def test_tally_formulas_on_hand_made_stats():
    tally = ExitTally()
    tally.add_stats(STATS, seconds=2.0)
    tally.add_full_depth({"exit_layers": [[12] * 4, [12] * 2]}, seconds=5.0)
    summary = tally.summary()
    assert summary["num_tokens"] == 5 and summary["num_layers"] == 12
    assert summary["avg_exit_layer"] == pytest.approx((12 + 3 + 6 + 12 + 9) / 5)
    assert summary["layer_speedup"] == pytest.approx(FULL_COST / RUN_COST)
    assert summary["wallclock_speedup"] == pytest.approx(2.5)
    assert summary["tokens_per_s"] == pytest.approx(2.5)
    assert summary["full_depth_tokens_per_s"] == pytest.approx(6 / 5.0)
    assert tally.histogram[12] == 2 and tally.histogram[3] == tally.histogram[6] == tally.histogram[9] == 1


def test_full_depth_stats_give_speedup_one_and_no_wallclock_without_a_comparison():
    tally = ExitTally()
    tally.add_stats({"exit_layers": [[12, 12]], "exit_blocks_run": [[0, 0]], "heads_run": [[1, 1]], "num_layers": 12,
                     "head_cost": 0.3})
    summary = tally.summary()
    assert summary["layer_speedup"] == pytest.approx(1.0) and summary["avg_exit_layer"] == 12
    assert "wallclock_speedup" not in summary and "tokens_per_s" not in summary
    assert ExitTally().summary() == {}


def test_merge_adds_and_bad_stats_are_named():
    a, b = ExitTally(), ExitTally()
    a.add_stats(STATS, 1.0)
    b.add_stats(STATS, 3.0)
    merged = ExitTally().merge(a).merge(b)
    assert merged.tokens == 10 and merged.seconds == 4.0 and merged.histogram[12] == 4
    assert merged.summary()["layer_speedup"] == pytest.approx(FULL_COST / RUN_COST)
    with pytest.raises(ValueError, match="differ in length"):
        ExitTally().add_stats({**STATS, "heads_run": [[1], [1, 3]]})
    with pytest.raises(ValueError, match="outside"):
        ExitTally().add_stats({**STATS, "exit_layers": [[13, 3, 6], [12, 9]]})
    with pytest.raises(ValueError, match="different depths"):
        a.add_stats({**STATS, "num_layers": 24, "exit_layers": [[24, 3, 6], [24, 9]]})


class FakeExitModel(AttachedExits):
    """Records generate calls; exits halve the layers run."""

    def __init__(self):
        self.calls = []

    def generate(self, samples, exit_threshold=None, early_exit=None, return_exit_stats=False, **kwargs):
        self.calls.append("full" if early_exit is False else exit_threshold)
        layers = 12 if early_exit is False else 6
        stats = {"exit_layers": [[layers] * 3 for _ in samples["image"]], "exit_blocks_run": [[0] * 3 for _ in samples["image"]],
                 "heads_run": [[1] * 3 for _ in samples["image"]], "num_layers": 12, "head_cost": 0.0}
        texts = [f"t{exit_threshold}"] * len(samples["image"])
        return (texts, stats) if return_exit_stats else texts


def test_evaluator_compares_with_full_depth_in_alternating_order():
    model, evaluator = FakeExitModel(), ExitEvaluator(compare_full_depth=True)
    for _ in range(2):
        assert evaluator.decode(model.generate, {"image": [0, 1]}, exit_threshold=0.7) == ["t0.7", "t0.7"]
    assert model.calls == [0.7, "full", "full", 0.7]
    summary = evaluator.summary()
    assert summary["num_tokens"] == 12 and summary["avg_exit_layer"] == 6 and summary["layer_speedup"] == 2
    assert evaluator.tally.full_tokens == 12 and "wallclock_speedup" in summary
    evaluator.reset()
    assert evaluator.summary() == {}


def test_evaluator_leaves_models_without_exits_alone():
    calls = []

    def generate(samples, **kwargs):
        calls.append(kwargs)
        return ["a caption"]

    evaluator = ExitEvaluator(compare_full_depth=True)
    assert evaluator.decode(generate, {"image": [0]}, num_beams=1) == ["a caption"]
    assert calls == [{"num_beams": 1}] and evaluator.summary() == {}


def _task_cfg(**run):
    return OmegaConf.create({"run_cfg": {"task": "free_captioning", "num_beams": 1, "max_len": 6, "min_len": 1,
                                         "evaluate": True, "caption_scorers": ["bleu", "cider"], **run}})


def test_tasks_report_exit_figures_from_evaluation():
    from lavis_free.models.blip2_opt_free import Blip2OPTFree

    cfg = OmegaConf.merge(OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model, {"exits": {"layers": [2, 5, 8]}})
    torch.manual_seed(0)
    model = Blip2OPTFree.from_config(cfg).eval()
    batches = [{"image": torch.randn(2, 3, 64, 64), "image_id": torch.tensor([1, 2])} for _ in range(2)]
    for name in ("free_captioning", "free_vqa"):
        task = registry.get_task_class(name).setup_task(
            _task_cfg(compare_full_depth=True, generate_kwargs={"exit_threshold": 0.0}, prompt=""))
        if name == "free_vqa":
            for batch in batches:
                batch.update(text_input=["what colour?", "how many?"], question_id=torch.tensor([1, 2]))
        results = task.evaluation(model, batches, cuda_enabled=False)
        assert len(results) == 4
        figures = task.exit_metrics
        assert figures["avg_exit_layer"] < 12 and figures["layer_speedup"] > 1, figures
        assert {"wallclock_speedup", "tokens_per_s", "full_depth_tokens_per_s"} <= set(figures)
    with pytest.raises(ValueError, match="run.compare_full_depth"):
        registry.get_task_class("free_captioning").setup_task(_task_cfg(compare_full_depth="yes"))




def _reduce_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tally = ExitTally()
    if rank == 0:  # rank 1 decoded nothing: its depth comes from rank 0
        tally.add_stats(STATS, seconds=1.0)
    else:
        tally.seconds = 3.0
    summary = ExitTally().merge(tally).all_reduce().summary()
    torch.save(summary, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_figures_are_summed_over_two_gloo_processes(tmp_path):
    # fork: the workers inherit the imported modules instead of importing LAVIS again
    mp.start_processes(_reduce_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    summaries = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert summaries[0] == summaries[1]
    assert summaries[0]["num_tokens"] == 5 and summaries[0]["tokens_per_s"] == pytest.approx(5 / 4.0)
    assert summaries[0]["layer_speedup"] == pytest.approx(FULL_COST / RUN_COST)


def test_time_split_is_summed_per_part_for_each_decoding():
    tally = ExitTally()
    for image, prefill, decode in ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)):
        tally.add_stats({**STATS, "seconds": {"image": image, "prefill": prefill, "decode": decode}}, seconds=1.0)
    tally.add_full_depth({"exit_layers": [[12]], "seconds": {"image": 1.0, "prefill": 2.0, "decode": 4.0}}, seconds=7.0)
    summary = tally.summary()
    assert summary["time_image_s"] == pytest.approx(0.5) and summary["time_decode_s"] == pytest.approx(0.9)
    assert summary["full_depth_time_prefill_s"] == pytest.approx(2.0) and summary["full_depth_time_decode_s"] == 4.0
    merged = ExitTally().merge(tally).merge(tally).summary()
    assert merged["time_prefill_s"] == pytest.approx(1.4)
