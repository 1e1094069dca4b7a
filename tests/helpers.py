"""Small helpers several test modules share (import as `from helpers import ...`)."""
import socket

import torch
from omegaconf import OmegaConf

from lavis_free.models.blip2_opt_free import Blip2OPTFree


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for a gloo rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model(**overrides) -> Blip2OPTFree:
    """The `tiny` blip2_opt_free (random weights, seed 0), its model YAML merged with `overrides`."""
    cfg = OmegaConf.merge(OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model, overrides)
    torch.manual_seed(0)
    return Blip2OPTFree.from_config(cfg)
