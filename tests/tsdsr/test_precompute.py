"""precompute.py on the tiny text encoders: files, shapes, captions and missing captions."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from examples.tsdsr.precompute import image_file, main
from scoredistill.sr.imageio import save_png
from scoredistill.sr.loading import load_prompts


@pytest.fixture
def hq(tmp_path):
    folder = tmp_path / "hq"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_png(torch.rand(3, 32, 32, generator=g), folder / f"{name}.png")
    (folder / "a.txt").write_text("a red cat\n")
    return folder


def test_cli_writes_prompts_captions_and_latents(hq, tmp_path, caplog):
    out = tmp_path / "embeds"
    with caplog.at_level(logging.WARNING):
        assert main(["--hq-dir", str(hq), "--out", str(out), "--latents"]) == 0
    assert "b.png" in caplog.text  # the missing caption is named
    prompts = load_prompts(out)
    assert prompts["default"]["prompt_embeds"].shape == (1, 12, 32)
    assert prompts["null"]["pooled_projections"].shape == (1, 64)
    assert not torch.equal(prompts["default"]["prompt_embeds"], prompts["null"]["prompt_embeds"])
    a = load_file(image_file(out, hq, hq / "a.png"))
    assert a["prompt_embeds"].shape == (12, 32) and a["latent"].shape == (16, 8, 8)  # 4x tiny VAE
    b = load_file(image_file(out, hq, hq / "b.png"))
    assert set(b) == {"latent"}  # no caption: training uses the default prompt
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temp files


def test_require_captions(hq, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        main(["--hq-dir", str(hq), "--out", str(tmp_path / "e"), "--require-captions"])
