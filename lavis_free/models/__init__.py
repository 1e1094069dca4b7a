"""LAVIS models of the plugin; importing this registers `blip2_opt_free`."""
from lavis_free.models.blip2_opt_free import Blip2OPTFree  # noqa: F401
