"""lavis-free: FREE early exits for LAVIS vision-language models.

Importing this package registers every model, dataset builder, task and runner of the plugin
with LAVIS's registry. `attach_exits(model, exits)` adds FREE exits to a LAVIS model already
built (`Blip2OPT`, `Blip2T5`, the plugin's models); `exits_of(model)` returns them. The compat fixes run first because LAVIS imports torchvision.
"""
from lavis_free import compat  # noqa: F401  (must precede any lavis import)
from lavis_free import models  # noqa: F401,E402
from lavis_free.datasets import builders  # noqa: F401,E402
from lavis_free import tasks  # noqa: F401,E402
from lavis_free import runners  # noqa: F401,E402
from lavis_free.api import load_model  # noqa: F401,E402
from lavis_free.hosts import attach_exits, exits_of  # noqa: F401,E402

__version__ = "0.1.0"
