"""LAVIS's `Config`, with `--options model.model_type=X` honoured and unknown keys refused.

LAVIS 1.0.2 looks the override up as a flat key ("model.model_type") in options it has already
nested ({"model": {"model_type": X}}), so it never matches: the project file's type keeps
choosing the default model YAML, and only the type's name changes. A user then evaluates the
architecture and weights of another type without any error.

LAVIS also never checks the keys under ``run`` and ``model`` (its validator is commented out),
so a typo such as ``run.max_epoh`` silently leaves the default in force. Here every top-level
key of those sections, from the project YAML and ``--options``, must be one that code actually
reads. The known keys are not a hand-kept list: they are collected from the source of what
reads them (see :func:`known_run_keys`, :func:`known_model_keys`), so a key LAVIS or the plugin
starts reading is known without an edit here.
"""
from __future__ import annotations

import ast
import difflib
import functools
import inspect
from pathlib import Path
from typing import Any, Iterable, Mapping

import lavis
from lavis.common.config import Config, create_runner_config_validator
from lavis.common.registry import registry
from omegaconf import OmegaConf

# Where ``run.*`` settings are read: LAVIS's runners and tasks, and the whole plugin.
RUN_KEY_SOURCES = (
    Path(lavis.__file__).parent / "runners",
    Path(lavis.__file__).parent / "tasks",
    Path(__file__).resolve().parents[1],  # lavis_free
)
# Read under a variable name rather than a literal key: LAVIS's Config reads ``model.arch`` and
# ``model.model_type`` off its ``model`` section; ``run.optim`` keys are read in a loop.
# `load_pretrained` is read by nothing in LAVIS 1.0.2 but its own pretrain_stage{1,2}.yaml carry
# it; accepted so that LAVIS's project YAMLs run unchanged.
_MODEL_SECTION_KEYS = frozenset({"arch", "model_type", "load_pretrained"})
_MAPPING_METHODS = frozenset({"get", "items", "keys", "values", "pop", "copy", "setdefault", "update"})


def _is_config(node: ast.AST, names: frozenset[str]) -> bool:
    """`run_cfg` or `<anything>.run_cfg` (for names={"run_cfg"})."""
    return (isinstance(node, ast.Name) and node.id in names) or (isinstance(node, ast.Attribute) and node.attr in names)


def _literal(node: ast.AST) -> Any:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def keys_read(source: str, names: Iterable[str]) -> set[str]:
    """Literal keys read from (or written to) a mapping called one of ``names`` in ``source``:
    ``cfg.get("k")``, ``cfg["k"]`` and ``cfg.k``."""
    names = frozenset(names)
    keys = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            if _is_config(node.func.value, names) and node.args and _literal(node.args[0]):
                keys.add(_literal(node.args[0]))
        elif isinstance(node, ast.Subscript) and _is_config(node.value, names) and _literal(node.slice):
            keys.add(_literal(node.slice))
        elif isinstance(node, ast.Attribute) and _is_config(node.value, names) and node.attr not in _MAPPING_METHODS:
            keys.add(node.attr)
    return keys


@functools.lru_cache(maxsize=None)
def known_run_keys() -> frozenset[str]:
    """Every ``run.*`` key read by LAVIS 1.0.2's runners and tasks or by lavis-free, plus the
    keys of LAVIS's own (unused) runner-config validator and the per-group optimizer keys."""
    from lavis_free.runners.optim import OPTIM_KEYS

    keys = set(create_runner_config_validator().arguments) | set(OPTIM_KEYS)
    for root in RUN_KEY_SOURCES:
        for path in sorted(root.rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            keys |= keys_read(source, {"run_cfg"})
            if root.name == "tasks":  # LAVIS tasks keep run_cfg as `self.config`
                keys |= {k for k in keys_read(source, {"config"}) if k != "run_cfg"}
    return frozenset(keys)


def model_config_paths(model_cls: type) -> list[str]:
    """The default model YAML of every type of ``model_cls``."""
    return [str(model_cls.default_config_path(model_type)) for model_type in model_cls.PRETRAINED_MODEL_CONFIG_DICT]


@functools.lru_cache(maxsize=None)
def known_model_keys(arch: str) -> frozenset[str]:
    """Keys of ``arch``'s default model YAMLs, plus every ``cfg`` key the modules of its classes
    read (``from_config``, ``load_checkpoint_from_config``, their helpers), plus ``arch`` and
    ``model_type``."""
    model_cls = registry.get_model_class(arch)
    keys = set(_MODEL_SECTION_KEYS)
    for path in model_config_paths(model_cls):
        keys |= set(OmegaConf.load(path).get("model", {}) or {})
    for klass in model_cls.__mro__:
        if klass.__module__.split(".")[0] in ("lavis", "lavis_free"):
            # the whole module: from_config may read keys through module-level helpers
            keys |= keys_read(inspect.getsource(inspect.getmodule(klass)), {"cfg"})
    from lavis_free.hosts import supported_hosts
    from lavis_free.tasks import model_building

    if any(klass.__name__ in supported_hosts() for klass in model_cls.__mro__):
        # a LAVIS class the plugin's tasks attach exits to (`model.exits`, `model.exits_checkpoint`)
        keys |= keys_read(inspect.getsource(model_building), {"model_cfg"})
    return frozenset(keys)


def _unknown_key_error(section: str, key: str, known: frozenset[str], documented: str) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {section}.{close[0]}?)" if close else ""
    return ValueError(
        f"{section}.{key}: unknown key{hint}; known {section} keys: {', '.join(sorted(known))}. {documented}"
    )


# The top-level sections LAVIS's Config reads; a dataset section's own keys beside `build_info`
# (`type` is the builder's config type, read by LAVIS's Config.build_dataset_config).
SECTIONS = ("model", "datasets", "run")
_DATASET_SECTION_KEYS = frozenset({"data_type", "build_info", "vis_processor", "text_processor", "type"})


@functools.lru_cache(maxsize=None)
def known_dataset_keys(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """(keys of ``datasets.<name>``, keys of its ``build_info``): those of the builder's default
    dataset YAMLs, plus what LAVIS's builders and the builder class read."""
    builder_cls = registry.get_builder_class(name)
    section, build_info = set(_DATASET_SECTION_KEYS), set()
    for config_type in builder_cls.DATASET_CONFIG_DICT:
        dataset = OmegaConf.load(builder_cls.default_config_path(config_type)).datasets.get(name, {}) or {}
        section |= set(dataset)
        build_info |= set(dataset.get("build_info", {}) or {})
    for klass in builder_cls.__mro__:
        if klass.__module__.split(".")[0] in ("lavis", "lavis_free"):
            build_info |= keys_read(inspect.getsource(klass), {"build_info", "info"})
    return frozenset(section), frozenset(build_info)


# run.* settings LAVIS reads unchecked that must be whole numbers of at least this much.
RUN_MINIMUMS = {"max_epoch": 1, "batch_size_train": 1, "batch_size_eval": 1, "accum_grad_iters": 1, "num_workers": 0}


def check_run_values(run: Mapping[str, Any]) -> None:
    """A zero epoch count or batch size would train or evaluate nothing, or fail deep in torch."""
    for key, low in RUN_MINIMUMS.items():
        value = run.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"run.{key}={value!r} is invalid: expected an integer >= {low}")


def _check_section(section: str, given: Iterable[str], known: frozenset[str], documented: str) -> None:
    for key in given:
        if key not in known:
            raise _unknown_key_error(section, key, known, documented)


def check_known_keys(config: Mapping[str, Any]) -> None:
    """Refuse a top-level section, a ``run.*`` / ``model.*`` key, or a key of a dataset section
    or its ``build_info`` that nothing reads, naming it and a close match; and run counts that
    cannot work (:func:`check_run_values`)."""
    for section in config:
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{section}: unknown top-level section{hint}; a LAVIS config has {', '.join(SECTIONS)}")
    _check_section(
        "run", config.get("run", None) or {}, known_run_keys(),
        "They are read by LAVIS 1.0.2's runners and tasks and by lavis-free; the commented "
        "project YAMLs in projects/free/ show them in use.",
    )
    check_run_values(config.get("run", None) or {})
    model = config.get("model", None) or {}
    arch = model.get("arch", None)
    if arch is not None and registry.get_model_class(arch) is not None:
        # (a missing or unknown arch is reported by LAVIS's Config and launch.check_registered_names)
        _check_section(
            "model", model, known_model_keys(arch),
            f"They are the keys of {arch}'s model YAMLs "
            f"({', '.join(model_config_paths(registry.get_model_class(arch)))}) and those its from_config reads.",
        )
    for name, dataset in (config.get("datasets", None) or {}).items():
        builder_cls = registry.get_builder_class(name)
        if builder_cls is None or not dataset:
            continue  # an unknown builder is reported by launch.check_registered_names
        section, build_info = known_dataset_keys(name)
        documented = f"They are the keys of the builder's default YAML ({builder_cls.default_config_path()})."
        _check_section(f"datasets.{name}", dataset, section, documented)
        _check_section(f"datasets.{name}.build_info", dataset.get("build_info", None) or {}, build_info, documented)


class FreeConfig(Config):
    def __init__(self, args: Any) -> None:
        """Check the user's ``run``/``model`` keys (project YAML and ``--options``) before LAVIS
        merges in the model YAML's defaults, which would hide nothing but cost a model build."""
        check_known_keys(OmegaConf.merge(OmegaConf.load(args.cfg_path), self._build_opt_list(args.options)))
        super().__init__(args)

    @staticmethod
    def build_model_config(config: Any, **kwargs: Any) -> Any:
        model_type = (kwargs.get("model") or {}).get("model_type")
        if model_type:
            config = OmegaConf.merge(config, {"model": {"model_type": model_type}})
        return Config.build_model_config(config, **kwargs)
