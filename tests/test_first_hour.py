"""The first hour from a fresh clone: the model zoo lists the plugin, imports are quiet, and a
real model type without its weights fails at once naming what is missing and how to provide it."""
import os
import subprocess
import sys
import warnings

import pytest
import transformers.utils.hub as transformers_hub
from huggingface_hub import constants
from lavis.models import load_model, model_zoo

from lavis_free.compat import noise
from lavis_free.models import weights
from lavis_free.models.weights import WeightsUnavailableError
from lavis_free.models.blip2_opt_free import Blip2OPTFree

OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """An empty Hugging Face cache and torch hub directory; the hub switched off."""
    monkeypatch.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def _cache_hub_files(cache_dir, repo, names):
    """Lay files out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/)."""
    root = cache_dir / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in names:
        (snapshot / name).write_text("{}")


def test_model_zoo_lists_plugin_models_after_import():
    zoo = dict(model_zoo)
    assert zoo["blip2_opt_free"] == list(Blip2OPTFree.PRETRAINED_MODEL_CONFIG_DICT)
    assert "blip2_opt_free" in str(model_zoo) and "blip2_opt" in zoo


def test_import_prints_nothing_on_stderr():
    done = subprocess.run(
        [sys.executable, "-c", "import lavis_free"], env=OFFLINE_ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]


def test_python_m_module_prints_no_runpy_warning():
    done = subprocess.run(
        [sys.executable, "-m", "lavis_free.datasets.shapes", "--help"],
        env=OFFLINE_ENV, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0 and "usage:" in done.stdout
    assert "Warning" not in done.stderr, done.stderr[-3000:]


def test_noise_filters_are_targeted_and_real_warnings_stay_visible():
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        noise.silence_known_noise()
        warnings.simplefilter("always", append=True)
        emit = warnings.warn_explicit
        emit("`torch.cuda.amp.custom_fwd(args...)` is deprecated.", FutureWarning, "offload.py", 19,
             module="fairscale.experimental.nn.offload")
        emit("'lavis_free.datasets.shapes' found in sys.modules after import of package 'x'",
             RuntimeWarning, "runpy", 128, module="runpy")
        emit("`resume_download` is deprecated", FutureWarning, "file_download.py", 949,
             module="huggingface_hub.file_download")
        emit("something else is deprecated", FutureWarning, "offload.py", 40, module="fairscale.nn")
        emit("`torch.cuda.amp.custom_fwd(args...)` is deprecated.", FutureWarning, "mine.py", 1, module="mine")
        emit("'mypkg.mod' found in sys.modules after import of package 'mypkg'", RuntimeWarning, "runpy", 128,
             module="runpy")
    assert [str(w.message)[:12] for w in seen] == ["something el", "`torch.cuda.", "'mypkg.mod' "]


def test_real_type_offline_fails_fast_naming_bert_and_the_remedy(empty_caches):
    with pytest.raises(WeightsUnavailableError) as err:
        load_model("blip2_opt_free", "pretrain_opt2.7b")
    message = str(err.value)
    assert "bert-base-uncased (the Q-Former's tokenizer)" in message and "vocab.txt" in message
    assert "HF_HUB_OFFLINE" in message and "huggingface-cli download bert-base-uncased" in message
    assert weights.README_SECTION in message


def test_a_checkpoint_url_offline_is_named_before_any_download(empty_caches):
    tiny_model = load_model("blip2_opt_free", "tiny")
    url = "https://h/x/blip2_pretrained_opt2.7b.pth"
    with pytest.raises(WeightsUnavailableError, match=r"model\.finetuned.*blip2_pretrained_opt2\.7b\.pth"):
        tiny_model.load_checkpoint(url, origin="model.finetuned", exits_required=False)
    assert not (empty_caches / "torch" / "hub" / "checkpoints").exists()


@pytest.mark.parametrize(
    "load, expected",
    [
        (lambda: Blip2OPTFree.init_Qformer(32, 1408), ["bert-base-uncased", "config.json", "pytorch_model.bin"]),
        (lambda: Blip2OPTFree.init_vision_encoder("eva_clip_g", 224, 0, False, "fp16"),
         ["eva_vit_g.pth", "checkpoints"]),
        (lambda: Blip2OPTFree.init_opt("facebook/opt-2.7b"),
         ["facebook/opt-2.7b", "merges.txt", "pytorch_model.bin", "--options model.opt_model=DIR"]),
        (lambda: weights.require(weights.checkpoint("https://h/x/blip2_pretrained_opt2.7b.pth", "model.pretrained")),
         ["model.pretrained", "blip2_pretrained_opt2.7b.pth", "--options model.pretrained=PATH"]),
    ],
    ids=["qformer", "vit", "opt", "checkpoint"],
)
def test_each_missing_component_is_named_with_its_remedy(empty_caches, load, expected):
    with pytest.raises(WeightsUnavailableError) as err:
        load()
    for part in expected:
        assert part in str(err.value)


def test_cached_or_local_components_pass(empty_caches):
    _cache_hub_files(empty_caches / "hf", "bert-base-uncased", ["vocab.txt", "tokenizer_config.json"])
    weights.require(weights.BERT_TOKENIZER)
    with pytest.raises(WeightsUnavailableError, match="config.json, pytorch_model.bin"):
        weights.require(weights.BERT_QFORMER)  # same repo, its weights not cached
    url = weights.VIT_URLS["eva_clip_g"]
    os.makedirs(os.path.dirname(weights.url_cache_path(url)))
    open(weights.url_cache_path(url), "wb").close()
    weights.require(weights.vision_weights("eva_clip_g"))
    weights.require(weights.opt_lm(str(empty_caches)))  # a local directory: transformers reads it


def test_unreachable_hub_fails_fast_without_the_offline_switch(empty_caches, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    weights.hub_reachable.cache_clear()
    try:
        with pytest.raises(WeightsUnavailableError, match=r"hub \(http://127.0.0.1:9\) does not answer"):
            weights.require(weights.BERT_TOKENIZER)
        weights.require(weights.vision_weights("eva_clip_g"))  # online: LAVIS downloads URLs itself
    finally:
        weights.hub_reachable.cache_clear()


@pytest.mark.parametrize("opt_model", ["/no/such/opt-2.7b", ""])
def test_opt_model_neither_directory_nor_hub_id_is_a_config_error(opt_model):
    with pytest.raises(ValueError, match=r"model.opt_model=.* is neither a local directory nor a Hugging Face repo id"):
        Blip2OPTFree.init_opt(opt_model)


def test_unknown_vit_model_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"model.vit_model='eva_vit_huge'; allowed: \['eva_vit_tiny', 'clip_L'"):
        Blip2OPTFree.init_vision_encoder("eva_vit_huge", 224, 0, False, "fp16")
