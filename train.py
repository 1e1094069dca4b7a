"""Train with a LAVIS project YAML: ``python -m torch.distributed.run --nproc_per_node=N train.py --cfg-path ...``.

Also runs as a plain ``python train.py --cfg-path ...`` (one process). See
:mod:`lavis_free.common.launch` for what happens before ``runner.train()``.
"""
from lavis_free.common.dist import shutdown_distributed
from lavis_free.common.launch import build_runner, parse_args


def main() -> None:
    build_runner(parse_args("Train a LAVIS model with lavis-free")).train()
    shutdown_distributed()


if __name__ == "__main__":
    main()
