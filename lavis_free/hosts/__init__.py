"""The seam between LAVIS models and the exits core: one `HostBinding` per LAVIS model class,
and `attach_exits`, which adds exits to a built model by composition."""
from lavis_free.hosts.binding import HostBinding, SpecialIds, binding_for, register_host, supported_hosts
from lavis_free.hosts import blip2, blip2_t5, instructblip  # noqa: F401  (register the bindings)
from lavis_free.hosts.attached import AttachedExits, ExitCheckpointError, attach_exits, exits_of

__all__ = ["AttachedExits", "ExitCheckpointError", "HostBinding", "SpecialIds", "attach_exits", "binding_for",
           "exits_of", "register_host", "supported_hosts"]
