"""LAVIS models of the plugin; importing this registers `blip2_opt_free`, `blip2_t5_free` and `instructblip_free`.

LAVIS builds `lavis.models.model_zoo` (the listing of architectures and types) once, when
`lavis.models` is imported, before any plugin registers; it is rebuilt here, in place (so a
`from lavis.models import model_zoo` made earlier sees it too), with LAVIS's own `ModelZoo`.
"""
from lavis.models import ModelZoo, model_zoo

from lavis_free.models.blip2_opt_free import Blip2OPTFree  # noqa: F401
from lavis_free.models.blip2_t5_free import Blip2T5Free  # noqa: F401
from lavis_free.models.instructblip_free import InstructBlipFree  # noqa: F401

model_zoo.model_zoo = ModelZoo().model_zoo
