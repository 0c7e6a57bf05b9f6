"""Files for tests/test_bad_inputs.py: a small valid workspace (training data, embeddings, a
trained 2-step run, LQ/SR/HR folders) and the bad files the rows put into it."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from examples.tsdsr.training.checkpoint import checkpoints
from scoredistill.sr import files as sr_files

Setup = Callable[[Path, pytest.MonkeyPatch], None]
Check = Callable[[Path], None]

RNG = np.random.default_rng(0)
# The train.py flags every training row starts from (the tiny preset, a random tiny backbone).
TRAIN = ("--tiny", "--hq-dir", "{ws}/hq", "--embeds-dir", "{ws}/embeds", "--output-dir",
         "{ws}/run", "--max-steps", "2", "--checkpoint-every", "1", "--validate-every", "100",
         "--report-to", "none", "--student-rank", "2", "--fake-rank", "2", "--vae-rank", "2")
INFER = ("{ws}/lq", "--out", "{ws}/out", "--process-size", "64", "--no-progress")
EVAL = ("--sr", "{ws}/sr", "--hr", "{ws}/hr", "--no-progress")


def png(path: Path, height: int = 64, width: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def build_base(root: Path, train_main) -> Path:
    """hq/ (a, b, c; a captioned), val/, embeds/ (tiny text encoders), run/ (2 steps,
    checkpoints at 1 and 2), lq/ (two small images), sr/ and hr/ (paired 32 px images)."""
    from examples.tsdsr.precompute import precompute

    for name in "abc":
        png(root / "hq" / f"{name}.png")
    (root / "hq" / "a.txt").write_text("a red cat\n", encoding="utf-8")
    png(root / "val" / "v.png")
    precompute(root / "hq", root / "embeds")
    status = train_main([a.format(ws=root) for a in TRAIN])
    assert status == 0, "the workspace's training run failed"
    for name, size in (("x", (20, 24)), ("y", (16, 16))):
        png(root / "lq" / f"{name}.png", *size)
    for name in "pq":
        png(root / "sr" / f"{name}.png", 32, 32)
        png(root / "hr" / f"{name}.png", 32, 32)
    (root / "empty").mkdir()
    return root


def copy_base(base: Path, to: Path) -> Path:
    shutil.copytree(base, to, symlinks=True)
    return to


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def exif_rotated_jpeg(path: Path, height: int = 16, width: int = 24) -> None:
    """A JPEG stored ``width`` wide that viewers show rotated (EXIF orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        path, exif=exif.tobytes())


def png16_bomb(path: Path, side: int = 14000) -> None:
    """A 16-bit RGB PNG whose header claims side x side px over a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def frames(path: Path, count: int = 3) -> None:
    """An animated GIF or multi-page TIFF (by suffix) of ``count`` 16 x 16 frames."""
    images = [Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
              for _ in range(count)]
    images[0].save(path, save_all=True, append_images=images[1:])


def checkpoint_with_truncated_lora(folder: Path) -> None:
    """An infer --lora folder whose transformer.safetensors was cut short."""
    from examples.tsdsr.models.tiny import random_backbone
    from scoredistill.adapters import STUDENT_TARGETS, add_lora, lora_config, save_lora

    parts = random_backbone("tiny")
    add_lora(parts.transformer, lora_config(STUDENT_TARGETS, rank=2), "student")
    folder.mkdir(parents=True)
    save_lora(folder / "transformer.safetensors", parts.transformer, "student")
    truncate(folder / "transformer.safetensors", 300)


def sd3_folder(folder: Path, damaged: str | None = None) -> None:
    """The random tiny backbone as a diffusers SD3 folder (infer --pretrained); ``damaged``
    ("transformer" or "vae") has its weights file cut short."""
    from examples.tsdsr.models.tiny import random_backbone

    parts = random_backbone("tiny")
    parts.transformer.save_pretrained(folder / "transformer")
    parts.vae.save_pretrained(folder / "vae")
    if damaged is not None:
        truncate(folder / damaged / "diffusion_pytorch_model.safetensors", 5000)


def embeds_pt(folder: Path, extra_width: int = 0, pickled: Path | None = None) -> None:
    """An infer --embeds folder in the release's layout (prompt_embeds.pt, pool_embeds.pt) for
    the tiny backbone: ``extra_width`` columns too many, or (``pickled``: a marker folder) a
    prompt file that would run code when unpickled."""
    from examples.tsdsr.models.tiny import random_backbone

    cond = random_backbone("tiny").cond
    folder.mkdir(parents=True)
    prompt = cond["prompt_embeds"]
    prompt = torch.cat([prompt, prompt[..., :extra_width]], dim=-1)
    torch.save({"embeds": RunsCode(pickled)} if pickled else prompt, folder / "prompt_embeds.pt")
    torch.save(cond["pooled_projections"], folder / "pool_embeds.pt")


def checkpoint_with_vae_lora_as_transformer(folder: Path) -> None:
    """An infer --lora folder whose transformer.safetensors holds the VAE's LoRA."""
    from examples.tsdsr.models.tiny import random_backbone
    from scoredistill.adapters import add_lora, lora_config, save_lora, vae_lora_targets

    parts = random_backbone("tiny")
    add_lora(parts.vae, lora_config(vae_lora_targets(parts.vae), rank=2), "default")
    folder.mkdir(parents=True)
    save_lora(folder / "transformer.safetensors", parts.vae, "default")


class RunsCode:
    """Pickles as a call of os.mkdir(marker): what a crafted weights file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


# Row setups (workspace, monkeypatch) and checks (workspace).
def write_text(rel: str, text: str, encoding: str) -> Setup:
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        (ws / rel).write_bytes(text.encode(encoding))
    return setup


def call(fn: Callable[..., None], *args: object) -> Setup:
    return lambda ws, mp: fn(*(Path(a.format(ws=ws)) if isinstance(a, str) else a for a in args))


def both(*setups: Setup) -> Setup:
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        for s in setups:
            s(ws, mp)
    return setup


def fail_on(name: str, error: BaseException) -> Setup:
    """Make super-resolving the input called ``name`` raise ``error`` (running out of memory)."""
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        real = sr_files.load_image

        def load(path, **kw):
            if Path(path).name == name:
                raise error
            return real(path, **kw)
        mp.setattr(sr_files, "load_image", load)
    return setup


def outputs(*names: str, size: tuple[int, int] | None = None) -> Check:
    def check(ws: Path) -> None:
        from PIL import Image

        assert sorted(p.name for p in (ws / "out").iterdir()) == sorted(names)
        if size is not None:
            with Image.open(ws / "out" / names[0]) as img:
                assert img.size == size and img.getexif().get(0x0112) is None
    return check


def absent(rel: str) -> Check:
    def check(ws: Path) -> None:
        assert not (ws / rel).exists(), rel
    return check


def ckpts(*names: str, aside: str | None = None, run: str = "run") -> Check:
    def check(ws: Path) -> None:
        root = ws / run / "checkpoints"
        assert [p.name for p in checkpoints(root)] == list(names)
        if aside is not None:
            assert [p.name for p in root.glob(f"superseded-*/{aside}")] == [aside]
    return check


def mode_follows_umask(ws: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    for p in (ws / "out").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def checkpoint_mode_follows_umask(ws: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    found = list((ws / "new" / "checkpoints").rglob("*"))
    assert any(p.suffix == ".safetensors" for p in found)
    for p in found:
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# What safetensors 0.8 raised when a 64 KiB tmpfs filled up during save_file.
SAFETENSORS_DISK_FULL = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)")


def disk_full_at(module: str, name: str) -> Setup:
    """The disk is full when ``module.name`` (a writer the recipe imported) is called."""
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        import importlib

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")
        mp.setattr(importlib.import_module(module), name, full)
    return setup


def disk_full_at_save(error: Exception) -> Setup:
    """The disk fills up while a checkpoint's state is written (its LoRA files are in the temp
    folder already, the state file half written)."""
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        from examples.tsdsr.training import checkpoint

        def write_state(state, folder):
            (folder / "state.safetensors").write_bytes(b"half")
            raise error
        mp.setattr(checkpoint, "write_state", write_state)
    return setup


def no_checkpoint(run: str) -> Check:
    """Nothing under ``run``/checkpoints: no checkpoint, no temp folder."""
    def check(ws: Path) -> None:
        assert list((ws / run / "checkpoints").iterdir()) == []
    return check


def same_embeddings(ws: Path) -> None:
    from safetensors.torch import load_file

    bom, plain = (load_file(ws / e / "images" / "a.safetensors") for e in ("e2", "embeds"))
    assert bom.keys() == plain.keys() and all(torch.equal(bom[k], plain[k]) for k in bom)


def prompts_without_a(ws: Path) -> None:
    assert (ws / "e2" / "prompts.safetensors").is_file()  # the job went on past a.png
    assert not (ws / "e2" / "images" / "a.safetensors").exists()


def signal_in_step(step: int, sig: int) -> Setup:
    """Send ``sig`` to this process during training step ``step`` (as SLURM would)."""
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        from examples.tsdsr import train

        real, calls = train.train_step, []

        def step_then_signal(*args, **kwargs):
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), sig)
            return real(*args, **kwargs)
        mp.setattr(train, "train_step", step_then_signal)
    return setup


# issue 21 (recipe data and scripts)
EARLIER = b"an earlier run's file\n"


def earlier_file(rel: str) -> Setup:
    """A file an earlier run left where this one writes."""
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(EARLIER)
    return setup


def replaced(rel: str) -> Check:
    def check(ws: Path) -> None:
        assert (ws / rel).read_bytes() != EARLIER, rel
    return check


def pickled_state(path: Path, marker: Path) -> None:
    """A torch file whose state dict would run os.mkdir(marker) when unpickled."""
    torch.save({"features.0.weight": RunsCode(marker)}, path)


def damage_in_place(path: Path) -> None:
    """Zero an image's pixel data, keeping the file's size and modification time."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[60:-20] = bytes(len(data) - 80)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def damage_after_scan(rel: str) -> Setup:
    """Damage ``rel`` in place once train.py's data check has passed it (mid-run damage)."""
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        from examples.tsdsr import train

        real = train.scan_training_data

        def scan_then_damage(*args, **kwargs):
            bad = real(*args, **kwargs)
            damage_in_place(ws / rel)
            return bad
        mp.setattr(train, "scan_training_data", scan_then_damage)
    return setup


def same_caption_same_embeddings(ws: Path) -> None:
    from safetensors.torch import load_file

    a, b = (load_file(ws / "e2" / "images" / f"{n}.safetensors") for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
