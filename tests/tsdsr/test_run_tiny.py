"""The tiny demo's held-out pairs (the demo itself runs in ``make demo``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from examples.tsdsr.run_tiny import write_pairs
from scoredistill.sr.imageio import list_images, load_image, save_png


def _photos(folder, names=("a", "b")):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in names:
        save_png(torch.rand(3, 32, 48, generator=g), folder / f"{name}.png")
    return folder


def test_pairs_are_named_alike_and_each_draw_degrades_differently(tmp_path):
    photos = _photos(tmp_path / "photos")
    write_pairs(photos, tmp_path / "hq", tmp_path / "lq", draws=3)
    names = [p.name for p in list_images(tmp_path / "hq")]
    assert names == [p.name for p in list_images(tmp_path / "lq")]
    assert names == [f"{s}_{k}.png" for s in "ab" for k in range(3)]
    source = load_image(photos / "a.png").rgb
    assert all(torch.equal(load_image(tmp_path / "hq" / f"a_{k}.png").rgb, source)
               for k in range(3))
    lq = [load_image(tmp_path / "lq" / n).rgb for n in names]
    assert lq[0].shape == (3, 8, 12)
    assert all(not torch.equal(lq[i], lq[j]) for i in range(6) for j in range(i))
    write_pairs(photos, tmp_path / "hq2", tmp_path / "lq2", draws=3)  # fixed seeds
    assert all(torch.equal(x, load_image(tmp_path / "lq2" / n).rgb)
               for x, n in zip(lq, names, strict=True))



def test_the_printed_line_runs_the_saved_model(tmp_path, capsys):
    """make demo's last step: the trained student saved as a model folder, and the printed
    ``scoredistill-sr --model ...`` line run as printed on other images gives what the student
    gives (an SR pipeline built from the same checkpoint without the folder)."""
    import shlex

    import numpy as np
    from PIL import Image

    from examples.tsdsr.run_tiny import cli_line, save_model
    from examples.tsdsr.training.models import load_backbone
    from scoredistill.adapters import add_lora, add_vae_lora, lora_config, save_lora
    from scoredistill.adapters.targets import STUDENT_TARGETS
    from scoredistill.sr.cli import main as sr_main
    from scoredistill.sr.pipeline import SROptions, TSDSRPipeline

    parts = load_backbone(None)
    add_lora(parts.transformer, lora_config(STUDENT_TARGETS, rank=4), "student")
    add_vae_lora(parts.vae, rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a student that differs from the base model
        for name, p in [*parts.transformer.named_parameters(), *parts.vae.named_parameters()]:
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = tmp_path / "ckpt"
    save_lora(ckpt / "transformer.safetensors", parts.transformer, "student")
    save_lora(ckpt / "vae.safetensors", parts.vae, "default")

    model_dir = save_model(load_backbone(None), ckpt, None, tmp_path / "model")
    mine = tmp_path / "mine"
    mine.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(mine / "photo.png")
    argv = shlex.split(cli_line(model_dir).replace("YOUR_IMAGES", str(mine))
                       .replace("YOUR_OUTPUT_DIR", str(tmp_path / "sr")))
    assert argv[0] == "scoredistill-sr"
    assert sr_main([*argv[1:], "--no-progress"]) == 0
    got = np.asarray(Image.open(tmp_path / "sr" / "photo.png")).astype(float)
    direct = TSDSRPipeline.from_pretrained(load_backbone(None), lora=ckpt,
                                           options=SROptions(process_size=128, color="adain"))
    want = direct(rgb, output_type="np").images[0] * 255
    assert got.shape == (96, 128, 3) and np.abs(got - np.round(want)).max() <= 1
    base = TSDSRPipeline.from_pretrained(load_backbone(None),
                                         options=SROptions(process_size=128, color="adain"))
    assert np.abs(got - base(rgb, output_type="np").images[0] * 255).mean() > 1  # not the base


def test_overview_has_a_row_per_pair_in_column_order(tmp_path):
    from examples.tsdsr.run_tiny import write_overview

    g = torch.Generator().manual_seed(0)
    hq, lq, cols = tmp_path / "hq", tmp_path / "lq", [tmp_path / c for c in "abc"]
    for folder in (hq, lq, *cols):
        folder.mkdir()
    sizes = {"p": (16, 24), "q": (16, 16)}
    images = {}
    for name, (h, w) in sizes.items():
        images[name] = [torch.rand(3, h, w, generator=g) for _ in cols]
        for folder, image in zip(cols, images[name], strict=True):
            save_png(image, folder / f"{name}.png")
        save_png(torch.rand(3, h, w, generator=g), hq / f"{name}.png")
        save_png(torch.rand(3, h // 4, w // 4, generator=g), lq / f"{name}.png")
    write_overview(tmp_path / "overview.png", lq, hq, cols)
    out = load_image(tmp_path / "overview.png").rgb
    assert out.shape == (3, 32, 5 * 24)
    for row, name in enumerate(sizes):
        h, w = sizes[name]
        for k, image in enumerate(images[name]):  # columns 1..3 after the LQ
            got = out[:, row * 16:row * 16 + h, (k + 1) * w:(k + 2) * w]
            torch.testing.assert_close(got, image, atol=1 / 255, rtol=0)
    assert torch.all(out[:, 16:, 5 * 16:] == 1.0)  # the narrower row padded white
