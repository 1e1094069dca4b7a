"""Runners registered with LAVIS: ``runner_free``."""
from lavis_free.runners.runner_free import RunnerFree  # noqa: F401
