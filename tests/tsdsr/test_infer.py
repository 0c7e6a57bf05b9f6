"""The TSD-SR inference CLI end to end on the tiny embedded model, and checkpoint loading."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from examples.tsdsr.infer import main
from examples.tsdsr.models.backbone import load_backbone
from scoredistill.adapters import (
    STUDENT_TARGETS,
    SD3ScoreModel,
    add_lora,
    add_vae_lora,
    lora_config,
    lora_state_dict,
    save_lora,
)
from scoredistill.sr.files import plan_outputs
from scoredistill.sr.imageio import load_image, save_png
from scoredistill.sr.latents import decode, encode, one_step
from scoredistill.sr.loading import load_model
from scoredistill.sr.pipeline import TSDSRPipeline

RNG = np.random.default_rng(0)
FAST = ["--process-size", "64", "--no-progress"]



def write(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "rgb.png", RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    write(folder / "rgba.png", RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8))
    write(folder / "grey.jpg", RNG.integers(0, 256, (12, 16), dtype=np.uint8))
    write(folder / "deep.png", RNG.integers(0, 65536, (16, 12), dtype=np.uint16))  # I;16
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    write(folder / "tiny.png", RNG.integers(0, 256, (4, 30, 3), dtype=np.uint8))
    return folder


def test_folder_job_writes_good_images_and_reports_bad_ones(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    assert main([str(inputs), "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "tiny.png" in err
    sizes = {p.name: Image.open(p).size for p in out.iterdir()}
    modes = {p.name: Image.open(p).mode for p in out.iterdir()}
    assert sizes == {"rgb.png": (96, 80), "rgba.png": (64, 64), "grey.png": (64, 48),
                     "deep.png": (48, 64)}
    assert modes == {"rgb.png": "RGB", "rgba.png": "RGBA", "grey.png": "L", "deep.png": "I;16"}
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before  # inputs untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_alpha_is_upsampled_and_reattached(tmp_path):
    alpha = np.zeros((16, 16), dtype=np.uint8)
    alpha[:, 8:] = 255
    rgba = np.dstack([RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8), alpha])
    src = write(tmp_path / "a.png", rgba)
    assert main([str(src), "--out", str(tmp_path / "o"), *FAST]) == 0
    out = np.asarray(Image.open(tmp_path / "o" / "a.png"))
    assert out[:, :28, 3].max() < 8 and out[:, 36:, 3].min() > 247


def test_16bit_inputs_give_16bit_outputs_matching_the_8bit_ones(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    rgb = RNG.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    grey = RNG.integers(0, 256, (16, 12), dtype=np.uint8)
    write(folder / "rgb8.png", rgb)
    write(folder / "grey8.png", grey)
    # Levels k * 257 of 65535 are k of 255: both depths feed the model the same floats.
    rgb16 = torch.from_numpy(rgb.astype(np.int32) * 257).permute(2, 0, 1)
    save_png(rgb16.float() / 65535, folder / "rgb16.png", bits=16)
    write(folder / "grey16.png", grey.astype(np.uint16) * 257)  # I;16
    assert main([str(folder), "--out", str(out), *FAST]) == 0
    for name in ("rgb", "grey"):
        src8, src16 = (load_image(folder / f"{name}{bits}.png") for bits in (8, 16))
        assert src16.bits == 16 and torch.equal(src8.rgb, src16.rgb)
        assert (out / f"{name}8.png").read_bytes()[24] == 8  # IHDR bit depth
        assert (out / f"{name}16.png").read_bytes()[24] == 16
        sr8, sr16 = (load_image(out / f"{name}{bits}.png") for bits in (8, 16))
        assert sr8.grey == sr16.grey == (name == "grey")
        # The same floats rounded to 255 or to 65535 levels: within half a step of each.
        assert (sr16.rgb - sr8.rgb).abs().max() <= 0.5 / 255 + 0.5 / 65535 + 1e-6
        assert ((sr16.rgb * 65535).round() % 257).any()  # finer than 8-bit levels


def test_output_folder_equal_to_input_folder_is_refused(inputs):
    assert main([str(inputs), "--out", str(inputs), *FAST]) == 2
    assert main([str(inputs / "rgb.png"), "--out", str(inputs), *FAST]) == 2


def test_outputs_never_overwrite_inputs_or_each_other(tmp_path):
    a, b, c = tmp_path / "x.jpg", tmp_path / "x.png", tmp_path / "sub" / "y.png"
    jobs, failed = plan_outputs([a, b, c], tmp_path)
    assert [dst.name for _, dst in jobs] == ["y.png"]
    assert "overwrite an input" in failed[str(b)]
    assert "another input" in failed[str(a)] or "overwrite an input" in failed[str(a)]


def test_large_image_is_tiled(tmp_path, monkeypatch):
    # 136 px LQ -> 544 px output -> 136 latent px: more than one 64-px transformer tile.
    from scoredistill.sr import pipeline, tiling

    calls = {"--tile": [], "--no-tile": []}
    one_step, run_tiled = pipeline.one_step, tiling.run_tiled

    def spy_one_step(student, z, cond):  # the pipeline batches windows: record each one
        calls[flag].extend(("transformer", w.clone()) for w in z.split(1))
        return one_step(student, z, cond)

    def spy_run_tiled(net, x, *, tile, margin, **kw):
        calls[flag].append(("vae", (tuple(x.shape), tile, margin)))
        return run_tiled(net, x, tile=tile, margin=margin, **kw)

    monkeypatch.setattr(pipeline, "one_step", spy_one_step)
    monkeypatch.setattr(tiling, "run_tiled", spy_run_tiled)
    src = write(tmp_path / "big.png", RNG.integers(0, 256, (136, 136, 3), dtype=np.uint8))
    for flag in calls:
        assert main([str(src), "--out", str(tmp_path / flag), *FAST, flag,
                     "--decoder-tile", "32", "8"]) == 0
    tiled, untiled = (np.asarray(Image.open(tmp_path / f / "big.png")) for f in calls)
    assert tiled.shape == untiled.shape == (544, 544, 3)
    assert not np.array_equal(tiled, untiled)
    # Untiled: one transformer call on the whole 136 px latent, no VAE tiles.
    assert [(kind, tuple(v.shape)) for kind, v in calls["--no-tile"]] == [
        ("transformer", (1, 16, 136, 136))]
    # Tiled (the tiny VAE downsamples by 4: a 136 px latent): the transformer on nine 64 px
    # windows starting at 0, 36 and 72 (the fewest with overlap >= 8), row-major, all cut from
    # one latent (they agree where they overlap and cover it); the decoder by run_tiled with
    # 32 px cores; the 544 px image is below the 1024 px encoder tile, so it runs whole.
    windows = [z for kind, z in calls["--tile"] if kind == "transformer"]
    assert [tuple(z.shape) for z in windows] == [(1, 16, 64, 64)] * 9
    latent, seen = torch.zeros(1, 16, 136, 136), torch.zeros(136, 136, dtype=torch.bool)
    for z, (y, x) in zip(windows, itertools.product((0, 36, 72), repeat=2), strict=True):
        region = (..., slice(y, y + 64), slice(x, x + 64))
        overlap = seen[region[1:]]
        assert torch.equal(latent[region][..., overlap], z[..., overlap])
        latent[region], seen[region[1:]] = z, True
    assert seen.all()
    assert [v for kind, v in calls["--tile"] if kind == "vae"] == [((1, 16, 136, 136), 32, 8)]


def sr_forward(model, x):
    return TSDSRPipeline(model, tiles=None).forward([x])[0]


def randomized(module, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(module, adapter).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def adapted():
    """The tiny default backbone with nonzero student and VAE-encoder LoRAs (rank 4), unmerged."""
    parts = load_backbone(None)
    add_lora(parts.transformer, lora_config(STUDENT_TARGETS, rank=4), "student")
    add_vae_lora(parts.vae, rank=4)
    randomized(parts.transformer, "student", 1)
    randomized(parts.vae, "default", 2)
    return parts


@torch.no_grad()
def reference(parts, x, cond):
    z = encode(parts.vae, x, posterior="mode")
    return decode(parts.vae, one_step(SD3ScoreModel(parts.transformer), z, cond))


def test_lora_checkpoint_is_merged_and_fused(adapted, tmp_path, inputs):
    save_lora(tmp_path / "ckpt" / "transformer.safetensors", adapted.transformer, "student")
    save_lora(tmp_path / "ckpt" / "vae.safetensors", adapted.vae, "default")
    model = load_model(load_backbone(None), lora=tmp_path / "ckpt")
    x = torch.rand(1, 3, 48, 64) * 2 - 1
    torch.testing.assert_close(sr_forward(model, x), reference(adapted, x, adapted.cond),
                               rtol=1e-4, atol=1e-4)
    assert not any("lora" in n for n, _ in model.student.module.named_modules())
    assert hasattr(model.student.module.transformer_blocks[0].attn, "to_qkv")  # fused
    assert main([str(inputs / "rgb.png"), "--out", str(tmp_path / "o"), *FAST,
                 "--lora", str(tmp_path / "ckpt")]) == 0


def test_release_folder_in_the_authors_layout(adapted, tmp_path):
    from safetensors.torch import save_file

    release = tmp_path / "release"
    release.mkdir()
    for module, adapter, name in ((adapted.transformer, "student", "transformer"),
                                  (adapted.vae, "default", "vae")):
        # The release's files: "transformer." prefix on both, no LoraConfig metadata.
        save_file({f"transformer.{k}": v.contiguous() for k, v in
                   lora_state_dict(module, adapter).items()},
                  str(release / f"{name}.safetensors"))
    g = torch.Generator().manual_seed(5)
    cond = {"prompt_embeds": torch.randn(1, 12, 32, generator=g),
            "pooled_projections": torch.randn(1, 64, generator=g)}
    torch.save(cond["prompt_embeds"], release / "prompt_embeds.pt")
    torch.save(cond["pooled_projections"], release / "pool_embeds.pt")
    model = load_model(load_backbone(None), release=release)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(sr_forward(model, x), reference(adapted, x, cond),
                               rtol=1e-4, atol=1e-4)
    (release / "pool_embeds.pt").unlink()
    with pytest.raises(FileNotFoundError, match="pool_embeds"):
        load_model(load_backbone(None), release=release)
