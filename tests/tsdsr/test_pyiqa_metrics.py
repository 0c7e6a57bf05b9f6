"""pyiqa's LPIPS, DISTS, NIQE, MUSIQ, MANIQA, CLIPIQA and FID load their weights from local files.

No weights are downloaded: every file pyiqa (and the torchvision / timm / CLIP backbones under it)
reads is written here with random values under the name pyiqa looks for, in a temporary
TORCH_HOME / Hugging Face cache, with sockets blocked. pyiqa's real loading code then runs on
those files, and a missing file must raise instead of downloading. The scores are meaningless
(random weights); the tests check that the files are read and the outputs are finite and shaped.
The module is skipped where pyiqa (the optional `eval` extra) does not import.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import pyiqa
except ImportError as exc:  # pyiqa itself, or a package it imports (cv2, ...)
    pytest.skip(
        f"pyiqa does not import ({exc}); it is the optional extra 'scoredistill[eval]'",
        allow_module_level=True,
    )

import huggingface_hub.constants  # pyiqa's dependencies: present once pyiqa imports
import huggingface_hub.errors
import safetensors.torch
import scipy.io
import torchvision
from PIL import Image

from examples.tsdsr.evaluation import metrics

# The files pyiqa 0.1.x reads, relative to $TORCH_HOME/hub (docs/guides/tsdsr-recipe.md lists them).
PYIQA_FILES = {
    "lpips": "pyiqa/LPIPS_v0.1_alex-df73285e.pth",
    "dists": "pyiqa/DISTS_weights-f5e65c96.pth",
    "niqe": "pyiqa/niqe_modelparameters.mat",
    "musiq": "pyiqa/musiq_koniq_ckpt-e95806b9.pth",
    "maniqa": "pyiqa/ckpt_koniq10k.pt",
    "fid": "pyiqa/pt_inception-2015-12-05-6726825d.pth",
    "clipiqa": "clip/RN50.pt",  # only the genuine file: pyiqa checks its SHA-256
}
# ImageNet backbones torchvision reads from $TORCH_HOME/hub/checkpoints.
TORCHVISION_FILES = {
    "lpips": ("checkpoints/alexnet-owt-7be5be79.pth", torchvision.models.alexnet),
    "dists": ("checkpoints/vgg16-397923af.pth", torchvision.models.vgg16),
}
# MANIQA's ViT comes through timm from the Hugging Face cache (HF_HUB_CACHE).
MANIQA_VIT_REPO = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"

# Tensors above this size are stored as one random row broadcast over the others (a stride-0
# view that torch.save keeps small) so the ~100M-parameter backbones cost little disk and time.
_BROADCAST_NUMEL = 2**20


class NetworkBlocked(RuntimeError):
    """A test tried to open a socket: something wanted to download."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkBlocked("network access attempted in an offline test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _use_cache(monkeypatch, torch_home: Path) -> None:
    """Point torch.hub, pyiqa and the Hugging Face hub at `torch_home`, offline.

    pyiqa and huggingface_hub read their cache folders (and HF_HUB_OFFLINE) once, at import,
    so in a process that has already imported them the module values are set along with the
    environment a user would set before starting Python.
    """
    hf_cache = torch_home / "huggingface"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(
        pyiqa.utils.download_util, "DEFAULT_CACHE_DIR", str(torch_home / "hub" / "pyiqa")
    )
    assert torch.hub.get_dir() == str(torch_home / "hub")


def _random_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors with the names, shapes and dtypes of a state dict (on any device).

    Entries that share memory (one module registered under two names) get the same tensor.
    """
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    first_name: dict[tuple, str] = {}
    for name, ref in state.items():
        if ref.device.type != "meta":
            alias = (ref.data_ptr(), ref.shape, ref.stride())
            if alias in first_name:
                out[name] = out[first_name[alias]]
                continue
            first_name[alias] = name
        if not ref.is_floating_point():
            out[name] = torch.zeros(ref.shape, dtype=ref.dtype)
        elif name.endswith("running_var"):
            out[name] = 0.5 + torch.rand(ref.shape, generator=generator)
        elif ref.numel() > _BROADCAST_NUMEL:
            row = 0.02 * torch.randn(ref.shape[-1], generator=generator, dtype=ref.dtype)
            out[name] = row.expand(ref.shape)
        else:
            out[name] = 0.02 * torch.randn(ref.shape, generator=generator, dtype=ref.dtype)
    return out


def _meta_state(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build().state_dict()


def _save(state: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _write_torchvision_backbone(hub: Path, name: str) -> None:
    file_name, build = TORCHVISION_FILES[name]
    _save(_random_like(_meta_state(lambda: build(weights=None)), seed=1), hub / file_name)


def _write_maniqa_vit(hf_cache: Path) -> None:
    """model.safetensors in the Hugging Face cache layout: refs/main -> snapshots/<commit>/."""
    repo = hf_cache / ("models--" + MANIQA_VIT_REPO.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    import timm

    state = _meta_state(lambda: timm.create_model("vit_base_patch8_224", pretrained=False))
    # Dense (safetensors keeps no broadcast views) and half precision, to halve the 344 MB.
    dense = {k: v.half().contiguous() for k, v in _random_like(state, seed=2).items()}
    safetensors.torch.save_file(dense, snapshot / "model.safetensors")


def _import_clip():
    """openai-clip, which pyiqa's CLIPIQA imports; it needs pkg_resources (setuptools<82)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
        import clip.model

    return clip


def _importable(module: str) -> bool:
    try:
        _import_clip() if module == "clip" else __import__(module)
    except ImportError:
        return False
    return True


needs_clip = pytest.mark.skipif(
    not _importable("clip"),
    reason="CLIPIQA needs openai-clip (module `clip`, BPE vocabulary included) and "
    "pkg_resources (setuptools<82): pip install --no-deps openai-clip ftfy wcwidth 'setuptools<82'",
)
needs_timm = pytest.mark.skipif(
    not _importable("timm"), reason="MANIQA's ViT needs timm: pip install --no-deps timm"
)


def _write_tiny_clip(path: Path) -> dict[str, torch.Tensor]:
    """A small random CLIP (ResNet + text transformer, CLIP's 49408-token vocabulary and
    77-token context) saved, like OpenAI's RN50.pt, as a TorchScript archive: pyiqa's CLIP
    loader reads the state dict of a TorchScript file and sizes the network from it."""
    clip = _import_clip()
    torch.manual_seed(3)
    model = clip.model.CLIP(
        embed_dim=32,
        image_resolution=64,
        vision_layers=(1, 1, 1, 1),
        vision_width=8,
        vision_patch_size=None,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=1,
    ).eval()
    example = (torch.rand(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and TorchScript deprecation notes
        traced = torch.jit.trace(model, example, check_trace=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, path)
    return model.state_dict()


def write_weights(name: str, torch_home: Path) -> Path:
    """Write every random weight file metric `name` needs; return the pyiqa one's path."""
    hub = torch_home / "hub"
    target = hub / PYIQA_FILES[name]
    if target.exists():  # written by an earlier test of this module
        return target
    if name in TORCHVISION_FILES:
        _write_torchvision_backbone(hub, name)
    if name == "maniqa":
        _write_maniqa_vit(torch_home / "huggingface")
    if name == "niqe":
        rng = np.random.default_rng(4)
        factor = rng.normal(size=(36, 36))
        mu, cov = rng.normal(size=(1, 36)), factor @ factor.T / 36 + np.eye(36)
        target.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(target, {"mu_prisparam": mu, "cov_prisparam": cov})
    elif name == "fid":
        inception = _meta_state(
            lambda: torchvision.models.inception_v3(
                weights=None, aux_logits=False, num_classes=1008, init_weights=False
            )
        )
        _save(_random_like(inception, seed=5), target)
    elif name == "clipiqa":
        _write_tiny_clip(target)
    else:
        # pyiqa's own head weights, shaped as the network pyiqa builds with pretrained=False
        # (LPIPS and DISTS keep only the entries that are theirs; the backbone is torchvision's).
        net = pyiqa.create_metric(name, device=torch.device("cpu"), pretrained=False).net
        state = net.state_dict()
        if name in TORCHVISION_FILES:
            state = {k: v for k, v in state.items() if k.startswith(("lin", "alpha", "beta"))}
        _save(_random_like(state, seed=6), target)
    return target


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """One cache for the module: each test writes the files of its metric."""
    return tmp_path_factory.mktemp("torch_home")


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """The backbones here are compute bound (a ViT-B/8 pass for MANIQA): use both CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


def _images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random (2, 3, size, size) batches in [0, 1]: SR and HR."""
    generator = torch.Generator().manual_seed(0)
    sr, hr = torch.rand(2, 2, 3, size, size, generator=generator)
    return sr, hr


def _loaded_entry(name: str, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """(one value the metric holds, the value in the file it should come from)."""
    target = Path(os.environ["TORCH_HOME"]) / "hub" / PYIQA_FILES[name]
    if name == "niqe":
        return metric.net.mu_pris_param, torch.from_numpy(
            np.ravel(scipy.io.loadmat(target)["mu_prisparam"])
        )
    saved = torch.load(target, weights_only=True)
    saved = saved.get("params", saved)
    key = next(k for k in saved if saved[k].is_floating_point())
    return metric.net.state_dict()[key], saved[key]


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("lpips", 64),
        ("dists", 64),
        ("niqe", 192),  # NIQE scores 96 x 96 blocks at full and half scale
        ("musiq", 64),
        pytest.param("maniqa", 64, marks=needs_timm),
    ],
)
def test_metric_loads_random_weights_from_torch_home(name, size, torch_home, monkeypatch):
    _use_cache(monkeypatch, torch_home)
    write_weights(name, torch_home)
    metric = metrics.create_pyiqa_metric(name)
    held, saved = _loaded_entry(name, metric)
    torch.testing.assert_close(held.float(), saved.float())
    if name == "maniqa":
        metric.net.test_sample = 1  # one 224 crop instead of 20: a ViT-B/8 pass is slow on CPU

    sr, hr = _images(size)
    with torch.no_grad():
        score = metric(sr, hr) if metrics.METRICS[name].kind == "fr" else metric(sr)
    assert score.numel() == 2, score.shape
    assert torch.isfinite(score).all()


@needs_clip
def test_clipiqa_loads_a_local_clip_checkpoint(tmp_path, torch_home, monkeypatch):
    """pretrained_model_path= is the CLIP file: a tiny random CLIP built as pyiqa builds RN50."""
    _use_cache(monkeypatch, torch_home)
    checkpoint = tmp_path / "clip_rn50_random.pt"
    saved = _write_tiny_clip(checkpoint)
    metric = metrics.create_pyiqa_metric("clipiqa", pretrained_model_path=checkpoint)
    held = metric.net.clip_model[0].state_dict()
    # pyiqa's CLIP builder stores the weights in float16 like OpenAI's, then runs in float32.
    expected = saved["visual.conv1.weight"].half().float()
    torch.testing.assert_close(held["visual.conv1.weight"], expected)

    with torch.no_grad():
        score = metric(_images(64)[0])
    assert score.shape == (2, 1)
    assert torch.isfinite(score).all() and ((score >= 0) & (score <= 1)).all()


@needs_clip
def test_clipiqa_default_file_must_be_the_genuine_one(torch_home, monkeypatch):
    """$TORCH_HOME/hub/clip/RN50.pt is checked against OpenAI's SHA-256: others are refetched."""
    home = torch_home / "clip_default"
    _use_cache(monkeypatch, home)
    _write_tiny_clip(home / "hub" / PYIQA_FILES["clipiqa"])
    with pytest.warns(UserWarning, match="SHA256"), pytest.raises(NetworkBlocked):
        metrics.create_pyiqa_metric("clipiqa")


def _write_folder(folder: Path, seed: int, count: int = 3, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_fid_between_two_folders_with_local_inception(tmp_path, torch_home, monkeypatch):
    _use_cache(monkeypatch, torch_home)
    write_weights("fid", torch_home)
    metric = metrics.create_pyiqa_metric("fid")
    saved = torch.load(torch_home / "hub" / PYIQA_FILES["fid"], weights_only=True)
    first_conv = metric.net.model.blocks[0][0].conv  # torchvision's Conv2d_1a_3x3
    torch.testing.assert_close(first_conv.weight, saved["Conv2d_1a_3x3.conv.weight"])
    sr = _write_folder(tmp_path / "sr", seed=1)
    hr = _write_folder(tmp_path / "hr", seed=2)
    score = metric(str(sr), str(hr), num_workers=0, verbose=False)
    assert np.ndim(score) == 0 and np.isfinite(score) and score >= 0
    with pytest.raises(ValueError, match="pt_inception"):
        metrics.create_pyiqa_metric("fid", pretrained_model_path=tmp_path / "inception.pth")


@pytest.mark.parametrize(
    "name", ["lpips", "dists", "niqe", "musiq", pytest.param("maniqa", marks=needs_timm)]
)
def test_pretrained_model_path_replaces_the_pyiqa_file(name, tmp_path, torch_home, monkeypatch):
    """The metric's own weights from any path; the backbones still come from the caches."""
    _use_cache(monkeypatch, torch_home)
    cached = write_weights(name, torch_home)
    elsewhere = tmp_path / f"my_{name}{cached.suffix}"
    if name == "niqe":
        elsewhere.write_bytes(cached.read_bytes())
    else:
        state = torch.load(cached, weights_only=True)
        state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
        # pyiqa reads MANIQA's pretrained_model_path file under the key "params".
        _save({"params": state} if name == "maniqa" else state, elsewhere)
    cached.rename(cached.with_suffix(".moved"))  # so only `elsewhere` can provide them
    try:
        metric = metrics.create_pyiqa_metric(name, pretrained_model_path=elsewhere)
    finally:
        cached.with_suffix(".moved").rename(cached)
    if name == "niqe":
        expected = scipy.io.loadmat(elsewhere)["mu_prisparam"].ravel()
        torch.testing.assert_close(metric.net.mu_pris_param, torch.from_numpy(expected))
    else:
        key = next(k for k in state if state[k].is_floating_point())
        torch.testing.assert_close(metric.net.state_dict()[key], state[key])


# The first file each metric looks for, relative to $TORCH_HOME/hub; None where the lookup
# prints no path (CLIP's loader, and timm's offline Hugging Face cache look-up).
FIRST_LOOKUP = {
    "lpips": TORCHVISION_FILES["lpips"][0],
    "dists": TORCHVISION_FILES["dists"][0],
    "niqe": PYIQA_FILES["niqe"],
    "musiq": PYIQA_FILES["musiq"],
    "fid": PYIQA_FILES["fid"],
    "clipiqa": None,
    "maniqa": None,
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks={"maniqa": [needs_timm], "clipiqa": [needs_clip]}.get(n, []))
        for n in metrics.PYIQA_METRICS
    ],
)
def test_missing_weights_raise_instead_of_downloading(name, tmp_path, monkeypatch, capfd):
    """A failed download is one error naming the file to put in place (CLIP's own downloader
    opens the blocked socket itself)."""
    _use_cache(monkeypatch, tmp_path)
    expected = NetworkBlocked if name == "clipiqa" else metrics.MissingWeights
    with pytest.raises(expected) as error:
        metrics.create_pyiqa_metric(name)
    if FIRST_LOOKUP[name] is not None:
        assert str(tmp_path / "hub" / FIRST_LOOKUP[name]) in str(error.value)
    if name == "maniqa":  # timm's ViT from the offline Hugging Face cache
        assert "LocalEntryNotFoundError" in str(error.value)


@pytest.mark.parametrize("name", ["lpips", "dists"])
def test_missing_head_weights_with_local_backbone(name, tmp_path, monkeypatch):
    _use_cache(monkeypatch, tmp_path)
    _write_torchvision_backbone(tmp_path / "hub", name)
    with pytest.raises(metrics.MissingWeights, match=str(tmp_path / "hub" / PYIQA_FILES[name])):
        metrics.create_pyiqa_metric(name)


class _RunsCode:
    """Pickles as a call of os.mkdir(marker): what a crafted weights file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("via", ["cache", "pretrained_model_path"])
def test_crafted_weights_file_is_refused_without_running_code(via, tmp_path, monkeypatch):
    _use_cache(monkeypatch, tmp_path)
    _write_torchvision_backbone(tmp_path / "hub", "lpips")
    marker = tmp_path / "code_ran"
    crafted = (tmp_path / "hub" / PYIQA_FILES["lpips"] if via == "cache"
               else tmp_path / "my_lpips.pth")
    _save({"lin0.model.1.weight": _RunsCode(marker)}, crafted)
    kwargs = {} if via == "cache" else {"pretrained_model_path": crafted}
    with pytest.raises(ValueError, match=f"refusing to load {crafted}"):
        metrics.create_pyiqa_metric("lpips", **kwargs)
    assert not marker.exists()
    assert torch.load is metrics.torch.load  # the weights_only wrapper is gone again
    torch.load(crafted, weights_only=False)  # the file does run code when loaded unsafely
    assert marker.exists()
