"""Bad-input probe: throws crafted files, typos, bad values and faults at lavis-free, one at a time.

    .venv/bin/python run_scripts/probe_bad_inputs.py            # all probes, writes docs/bad_inputs.{md,json}
    .venv/bin/python run_scripts/probe_bad_inputs.py --only security --only cache   # a subset, no docs written

Why: issue 12 asks for a table of the bad inputs tried, each with the error a user now sees. A
table written by hand goes stale as the code changes; this script re-measures it. Each probe runs
in a worker process under its own time limit and its own temporary directory, so one probe that
hangs, crashes the interpreter or leaves state behind cannot stop or skew the others (the worker
is restarted). The verdict is decided by checks encoded per probe, not by reading the output:

- clear error: an exception whose message contains every expected piece (the key, argument or
  file, and what is allowed) and none of the rejected ones (an invitation to load unsafely);
- handled: no error, and the right thing happened (a warning naming the problem, a corrupted
  cache entry recomputed, a first-hour check that passes);
- unhelpful error: any other exception; crash: an internal exception type (ZeroDivisionError,
  IndexError, ...) or a dead process; hang: the probe's time limit passed;
- silently accepted: the bad input was used without a word; data lost: earlier results or work
  were overwritten or thrown away; code ran: a payload's marker file appeared.

Everything is written under one temporary directory (removed at the end unless --keep-tmp); the
repository is only read, except for the two docs written after a full run.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

REPO = Path(__file__).resolve().parents[1]
SHAPES_YAML = str(REPO / "projects/free/shapes_caption.yaml")
ASSETS = REPO / "lavis_free/models/assets/shapes_tiny"
EXITS_FILE = str(ASSETS / "exits_free.pth")
BACKBONE_FILE = str(ASSETS / "blip2_opt_free_shapes_tiny.pth")
DATA_SIZES = ("--train", "2", "--val", "4", "--test", "4", "--shards", "1")

VERDICTS = ("clear error", "handled", "unhelpful error", "silently accepted", "crash", "hang", "data lost", "code ran")
INTERNAL_ERRORS = {"ZeroDivisionError", "IndexError", "KeyError", "AttributeError", "AssertionError", "NameError",
                   "UnboundLocalError", "RecursionError", "StopIteration", "NotImplementedError"}
UNSAFE_INVITATIONS = ("weights_only set to False", "weights_only=False")
MESSAGE_CHARS = 160

Expectation = Union[str, Tuple[str, ...]]  # a piece the message must contain (a tuple: any one of them)


# ---------------------------------------------------------------------------------------------
# probe registry
# ---------------------------------------------------------------------------------------------
@dataclass
class Probe:
    name: str
    cls: str
    tried: str
    fn: Callable[["Ctx"], Optional["Outcome"]]
    expect: Tuple[Expectation, ...]
    reject: Tuple[str, ...]
    timeout: float
    warn_ok: bool  # a warning/log record carrying every expected piece counts as handled


@dataclass
class Outcome:
    """What a probe reports when it decides the verdict itself (data lost, handled, ...)."""

    verdict: str
    note: str = ""
    error: Optional[BaseException] = None


class CliError(Exception):
    """A command-line run that failed: carries the exception type and message it printed."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


class ProbeTimeout(BaseException):
    """Raised by the worker's alarm; a BaseException so that `except Exception` in the code
    under test cannot swallow it."""


PROBES: List[Probe] = []


def probe(cls: str, tried: str, expect: Sequence[Expectation] = (), reject: Sequence[str] = (), timeout: float = 60,
          warn_ok: bool = False) -> Callable:
    """Registers the decorated function as a probe of class `cls`."""
    def register(fn: Callable) -> Callable:
        PROBES.append(Probe(fn.__name__, cls, tried, fn, tuple(expect), tuple(reject), timeout, warn_ok))
        return fn
    return register


# ---------------------------------------------------------------------------------------------
# worker-side context: temporary paths, fixtures built once per run (on disk) or per worker
# ---------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs `exec` on code that writes the probe's marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@dataclass
class Ctx:
    root: Path            # the run's temporary directory
    data: str             # the generated shapes dataset (read-only for probes)
    dir: Path = Path(".")  # this probe's own directory (the current directory while it runs)
    extra_expect: List[Expectation] = field(default_factory=list)
    _memo: Dict[str, Any] = field(default_factory=dict)

    @property
    def marker(self) -> str:
        return str(self.dir / "MARKER_code_ran")

    def file(self, name: str, content: bytes) -> str:
        path = self.dir / name
        path.write_bytes(content)
        return str(path)

    def payload_file(self, name: str, wrap: Callable[[Any], Any] = lambda p: {"model": p}) -> str:
        import torch

        path = str(self.dir / name)
        torch.save(wrap(Payload(self.marker)), path)
        return path

    def saved(self, name: str, obj: Any) -> str:
        import torch

        path = str(self.dir / name)
        torch.save(obj, path)
        return path

    def truncated_copy(self, source: str, name: str) -> str:
        data = Path(source).read_bytes()
        return self.file(name, data[: len(data) // 2])

    def data_copy(self) -> str:
        target = self.dir / "data"
        shutil.copytree(self.data, target)
        return str(target)

    def blocked_out(self) -> str:
        """An --out directory that cannot be created (its parent is a regular file; root can't
        write there either)."""
        blocker = self.dir / "blocker_file"
        blocker.write_text("not a directory")
        return str(blocker / "out")

    # -- fixtures ------------------------------------------------------------------------------
    def shapes_model(self):
        if "model" not in self._memo:
            import lavis_free

            self._memo["model"] = lavis_free.load_model("blip2_opt_free", "shapes_tiny")
        return self._memo["model"]

    def fixture_dir(self, name: str) -> Path:
        path = self.root / "fixtures" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def trained(self) -> Tuple[str, str]:
        """(runner checkpoint of exits after layers 2,5,8, feature cache it filled), built once."""
        where = self.fixture_dir("train")
        ckpt, cache = where / "output/shapes_caption/fixture/checkpoint_0.pth", where / "cache"
        if not ckpt.is_file():
            with chdir(where):
                run_project(self, [f"run.exit_feature_cache={cache}"], job_id="fixture")
        return str(ckpt), str(cache)

    def cache_with_victim(self) -> Tuple[Path, Path]:
        """A copy of the trained fixture's feature cache and one of its entries (for damaging),
        whose name the error or warning must carry."""
        copy = self.dir / "cache"
        shutil.copytree(self.trained()[1], copy)
        victim = sorted(copy.glob("*/*.pt"))[0]
        self.extra_expect.append(victim.name)
        return copy, victim

    def calibration(self) -> str:
        where = self.fixture_dir("calibrate")
        path = where / "out/calibration.json"
        if not path.is_file():
            with chdir(where):
                calibrate_main(eval_argv(self, "--calib-split", "val", "--test-split", "test", "--out", str(path.parent)))
        return str(path)


@contextlib.contextmanager
def chdir(path: Union[str, Path]) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Environment variables set for the block (torch reads TORCH_FORCE_* at each load)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


FORCE_UNSAFE = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


def base_options(ctx: Ctx) -> List[str]:
    return [f"datasets.shapes_caption.build_info.storage={ctx.data}", "run.max_epoch=1", "run.batch_size_train=8",
            "run.batch_size_eval=4", "run.max_len=5", "run.log_freq=1", "run.caption_scorers=[bleu,cider]"]


def cli(call: Callable[[], Any]) -> Any:
    """Runs a command-line entry point in this process; an argparse usage error (SystemExit)
    becomes a CliError carrying the line it printed."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return call()
    except SystemExit as exc:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise CliError(f"SystemExit({exc.code})", lines[-1] if lines else str(exc.code)) from None


def run_project(ctx: Ctx, options: Sequence[str], job_id: Optional[str] = None, action: Optional[str] = "train",
                cfg_path: str = SHAPES_YAML, base: bool = True) -> Any:
    """train.py / evaluate.py in this process (as `python train.py --cfg-path ... --options ...`);
    `action=None` only builds the runner."""
    from lavis_free.common.launch import build_runner, parse_args

    argv = ["--cfg-path", cfg_path, "--options", *(base_options(ctx) if base else []), *options]
    argv += ["--job-id", job_id] if job_id else []
    runner = build_runner(cli(lambda: parse_args("probe", argv)))
    if action == "train":
        runner.train()
    elif action == "evaluate":
        runner.evaluate(skip_reload=True)
    return runner


def eval_argv(ctx: Ctx, *args: str, options: Sequence[str] = ()) -> List[str]:
    return ["--cfg-path", SHAPES_YAML, "--options", f"datasets.shapes_caption.build_info.storage={ctx.data}",
            "run.caption_scorers=[bleu,cider]", "run.max_len=5", *options, "--max-samples", "4", "--batch-size", "4",
            "--no-progress", "--threads", "1", *args]


def calibrate_main(argv: List[str]) -> Any:
    from lavis_free.evaluation import calibrate

    return cli(lambda: calibrate.main(argv + ["--thresholds", "0.0", "0.5"]))


@contextlib.contextmanager
def count_decodes() -> Iterator[List[int]]:
    """Counts decoding calls through attached exits, to tell "refused up front" from "did the
    work, then failed to write it" (data lost)."""
    from lavis_free.hosts import AttachedExits as cls

    original = cls.generate_texts
    calls = [0]

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    cls.generate_texts = counted
    try:
        yield calls
    finally:
        cls.generate_texts = original


def lost_unless_refused(run: Callable[[], Any]) -> Optional[Outcome]:
    """Runs a CLI whose --out is unwritable: an error after decoding means the work was lost."""
    with count_decodes() as calls:
        try:
            run()
        except Exception as exc:
            if calls[0]:
                return Outcome("data lost", f"failed after {calls[0]} decode calls", exc)
            raise
    return Outcome("silently accepted", "finished without writing --out")


def build_model(*overrides: str, model_type: str = "shapes_tiny"):
    """blip2_opt_free from a model type's YAML with dotlist overrides (as a model YAML would say)."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_model_class("blip2_opt_free")
    cfg = OmegaConf.load(cls.default_config_path(model_type)).model
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cls.from_config(cfg)


def image(*shape: int, dtype: str = "float32", fill: Optional[float] = None):
    import torch

    tensor = torch.rand(*shape) if fill is None else torch.full(shape, fill)
    return tensor.to(getattr(torch, dtype)) if dtype != "uint8" else (tensor * 255).to(torch.uint8)


def run_cli(argv: Sequence[str], timeout: float, extra_env: Optional[Dict[str, str]] = None,
            drop_env: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """A separate process (for what depends on process start: env read at import, warnings).
    A non-zero exit raises CliError with the last exception line it printed; running past
    `timeout` raises ProbeTimeout."""
    proc_env = {k: v for k, v in {**os.environ, **(extra_env or {})}.items() if k not in drop_env}
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=proc_env)
    except subprocess.TimeoutExpired:
        raise ProbeTimeout(f"no answer within {timeout:.0f} s") from None
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(" ")]
    if proc.returncode < 0:
        raise CliError(f"signal {-proc.returncode}", lines[-1] if lines else "")
    if proc.returncode:
        for line in reversed(lines):
            head, sep, rest = line.partition(": ")
            if sep and head.replace(".", "").replace("_", "").isalnum():
                raise CliError(head.rsplit(".", 1)[-1], rest)
        raise CliError(f"exit {proc.returncode}", lines[-1] if lines else "")
    return proc


# ---------------------------------------------------------------------------------------------
# security: crafted pickles and shards (the marker file appearing = code ran)
# ---------------------------------------------------------------------------------------------
SAFE = dict(reject=UNSAFE_INVITATIONS, timeout=60)


def _with_env(force: bool) -> contextlib.AbstractContextManager:
    return env(**FORCE_UNSAFE) if force else contextlib.nullcontext()


def recomputed(entry: Path) -> Outcome:
    """After a run over a damaged cache entry: handled if the run replaced it with a readable
    one (treated as a miss), else the entry was never looked at or kept as it was."""
    import torch

    try:
        torch.load(entry, map_location="cpu", weights_only=True)
    except Exception:
        return Outcome("silently accepted", f"run finished; {entry.name} neither reported nor recomputed")
    return Outcome("handled", f"run finished; {entry.name} recomputed (treated as a miss)")


def _payload_as_model_key(key: str, force: bool) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        path = ctx.payload_file(f"payload_{key}.pth")
        overrides = [f"{key}={path}"] + (["load_finetuned=False", "finetuned="] if key == "pretrained" else [])
        with _with_env(force):
            build_model(*overrides)
    return run


for _key in ("finetuned", "pretrained", "exits_checkpoint"):
    for _force in (False, True):
        _fn = _payload_as_model_key(_key, _force)
        _fn.__name__ = f"payload_model_{_key}{'_force_unsafe' if _force else ''}"
        probe("security", f"crafted pickle as model.{_key}" + (" with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1" if _force else ""),
              expect=[f"payload_{_key}.pth"], **SAFE)(_fn)


@probe("security", "crafted pickle as load_model(checkpoint=)", expect=["payload_load_model.pth"], **SAFE)
def payload_load_model(ctx: Ctx) -> None:
    import lavis_free

    lavis_free.load_model("blip2_opt_free", "shapes_tiny", checkpoint=ctx.payload_file("payload_load_model.pth"))


@probe("security", "crafted pickle as load_model(checkpoint=) with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1",
       expect=["payload_load_model.pth"], **SAFE)
def payload_load_model_force_unsafe(ctx: Ctx) -> None:
    with env(**FORCE_UNSAFE):
        payload_load_model(ctx)


@probe("security", "crafted pickle as run.resume_ckpt_path", expect=["payload_resume.pth"], **SAFE)
def payload_resume(ctx: Ctx) -> None:
    run_project(ctx, [f"run.resume_ckpt_path={ctx.payload_file('payload_resume.pth')}", "model.exits_checkpoint="])


@probe("security", "crafted pickle as run.resume_ckpt_path with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1",
       expect=["payload_resume.pth"], **SAFE)
def payload_resume_force_unsafe(ctx: Ctx) -> None:
    with env(**FORCE_UNSAFE):
        payload_resume(ctx)


@probe("security", "crafted pickle as a feature-cache entry (run.exit_feature_cache), with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1",
       **SAFE)
def payload_feature_cache(ctx: Ctx) -> Optional[Outcome]:
    copy, victim = ctx.cache_with_victim()
    import torch

    torch.save(Payload(ctx.marker), victim)
    with env(**FORCE_UNSAFE):
        run_project(ctx, [f"run.exit_feature_cache={copy}"])
    return recomputed(victim)


@probe("security", "crafted pickle as the input of python -m lavis_free.models.export", expect=["payload_export.pth"],
       **SAFE)
def payload_export(ctx: Ctx) -> None:
    from lavis_free.models.export import export_weights

    with env(**FORCE_UNSAFE):
        export_weights(ctx.payload_file("payload_export.pth"), str(ctx.dir / "out.pth"))


def _shard_with(member: str) -> Callable[[Ctx], Optional[Outcome]]:
    def run(ctx: Ctx) -> Optional[Outcome]:
        import torch
        from lavis.common.registry import registry
        from omegaconf import OmegaConf

        data = ctx.data_copy()
        clean = sorted(Path(data, "shards").glob("*.tar"))[0]
        evil = Path(data, "shards", "evil.tar")
        with tarfile.open(clean) as src, tarfile.open(evil, "w") as dst:
            for info in src.getmembers():
                dst.addfile(info, src.extractfile(info))
                if info.name.endswith(".json"):
                    buffer = io.BytesIO()
                    if member == "pth":
                        torch.save(Payload(ctx.marker), buffer)
                    else:
                        pickle.dump(Payload(ctx.marker), buffer)
                    extra = tarfile.TarInfo(info.name[: -len("json")] + member)
                    extra.size = len(buffer.getvalue())
                    buffer.seek(0)
                    dst.addfile(extra, buffer)
        builder_cls = registry.get_builder_class("shapes_caption")
        cfg = OmegaConf.load(builder_cls.default_config_path()).datasets["shapes_caption"]
        cfg.build_info.storage = data
        cfg.build_info.shards = "shards/evil.tar"
        train = builder_cls(cfg).build_datasets()["train"]
        stream = iter(train)
        for _ in range(3):
            next(stream)
        return Outcome("handled", f".{member} member not decoded")
    return run


for _member in ("pyd", "pkl", "pth"):
    _fn = _shard_with(_member)
    _fn.__name__ = f"shard_{_member}_member"
    probe("security", f"webdataset train shard with a crafted .{_member} member (build_info.shards)",
          expect=[("evil.tar", f".{_member}")], **SAFE)(_fn)


def _random_bytes(ctx: Ctx) -> str:
    return ctx.file("random_bytes.pth", hashlib.sha512(b"not a checkpoint").digest() * 64)


@probe("security", "random-bytes file as model.exits_checkpoint (error must not invite an unsafe load)",
       expect=["random_bytes.pth", "exits_checkpoint"], **SAFE)
def random_bytes_exits_checkpoint(ctx: Ctx) -> None:
    build_model(f"exits_checkpoint={_random_bytes(ctx)}")


@probe("security", "random-bytes file as load_model(checkpoint=)", expect=["random_bytes.pth"], **SAFE)
def random_bytes_load_model(ctx: Ctx) -> None:
    import lavis_free

    lavis_free.load_model("blip2_opt_free", "shapes_tiny", checkpoint=_random_bytes(ctx))


@probe("security", "random-bytes file as run.resume_ckpt_path", expect=["random_bytes.pth", "resume_ckpt_path"], **SAFE)
def random_bytes_resume(ctx: Ctx) -> None:
    run_project(ctx, [f"run.resume_ckpt_path={_random_bytes(ctx)}"])


# ---------------------------------------------------------------------------------------------
# checkpoint mismatches
# ---------------------------------------------------------------------------------------------
CKPT = "checkpoint"


@probe(CKPT, "empty dict {} as model.exits_checkpoint", expect=["empty_dict.pth", "exits_checkpoint"])
def empty_dict_exits_checkpoint(ctx: Ctx) -> None:
    build_model(f"exits_checkpoint={ctx.saved('empty_dict.pth', {})}")


@probe(CKPT, "{'model': {}} as load_model(checkpoint=)", expect=["empty_model.pth"])
def empty_model_load_model(ctx: Ctx) -> None:
    import lavis_free

    lavis_free.load_model("blip2_opt_free", "shapes_tiny", checkpoint=ctx.saved("empty_model.pth", {"model": {}}))


@probe(CKPT, "another module's state dict (nn.Linear) as model.exits_checkpoint", expect=["linear.pth", "exit"])
def other_module_exits_checkpoint(ctx: Ctx) -> None:
    import torch

    build_model(f"exits_checkpoint={ctx.saved('linear.pth', torch.nn.Linear(4, 4).state_dict())}")


@probe(CKPT, "the backbone file (blip2_opt_free_shapes_tiny.pth) as model.exits_checkpoint",
       expect=["blip2_opt_free_shapes_tiny.pth", "exit"])
def backbone_as_exits_checkpoint(ctx: Ctx) -> None:
    build_model(f"exits_checkpoint={BACKBONE_FILE}")


@probe(CKPT, "the backbone file as load_model('blip2_opt_free', 'tiny', checkpoint=) (no exits configured)",
       expect=["blip2_opt_free_shapes_tiny.pth", "exit"])
def backbone_as_checkpoint_of_tiny(ctx: Ctx) -> Optional[Outcome]:
    import lavis_free

    lavis_free.load_model("blip2_opt_free", "tiny", checkpoint=BACKBONE_FILE)
    return Outcome("handled", "a backbone checkpoint is a valid backbone load")


@probe(CKPT, "the exits file (exits_free.pth) as model.finetuned (backbone stays random)",
       expect=["exits_free.pth", "finetuned"])
def exits_as_finetuned(ctx: Ctx) -> None:
    build_model(f"finetuned={EXITS_FILE}", "exits_checkpoint=")


@probe(CKPT, "exported exits of layers [2,5,8] as model.exits_checkpoint with model.exits.layers=[1,4,7]",
       expect=["exits_free.pth", "[2,5,8]", "[1,4,7]"])
def exported_exits_other_layers(ctx: Ctx) -> None:
    build_model("exits.layers=[1,4,7]", f"exits_checkpoint={EXITS_FILE}")


@probe(CKPT, "runner checkpoint of exits [2,5,8] as model.exits_checkpoint with model.exits.layers=[1,4,7]",
       expect=["checkpoint_0.pth", "[2,5,8]", "[1,4,7]"], timeout=120)
def runner_ckpt_other_layers(ctx: Ctx) -> None:
    ckpt, _ = ctx.trained()
    build_model("exits.layers=[1,4,7]", f"exits_checkpoint={ckpt}")


@probe(CKPT, "resume (run.resume_ckpt_path) a runner checkpoint of exits [2,5,8] with model.exits.layers=[1,4,7]",
       expect=["checkpoint_0.pth", "[2,5,8]", "[1,4,7]"], timeout=120)
def resume_other_layers(ctx: Ctx) -> None:
    ckpt, _ = ctx.trained()
    run_project(ctx, ["model.exits.layers=[1,4,7]", "model.exits_checkpoint=", f"run.resume_ckpt_path={ckpt}",
                      "run.max_epoch=2"])


@probe(CKPT, "exported free exits as model.exits_checkpoint with model.exits.layout=vanilla",
       expect=["exits_free.pth", "vanilla"])
def exits_other_layout(ctx: Ctx) -> None:
    build_model("exits.layout=vanilla", f"exits_checkpoint={EXITS_FILE}")


@probe(CKPT, "exits file with one tensor reshaped (another architecture) as model.exits_checkpoint",
       expect=["reshaped.pth", "shape"])
def exits_wrong_shape(ctx: Ctx) -> None:
    import torch

    state = torch.load(EXITS_FILE, map_location="cpu", weights_only=True)
    model = state.get("model", state)
    key = next(k for k, v in model.items() if getattr(v, "ndim", 0) == 2)
    model[key] = model[key][:, :-1].clone()
    build_model(f"exits_checkpoint={ctx.saved('reshaped.pth', state)}")


@probe(CKPT, "exits file whose tensors are NaN as model.exits_checkpoint", expect=["nan_exits.pth", ("nan", "finite")])
def exits_nan(ctx: Ctx) -> None:
    import torch

    state = torch.load(EXITS_FILE, map_location="cpu", weights_only=True)
    model = state.get("model", state)
    for key, value in model.items():
        if key != "exit_layers" and value.is_floating_point():
            value.fill_(float("nan"))
    build_model(f"exits_checkpoint={ctx.saved('nan_exits.pth', state)}")


@probe(CKPT, "truncated exits file as model.exits_checkpoint", expect=["truncated.pth", "exits_checkpoint"])
def truncated_exits_checkpoint(ctx: Ctx) -> None:
    build_model(f"exits_checkpoint={ctx.truncated_copy(EXITS_FILE, 'truncated.pth')}")


@probe(CKPT, "empty (0-byte) file as model.exits_checkpoint", expect=["zero.pth", "exits_checkpoint"])
def empty_file_exits_checkpoint(ctx: Ctx) -> None:
    build_model(f"exits_checkpoint={ctx.file('zero.pth', b'')}")


@probe(CKPT, "truncated backbone file as model.finetuned", expect=["truncated.pth", "finetuned"])
def truncated_finetuned(ctx: Ctx) -> None:
    build_model(f"finetuned={ctx.truncated_copy(BACKBONE_FILE, 'truncated.pth')}")


@probe(CKPT, "truncated file as load_model(checkpoint=)", expect=["truncated.pth"])
def truncated_load_model(ctx: Ctx) -> None:
    import lavis_free

    lavis_free.load_model("blip2_opt_free", "shapes_tiny", checkpoint=ctx.truncated_copy(EXITS_FILE, "truncated.pth"))


@probe(CKPT, "truncated runner checkpoint as run.resume_ckpt_path", expect=["truncated.pth", "resume_ckpt_path"],
       timeout=120)
def truncated_resume(ctx: Ctx) -> None:
    ckpt, _ = ctx.trained()
    run_project(ctx, [f"run.resume_ckpt_path={ctx.truncated_copy(ckpt, 'truncated.pth')}"])


@probe(CKPT, "empty (0-byte) file as run.resume_ckpt_path", expect=["zero.pth", "resume_ckpt_path"])
def empty_file_resume(ctx: Ctx) -> None:
    run_project(ctx, [f"run.resume_ckpt_path={ctx.file('zero.pth', b'')}"])


@probe(CKPT, "a directory as model.exits_checkpoint", expect=["a_directory", "exits_checkpoint"])
def directory_exits_checkpoint(ctx: Ctx) -> None:
    (ctx.dir / "a_directory").mkdir()
    build_model(f"exits_checkpoint={ctx.dir / 'a_directory'}")


@probe(CKPT, "missing file as load_model(checkpoint=)", expect=["no_such.pth"])
def missing_load_model(ctx: Ctx) -> None:
    import lavis_free

    lavis_free.load_model("blip2_opt_free", "shapes_tiny", checkpoint=str(ctx.dir / "no_such.pth"))


@probe(CKPT, "exported exits file as run.resume_ckpt_path", expect=["exits_free.pth", "resume"])
def exported_as_resume(ctx: Ctx) -> None:
    run_project(ctx, [f"run.resume_ckpt_path={EXITS_FILE}"])


# ---------------------------------------------------------------------------------------------
# config typos and bad values
# ---------------------------------------------------------------------------------------------
CONFIG = "config"


def _typo(name: str, options: Sequence[str], tried: str, expect: Sequence[Expectation]) -> None:
    def run(ctx: Ctx) -> None:
        run_project(ctx, options)
    run.__name__ = name
    probe(CONFIG, tried, expect=expect, timeout=90)(run)


_typo("typo_run_max_epoh", ["run.max_epoh=1"], "--options run.max_epoh=1", ["max_epoh", "max_epoch"])
_typo("typo_model_exit", ["model.exit.layers=[1]"], "--options model.exit.layers=[1]", ["model.exit", "exits"])
_typo("typo_model_exits_checkpint", ["model.exits_checkpint="], "--options model.exits_checkpint= (meant: train from init)",
      ["exits_checkpint", "exits_checkpoint"])
_typo("typo_storage", ["datasets.shapes_caption.build_info.storag=/nowhere"],
      "--options datasets.shapes_caption.build_info.storag=/nowhere", ["storag", "storage"])
_typo("typo_top_level_section", ["runn.max_epoch=1"], "--options runn.max_epoch=1 (unknown top-level section)",
      ["runn", "datasets"])
_typo("typo_task_name", ["run.task=free_captionning"], "--options run.task=free_captionning",
      ["run.task", "free_captioning"])
_typo("typo_exits_key", ["model.exits.lyers=[1]"], "--options model.exits.lyers=[1]", ["lyers", "layers"])
_typo("option_without_value", ["run.max_epoch"], "--options run.max_epoch (no =value)", ["run.max_epoch"])
_typo("bad_batch_size_zero", ["run.batch_size_train=0"], "--options run.batch_size_train=0", ["batch_size_train"])
_typo("bad_max_epoch_zero", ["run.max_epoch=0"], "--options run.max_epoch=0 (trains nothing)", ["max_epoch"])
_typo("bad_device", ["run.device=cuda"], "--options run.device=cuda on a machine without CUDA", [("cuda", "CUDA")])
_typo("bad_cache_dtype", ["run.exit_feature_cache=cache", "run.exit_feature_cache_dtype=float64"],
      "--options run.exit_feature_cache_dtype=float64", ["exit_feature_cache_dtype", "float16"])


@probe(CONFIG, "--job_id x (unknown command-line flag)", expect=["--job_id"])
def unknown_flag(ctx: Ctx) -> None:
    from lavis_free.common.launch import parse_args

    cli(lambda: parse_args("probe", ["--cfg-path", SHAPES_YAML, "--job_id", "x"]))


@probe(CONFIG, "--cfg-path no_such.yaml", expect=["no_such.yaml"])
def missing_cfg(ctx: Ctx) -> None:
    run_project(ctx, [], cfg_path=str(ctx.dir / "no_such.yaml"))


@probe(CONFIG, "--cfg-path a YAML with a syntax error", expect=["broken.yaml"])
def broken_cfg(ctx: Ctx) -> None:
    run_project(ctx, [], cfg_path=ctx.file("broken.yaml", b"model:\n  arch: [blip2_opt_free\nrun: {"))


def _exits_value(name: str, override: str, expect: Sequence[Expectation]) -> None:
    def run(ctx: Ctx) -> None:
        build_model(override, "exits_checkpoint=")
    run.__name__ = name
    probe(CONFIG, f"model.exits.{override.split('exits.', 1)[1]} (model YAML)", expect=expect)(run)


_exits_value("exits_last_layer", "exits.layers=[11]", ["exits.layers", "11"])
_exits_value("exits_negative_layer", "exits.layers=[-1]", ["exits.layers"])
_exits_value("exits_unsorted", "exits.layers=[5,2]", ["exits.layers", "sorted"])
_exits_value("exits_duplicate", "exits.layers=[2,2]", ["exits.layers"])
_exits_value("exits_layers_string", "exits.layers=two", ["exits.layers"])
_exits_value("exits_init", "exits.init=first", ["exits.init", "last"])
_exits_value("exits_layout", "exits.layout=vanila", ["exits.layout", "vanilla"])
_exits_value("exits_disc_hidden", "exits.disc_hidden=0", ["disc_hidden"])
_exits_value("exits_loss_mode", "exits.loss.mode=distil", ["loss.mode", "distill"])
_exits_value("exits_disc_steps", "exits.loss.disc_steps=0", ["disc_steps"])
_exits_value("exits_adv_weight", "exits.loss.adv_weight=-1", ["adv_weight"])
_exits_value("exits_threshold_string", "exits.inference.exit_threshold=high", ["exit_threshold"])
_exits_value("exits_kv_policy", "exits.inference.kv_policy=recompte", ["kv_policy", "recompute"])
_exits_value("exits_confidence", "exits.inference.confidence=maxprob", ["confidence", "max_prob"])
_exits_value("exits_min_exit_layer", "exits.inference.min_exit_layer=-2", ["min_exit_layer"])


# ---------------------------------------------------------------------------------------------
# runs: evaluation, output dirs, splits, caches, data
# ---------------------------------------------------------------------------------------------
RUNS = "runs"


@probe(RUNS, "python evaluate.py --cfg-path projects/free/shapes_caption.yaml --options run.test_splits=[]",
       expect=["test_splits"], timeout=90)
def evaluate_no_test_splits(ctx: Ctx) -> None:
    run_project(ctx, ["run.test_splits=[]"], action="evaluate")


@probe(RUNS, "python evaluate.py --cfg-path projects/free/shapes_caption.yaml (the README command) evaluates",
       expect=[], timeout=120)
def evaluate_readme_command(ctx: Ctx) -> Optional[Outcome]:
    runner = run_project(ctx, [], action="evaluate")
    results = sorted(p.name for p in Path(runner.result_dir).glob("test_*.json"))
    if not results:
        return Outcome("silently accepted", "evaluated nothing")
    return Outcome("handled", f"evaluated the test split ({', '.join(results)})")


def _unwritable(module: str, extra: Sequence[str]) -> Callable[[Ctx], Optional[Outcome]]:
    def run(ctx: Ctx) -> Optional[Outcome]:
        import importlib

        main = importlib.import_module(f"lavis_free.evaluation.{module}").main
        out = ctx.blocked_out()
        if module == "report":
            argv = ["--calibration", ctx.calibration(), "--out", out, "--no-progress"]
        else:
            argv = eval_argv(ctx, *extra, "--out", out)
        return lost_unless_refused(lambda: cli(lambda: main(argv)))
    return run


for _module, _extra in (("sweep", ["--split", "val", "--thresholds", "0.5", "--policies", "recompute"]),
                        ("calibrate", ["--thresholds", "0.0", "0.5"]), ("oracle", ["--split", "val"]), ("report", [])):
    _fn = _unwritable(_module, _extra)
    _fn.__name__ = f"unwritable_out_{_module}"
    probe(RUNS, f"python -m lavis_free.evaluation.{_module} --out under a regular file (unwritable)",
          expect=["--out", "blocker_file"], timeout=120)(_fn)


@probe(RUNS, "train twice with the same --job-id", expect=["--job-id"], timeout=120)
def reused_job_id(ctx: Ctx) -> Optional[Outcome]:
    run_project(ctx, [], job_id="same")
    ckpt = ctx.dir / "output/shapes_caption/same/checkpoint_0.pth"
    before = ckpt.stat().st_mtime_ns
    run_project(ctx, [], job_id="same")
    if ckpt.stat().st_mtime_ns != before:
        return Outcome("data lost", "the first run's checkpoint_0.pth was overwritten")
    return Outcome("handled", "the first run's files were left untouched")


@probe(RUNS, "two runs without --job-id started in the same second", expect=["job"], timeout=60)
def same_second_runs(ctx: Ctx) -> Outcome:
    for _ in range(3):  # until both runs are set up within one wall-clock second
        second = int(time.time())
        first, other = run_project(ctx, [], action=None), run_project(ctx, [], action=None)
        if int(time.time()) == second:
            break
    if Path(first.output_dir).resolve() == Path(other.output_dir).resolve():
        return Outcome("data lost", f"both runs write into {Path(first.output_dir).name}")
    return Outcome("handled", "separate output directories")


@probe(RUNS, "train split (10 captions) smaller than run.batch_size_train=64",
       expect=["batch_size_train", "train"], timeout=90)
def train_split_smaller_than_batch(ctx: Ctx) -> None:
    run_project(ctx, ["run.batch_size_train=64"])


@probe(RUNS, "empty train split (caption_train.json = [])", expect=["caption_train.json"], timeout=90)
def empty_train_split(ctx: Ctx) -> None:
    data = ctx.data_copy()
    Path(data, "annotations/caption_train.json").write_text("[]")
    run_project(ctx, [f"datasets.shapes_caption.build_info.storage={data}"])


@probe(RUNS, "truncated JSON in caption_train.json", expect=["caption_train.json"], timeout=90)
def malformed_annotation(ctx: Ctx) -> None:
    data = ctx.data_copy()
    Path(data, "annotations/caption_train.json").write_text('[{"image": "images/train/')
    run_project(ctx, [f"datasets.shapes_caption.build_info.storage={data}"])


@probe(RUNS, "missing annotation file caption_train.json", expect=["caption_train.json"], timeout=90)
def missing_annotation(ctx: Ctx) -> None:
    data = ctx.data_copy()
    Path(data, "annotations/caption_train.json").unlink()
    run_project(ctx, [f"datasets.shapes_caption.build_info.storage={data}"])


@probe(RUNS, "missing data dir (build_info.storage=<tmp>/no_such_data)",
       expect=["no_such_data", "lavis_free.datasets.shapes"], timeout=90)
def missing_data_dir(ctx: Ctx) -> None:
    run_project(ctx, [f"datasets.shapes_caption.build_info.storage={ctx.dir / 'no_such_data'}"])


@probe(RUNS, "corrupted (truncated) feature-cache entry in run.exit_feature_cache", timeout=120)
def corrupted_cache_entry(ctx: Ctx) -> Optional[Outcome]:
    copy, victim = ctx.cache_with_victim()
    victim.write_bytes(victim.read_bytes()[:40])
    run_project(ctx, [f"run.exit_feature_cache={copy}"])
    return recomputed(victim)


@probe(RUNS, "run.resume_ckpt_path to a missing file", expect=["resume_ckpt_path", "no_such.pth"])
def missing_resume(ctx: Ctx) -> None:
    run_project(ctx, [f"run.resume_ckpt_path={ctx.dir / 'no_such.pth'}"])


@probe(RUNS, "sweep --thresholds 1.5", expect=["--thresholds", "[0, 1]"])
def sweep_threshold_above_one(ctx: Ctx) -> None:
    from lavis_free.evaluation import sweep

    cli(lambda: sweep.main(eval_argv(ctx, "--split", "val", "--thresholds", "1.5", "--out", str(ctx.dir / "o"))))


@probe(RUNS, "sweep --policies recompte", expect=["recompte", "recompute"])
def sweep_bad_policy(ctx: Ctx) -> None:
    from lavis_free.evaluation import sweep

    cli(lambda: sweep.main(eval_argv(ctx, "--split", "val", "--thresholds", "0.5", "--policies", "recompte",
                                         "--out", str(ctx.dir / "o"))))


@probe(RUNS, "sweep --split vall (no such split)", expect=["vall", "val"])
def sweep_bad_split(ctx: Ctx) -> None:
    from lavis_free.evaluation import sweep

    cli(lambda: sweep.main(eval_argv(ctx, "--split", "vall", "--thresholds", "0.5", "--out", str(ctx.dir / "o"))))


@probe(RUNS, "sweep --metric cider (wrong case)", expect=["--metric", "CIDEr"], timeout=90)
def sweep_bad_metric(ctx: Ctx) -> Optional[Outcome]:
    from lavis_free.evaluation import sweep

    with count_decodes() as calls:
        try:
            cli(lambda: sweep.main(eval_argv(ctx, "--split", "val", "--thresholds", "0.5", "--policies", "recompute",
                                                 "--metric", "cider", "--out", str(ctx.dir / "o"))))
        except Exception as exc:
            if calls[0] and not matches(str(exc), ["--metric", "CIDEr"]):
                return Outcome("data lost", f"failed after {calls[0]} decode calls", exc)
            raise
    return None


@probe(RUNS, "calibrate --tolerance -0.1", expect=["--tolerance"], timeout=90)
def calibrate_negative_tolerance(ctx: Ctx) -> None:
    calibrate_main(eval_argv(ctx, "--tolerance", "-0.1", "--out", str(ctx.dir / "o")))


@probe(RUNS, "sweep --max-samples 0", expect=["--max-samples"])
def sweep_zero_samples(ctx: Ctx) -> None:
    from lavis_free.evaluation import sweep

    argv = eval_argv(ctx, "--split", "val", "--thresholds", "0.5", "--out", str(ctx.dir / "o"))
    argv[argv.index("--max-samples") + 1] = "0"
    cli(lambda: sweep.main(argv))


# ---------------------------------------------------------------------------------------------
# generation (shapes_tiny, exits after layers 2, 5, 8)
# ---------------------------------------------------------------------------------------------
GEN = "generation"


def _generate(name: str, tried: str, expect: Sequence[Expectation], samples: Callable[[], Dict[str, Any]],
              warn_ok: bool = False, **kwargs: Any) -> None:
    def run(ctx: Ctx) -> None:
        ctx.shapes_model().generate(samples(), **{"num_beams": 1, "max_length": 5, **kwargs})
    run.__name__ = name
    probe(GEN, tried, expect=expect, warn_ok=warn_ok)(run)


def _img(*shape: int, **kw: Any) -> Callable[[], Dict[str, Any]]:
    return lambda: {"image": image(*shape, **kw)}


ONE = _img(1, 3, 64, 64)
_generate("more_captions_than_beams", "generate(num_beams=2, num_captions=3, exit_threshold=0.5)",
          ["num_captions", "num_beams"], ONE, num_beams=2, num_captions=3, exit_threshold=0.5)
_generate("top_p_above_one", "generate(use_nucleus_sampling=True, top_p=1.5, exit_threshold=0.5)", ["top_p"], ONE,
          use_nucleus_sampling=True, top_p=1.5, exit_threshold=0.5)
_generate("no_repeat_ngram_string", "generate(no_repeat_ngram_size='2', exit_threshold=0.5)", ["ngram_size"], ONE,
          no_repeat_ngram_size="2", exit_threshold=0.5)
_generate("threshold_negative", "generate(exit_threshold=-0.5)", ["exit_threshold"], ONE, exit_threshold=-0.5)
_generate("threshold_nan", "generate(exit_threshold=nan)", ["exit_threshold"], ONE, exit_threshold=float("nan"))
_generate("threshold_string", "generate(exit_threshold='0.5')", ["exit_threshold"], ONE, exit_threshold="0.5")
_generate("kv_policy_typo", "generate(kv_policy='recompte')", ["kv_policy", "recompute"], ONE, kv_policy="recompte",
          exit_threshold=0.5)
_generate("confidence_typo", "generate(confidence='maxprob')", ["confidence", "max_prob"], ONE, confidence="maxprob",
          exit_threshold=0.5)
_generate("min_exit_layer_negative", "generate(min_exit_layer=-1)", ["min_exit_layer"], ONE, min_exit_layer=-1)
_generate("min_exit_layer_too_deep", "generate(min_exit_layer=13) on a 12-layer LM", ["min_exit_layer", "12"], ONE,
          min_exit_layer=13)
_generate("min_exit_layer_float", "generate(min_exit_layer=2.5)", ["min_exit_layer"], ONE, min_exit_layer=2.5)
_generate("max_length_zero", "generate(max_length=0)", ["max_length"], ONE, max_length=0)
_generate("image_wrong_size", "image tensor [1,3,32,32] (model expects 64x64)", ["image", "64"], _img(1, 3, 32, 32))
_generate("image_no_batch_dim", "image tensor [3,64,64] (no batch dim)", ["image", ("[B,3,64,64]", "batch", "4-d", "4 dim")],
          _img(3, 64, 64))
_generate("image_channels_last", "image tensor [1,64,64,3] (channels last)", ["image", "3"], _img(1, 64, 64, 3))
_generate("image_uint8", "image tensor of dtype uint8 (unnormalised pixels)", ["image", ("float", "dtype")],
          _img(1, 3, 64, 64, dtype="uint8"))
_generate("image_nan", "image tensor full of NaN", ["image", ("nan", "finite")], _img(1, 3, 64, 64, fill=float("nan")))
_generate("image_inf", "image tensor full of +inf", ["image", ("inf", "finite")], _img(1, 3, 64, 64, fill=float("inf")))
_generate("prompt_count_mismatch", "samples['prompt'] with 2 prompts for 1 image", ["prompt"],
          lambda: {"image": image(1, 3, 64, 64), "prompt": ["a", "b"]})
_generate("samples_without_image", "samples without 'image' (key 'images')", ["image"],
          lambda: {"images": image(1, 3, 64, 64)})


@probe(GEN, "predict_answers(exit_treshold=0.5) (typo of exit_threshold)", expect=["exit_treshold"])
def predict_answers_typo(ctx: Ctx) -> None:
    ctx.shapes_model().predict_answers({"image": image(1, 3, 64, 64), "text_input": ["what shape?"]}, num_beams=1,
                                       max_len=3, exit_treshold=0.5)


@probe(GEN, "predict_answers with 2 questions for 1 image", expect=["text_input"])
def predict_answers_count_mismatch(ctx: Ctx) -> None:
    ctx.shapes_model().predict_answers({"image": image(1, 3, 64, 64), "text_input": ["a?", "b?"]}, num_beams=1,
                                       max_len=3)


@probe(GEN, "score_answers with 2 options for one question and 3 for the other", expect=["answer_options", "same number"])
def score_answers_ragged(ctx: Ctx) -> None:
    ctx.shapes_model().score_answers({"image": image(2, 3, 64, 64), "text_input": ["what?", "where?"]},
                                     [["red", "blue"], ["left", "right", "top"]], exit_threshold=0.5)


def _bad_image_in_dataset(name: str, tried: str, damage: Callable[[Path], None]) -> None:
    def run(ctx: Ctx) -> None:
        from lavis.common.registry import registry
        from omegaconf import OmegaConf

        data = ctx.data_copy()
        row = json.loads(Path(data, "annotations/caption_val.json").read_text())[0]
        victim = Path(data, row["image"])
        ctx.extra_expect.append(victim.name)
        damage(victim)
        builder_cls = registry.get_builder_class("shapes_caption")
        cfg = OmegaConf.load(builder_cls.default_config_path()).datasets["shapes_caption"]
        cfg.build_info.storage = data
        builder_cls(cfg).build_datasets()["val"][0]
    run.__name__ = name
    probe(GEN, tried)(run)


_bad_image_in_dataset("truncated_png", "truncated PNG (first half) in the val split",
                      lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]))
_bad_image_in_dataset("empty_png", "0-byte PNG in the val split", lambda p: p.write_bytes(b""))
_bad_image_in_dataset("missing_png", "image listed in caption_val.json but missing", lambda p: p.unlink())


# ---------------------------------------------------------------------------------------------
# the first hour
# ---------------------------------------------------------------------------------------------
FIRST = "first hour"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# names what is missing, and how to provide it
MISSING_WEIGHTS = [("bert-base-uncased", "opt-2.7b", "eva_vit_g"), ("cache", "local path", "README")]
LOAD_REAL = ["-c", "import lavis_free; lavis_free.load_model('blip2_opt_free', 'pretrain_opt2.7b')"]


@probe(FIRST, "load_model('blip2_opt_free', 'pretrain_opt2.7b') offline (HF_HUB_OFFLINE=1), 40 s limit",
       expect=MISSING_WEIGHTS, timeout=60)
def offline_real_type(ctx: Ctx) -> None:
    run_cli(LOAD_REAL, 40, OFFLINE)


@probe(FIRST, "load_model('blip2_opt_free', 'pretrain_opt2.7b') with no network and no offline flags, 40 s limit",
       expect=MISSING_WEIGHTS, timeout=60)
def no_network_real_type(ctx: Ctx) -> None:
    run_cli(LOAD_REAL, 40, drop_env=tuple(OFFLINE))


@probe(FIRST, "load_model('blip2_opt_free', 'shapes_tinyy') (unknown type)", expect=["shapes_tinyy", "shapes_tiny"])
def unknown_model_type(ctx: Ctx) -> None:
    import lavis_free

    lavis_free.load_model("blip2_opt_free", "shapes_tinyy")


@probe(FIRST, "load_model('blip2_opt_fre') (unknown model)", expect=["blip2_opt_fre", "blip2_opt_free"])
def unknown_model_name(ctx: Ctx) -> None:
    import lavis_free

    lavis_free.load_model("blip2_opt_fre")


@probe(FIRST, "print(lavis.models.model_zoo) after import lavis_free lists blip2_opt_free")
def model_zoo_lists_plugin(ctx: Ctx) -> Outcome:
    import lavis_free  # noqa: F401
    from lavis.models import model_zoo

    listing = str(model_zoo)
    if "blip2_opt_free" in listing:
        return Outcome("handled", "model_zoo lists blip2_opt_free")
    return Outcome("silently accepted", "model_zoo does not list blip2_opt_free")


def _warnings_of(name: str, tried: str, argv: Sequence[str]) -> None:
    def run(ctx: Ctx) -> Outcome:
        proc = run_cli(argv, 60, OFFLINE)
        noise = [line for line in proc.stderr.splitlines() if "Warning" in line or "warning" in line]
        if noise:
            return Outcome("unhelpful error", f"{len(noise)} warning lines", CliError("warnings", noise[0].strip()))
        return Outcome("handled", "no warnings")
    run.__name__ = name
    probe(FIRST, tried, timeout=90)(run)


_warnings_of("import_warnings", "python -c 'import lavis_free' prints no warnings", ["-c", "import lavis_free"])
_warnings_of("module_cli_warnings", "python -m lavis_free.datasets.shapes --help prints no warnings",
             ["-m", "lavis_free.datasets.shapes", "--help"])


# ---------------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------------
def _squash(text: str) -> str:
    return "".join(ch for ch in text.lower() if not ch.isspace() and ch not in "`'\"")


def matches(message: str, expect: Sequence[Expectation], reject: Sequence[str] = ()) -> bool:
    """Every expected piece (or one of its alternatives) is in the message and no rejected one,
    ignoring case, spaces and quotes (so [2,5,8] matches "[2, 5, 8]")."""
    text = _squash(message)
    for piece in expect:
        options = piece if isinstance(piece, tuple) else (piece,)
        if not any(_squash(option) in text for option in options):
            return False
    return not any(_squash(bad) in text for bad in reject)


def first_line(message: str, *tmp_dirs: str) -> str:
    """The message's first non-empty line, temporary paths shown as $TMP, cut to MESSAGE_CHARS."""
    text = message.replace(str(REPO), "<repo>")
    for tmp in tmp_dirs:
        text = text.replace(tmp, "$TMP")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


def verdict_of(probe_: Probe, ctx: Ctx, error: Optional[BaseException], outcome: Optional[Outcome],
               notices: List[str]) -> Tuple[str, Optional[BaseException], str]:
    expect = probe_.expect + tuple(ctx.extra_expect)
    if os.path.exists(ctx.marker):
        return "code ran", error or (outcome.error if outcome else None), "the payload's marker file appeared"
    if isinstance(error, ProbeTimeout):
        return "hang", error, "no answer within the probe's limit"
    if error is None and outcome is not None:
        return outcome.verdict, outcome.error, outcome.note
    if error is None:
        warned = [n for n in notices if matches(n, expect)] if probe_.warn_ok and expect else []
        if warned:
            return "handled", CliError("warning", warned[0]), "warned"
        return "silently accepted", None, ""
    message = str(error)
    type_name = getattr(error, "type_name", type(error).__name__)
    if expect and matches(message, expect, probe_.reject):
        return "clear error", error, ""
    if type_name in INTERNAL_ERRORS:
        return "crash", error, "internal exception"
    return "unhelpful error", error, "" if matches(message, (), probe_.reject) else "invites an unsafe load"


class _Notices(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _on_alarm(signum: int, frame: Any) -> None:
    raise ProbeTimeout("the probe's time limit passed")


def run_one(probe_: Probe, ctx: Ctx) -> Dict[str, Any]:
    """One probe in this (worker) process, in its own directory, under an alarm."""
    ctx.dir = Path(tempfile.mkdtemp(prefix=f"{probe_.name}_", dir=ctx.root / "probes"))
    ctx.extra_expect = []
    handler = _Notices()
    logging.getLogger().addHandler(handler)
    error: Optional[BaseException] = None
    outcome: Optional[Outcome] = None
    start = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(probe_.timeout))
    try:
        with chdir(ctx.dir), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome = probe_.fn(ctx)
            except (Exception, ProbeTimeout) as exc:  # the probe's subject: every failure is data
                error = exc
            notices = handler.messages + [str(w.message) for w in caught]
    finally:
        signal.alarm(0)
        logging.getLogger().removeHandler(handler)
    seconds = time.monotonic() - start
    verdict, shown, note = verdict_of(probe_, ctx, error, outcome, notices)
    return {
        "name": probe_.name, "class": probe_.cls, "tried": probe_.tried, "verdict": verdict,
        "exception": getattr(shown, "type_name", type(shown).__name__) if shown is not None else "",
        "message": first_line(str(shown), str(ctx.dir), str(ctx.root)) if shown is not None else "",
        "note": note, "seconds": round(seconds, 1),
    }


def worker(root: str, data: str) -> None:
    """Reads probe names on stdin, answers one JSON line each on the original stdout (library
    output is sent to stderr so that it cannot corrupt the answers)."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("LAVIS_FREE_CACHE", str(Path(root) / "lavis_cache"))
    import lavis_free  # noqa: F401  (registrations; the import time is not a probe's)

    by_name = {p.name: p for p in PROBES}
    ctx = Ctx(root=Path(root), data=data)
    answers.write("READY\n")
    for line in iter(sys.stdin.readline, ""):
        answers.write(json.dumps(run_one(by_name[line.strip()], ctx)) + "\n")


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------
class Worker:
    """A worker process with a reader thread, so that a hung or dead worker is noticed."""

    def __init__(self, root: str, data: str, log: Path):
        env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **OFFLINE}
        self.log = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", root, data], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env_vars, cwd=root,
                                     start_new_session=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.lines.get(timeout=300)
        if ready != "READY":
            raise RuntimeError(f"probe worker failed to start; see {log}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def ask(self, name: str, timeout: float) -> Optional[Dict[str, Any]]:
        """The probe's record; None when the worker hung (killed) or died."""
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise TimeoutError from None
        return json.loads(line) if line else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and the processes it started
        self.proc.wait()
        self.log.close()


def _last_log_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_probes(probes: Sequence[Probe], root: str, data: str) -> List[Dict[str, Any]]:
    log = Path(root) / "worker.log"
    results: List[Dict[str, Any]] = []
    current: Optional[Worker] = None
    for index, probe_ in enumerate(probes, 1):
        start = time.monotonic()
        current = current or Worker(root, data, log)
        base = {"name": probe_.name, "class": probe_.cls, "tried": probe_.tried, "exception": "", "message": ""}
        try:
            record = current.ask(probe_.name, probe_.timeout + 30)
            if record is None:
                current.stop()
                current = None
                record = {**base, "verdict": "crash", "exception": "worker died",
                          "message": first_line(_last_log_line(log), root), "note": "the process died"}
        except TimeoutError:
            current = None
            record = {**base, "verdict": "hang", "note": "killed after the probe's limit (not interruptible)"}
        record.setdefault("seconds", round(time.monotonic() - start, 1))
        results.append(record)
        seen = f"{record['exception']}: {record['message']}" if record["exception"] else record.get("note", "")
        print(f"[{index:3d}/{len(probes)}] {record['verdict']:<17} {record['seconds']:6.1f}s  {probe_.cls:<10} "
              f"{probe_.tried[:60]}  -> {seen[:100]}", flush=True)
    if current is not None:
        current.stop()
    return results


def counts(results: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    return {v: sum(r["verdict"] == v for r in results) for v in VERDICTS if any(r["verdict"] == v for r in results)}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# The test modules that pin each class's behaviour (the probe shows it; the tests keep it so).
CLASS_TESTS = {
    "security": ["tests/test_security.py"],
    "checkpoint": ["tests/test_exit_checkpoints.py", "tests/test_security.py", "tests/test_runner.py"],
    "config": ["tests/test_config_validation.py", "tests/test_config_options.py", "tests/test_first_hour.py"],
    "runs": ["tests/test_run_safety.py", "tests/test_outputs.py", "tests/test_sweep_calibrate.py", "tests/test_security.py"],
    "generation": ["tests/test_bad_inputs.py"],
    "first hour": ["tests/test_first_hour.py"],
}


def write_docs(results: Sequence[Dict[str, Any]], md_path: Path, json_path: Path, seconds: float) -> None:
    tally = counts(results)
    meta = {"command": "python run_scripts/probe_bad_inputs.py", "probes": len(results), "seconds": round(seconds),
            "verdicts": tally}
    json_path.write_text(json.dumps({**meta, "results": list(results)}, indent=1) + "\n")
    lines = [
        "# Bad inputs tried (issue 12)",
        "",
        f"Written by `{meta['command']}` ({len(results)} probes, {meta['seconds']} s); the same rows are in "
        "`docs/bad_inputs.json`. Each probe runs alone, in a temporary directory, against the `shapes_tiny` /"
        " `tiny` models and a small generated shapes dataset. Verdicts are decided by checks in the script: "
        "*clear error* means the message names every expected piece (the key, argument or file, and what is "
        "allowed) and does not invite an unsafe load; *handled* means no error was needed and the right thing "
        "happened; *code ran* means a crafted payload wrote its marker file.",
        "",
        "| verdict | probes |",
        "|---|---|",
        *[f"| {verdict} | {n} |" for verdict, n in tally.items()],
        "",
    ]
    for cls in dict.fromkeys(r["class"] for r in results):
        rows = [r for r in results if r["class"] == cls]
        tests = ", ".join(f"`{t}`" for t in CLASS_TESTS.get(cls, []))
        lines += [f"## {cls} ({len(rows)})", "", f"Covered by {tests}." if tests else "", "", "| what was tried | verdict | what a user sees | s |", "|---|---|---|---|"]
        for r in rows:
            seen = f"`{r['exception']}`: {r['message']}" if r["exception"] else (r.get("note") or "")
            lines.append(f"| {_cell(r['tried'])} | {r['verdict']} | {_cell(seen)} | {r['seconds']} |")
        lines.append("")
    md_path.write_text("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Throw bad inputs at lavis-free and tabulate what a user sees.")
    parser.add_argument("--only", action="append", default=[],
                        help="run only probes whose name or class contains this (repeatable); docs are then not written")
    parser.add_argument("--md", default=str(REPO / "docs/bad_inputs.md"))
    parser.add_argument("--json", default=str(REPO / "docs/bad_inputs.json"))
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (printed)")
    parser.add_argument("--list", action="store_true", help="list the probes and exit")
    parser.add_argument("--worker", nargs=2, metavar=("ROOT", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    probes = [p for p in PROBES if not args.only or any(s in p.name or s in p.cls for s in args.only)]
    if args.list or not probes:
        for p in probes:
            print(f"{p.cls:<10} {p.name:<40} {p.tried}")
        return 0 if probes else 2
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="lavis_free_probe_")
    (Path(root) / "probes").mkdir()
    data = str(Path(root) / "data")
    try:
        subprocess.run([sys.executable, "-m", "lavis_free.datasets.shapes", "--out", data, "--seed", "0", *DATA_SIZES],
                       check=True, capture_output=True, cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **OFFLINE})
        results = run_probes(probes, root, data)
    finally:
        if args.keep_tmp:
            print(f"temporary directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.monotonic() - start
    tally = counts(results)
    print(f"{len(results)} probes in {seconds:.0f} s: " + ", ".join(f"{n} {v}" for v, n in tally.items()))
    if not args.only:
        write_docs(results, Path(args.md), Path(args.json), seconds)
        print(f"written: {args.md}, {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
