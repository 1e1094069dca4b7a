"""Evaluate with a LAVIS project YAML on its ``run.test_splits`` (weights as configured, no reload).

``python -m torch.distributed.run --nproc_per_node=N evaluate.py --cfg-path ...`` or plain
``python evaluate.py --cfg-path ...``.
"""
from lavis_free.common.dist import shutdown_distributed
from lavis_free.common.launch import build_runner, parse_args


def main() -> None:
    build_runner(parse_args("Evaluate a LAVIS model with lavis-free")).evaluate(skip_reload=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
