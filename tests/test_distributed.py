"""train.py under ``python -m torch.distributed.run --nproc_per_node=2`` on CPU (gloo), tiny sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_process_gloo_training_and_evaluation(shapes_data_dir, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "train.py"), "--cfg-path", str(REPO / "projects/free/shapes_caption.yaml"),
        "--job-id", "gloo",
        "--options", f"datasets.shapes_caption.build_info.storage={shapes_data_dir}",
        "run.max_epoch=1", "run.batch_size_train=8", "run.batch_size_eval=4", "run.valid_splits=[]",
        "run.test_splits=[test]", "run.report_metric=False", "run.max_len=5",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]

    assert "distributed init (rank 1, world 2, backend gloo)" in log
    assert "trainable-weight checksum agrees across 2 ranks" in log
    assert "Averaged stats" in log

    out = tmp_path / "output" / "shapes_caption" / "gloo"
    assert (out / "checkpoint_0.pth").is_file()
    rank_files = [json.loads((out / "result" / f"test_epoch0_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(rows) == 4 for rows in rank_files)
    merged = json.loads((out / "result" / "test_epoch0.json").read_text())
    assert sorted(row["image_id"] for row in merged) == sorted(r["image_id"] for rows in rank_files for r in rows)
    assert len({row["image_id"] for row in merged}) == 8
