"""Compatibility fixes applied by ``import lavis_free`` before anything else.

0. :mod:`.noise`: silence the known-noise warnings of fairscale, runpy and huggingface_hub
   (first, as fairscale warns when LAVIS imports it).
1. :mod:`.torchvision_ops`: when torchvision's compiled ops do not load (a CPU torch with the
   CUDA-only torchvision 0.28.0 wheel), define the op schemas torchvision's import needs.
2. :mod:`.lavis_env`: point LAVIS's cache root at ``$LAVIS_FREE_CACHE`` or
   ``~/.cache/lavis_free`` and register LAVIS's LR schedulers and runners.
3. :mod:`.weights` (used by the model's component hooks, not at import): fail fast, naming the
   missing files, when a real type's weights are not local and the hub is off or unreachable.

Why no ``.pth`` start-up hook for a bare ``import lavis``: every entry point of this project
(``train.py``, ``evaluate.py``, the run_scripts, the tests, ``lavis_free.*`` modules) imports
``lavis_free`` first, and a ``.pth`` file would run torch's import in every Python process of the
environment, including pip. Users of their own scripts write ``import lavis_free`` before
``import lavis`` (the README says so); a bare ``import lavis`` on a CPU torch still fails inside
torchvision, as without this plugin.
"""
from lavis_free.compat import noise

noise.silence_known_noise()

from lavis_free.compat import torchvision_ops  # noqa: E402

torchvision_ops.install_if_needed()

from lavis_free.compat import lavis_env  # noqa: E402  (imports lavis, hence after the fix)

lavis_env.configure()
