"""save_pretrained / from_pretrained: a self-contained model folder, written atomically, that
loads alone and gives the outputs of the pipeline that saved it."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from examples.tsdsr.models.tiny import random_backbone
from scoredistill.sr import model_folder
from scoredistill.sr.loading import load_model
from scoredistill.sr.model_folder import CONFIG_FILE, EMBEDS_FILE, WEIGHTS_FILE
from scoredistill.sr.pipeline import SROptions, TSDSRPipeline
from scoredistill.sr.tiling import TileConfig

OPTIONS = SROptions(upscale=2.0, process_size=32, color="adain", strength=0.75)
TILES = TileConfig(latent=4, latent_overlap=2, encoder=32, encoder_overlap=8, decoder=4,
                   decoder_overlap=2)


@pytest.fixture(scope="module")
def pipe():
    return TSDSRPipeline(load_model(random_backbone()), options=OPTIONS, tiles=TILES)


def images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 24, 40, generator=g), torch.rand(3, 12, 12, generator=g)]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_saved_then_loaded_gives_equal_outputs(pipe, tmp_path):
    path = pipe.save_pretrained(tmp_path / "model")
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert files == {EMBEDS_FILE, CONFIG_FILE, f"transformer/{WEIGHTS_FILE}",
                     "transformer/config.json", f"vae/{WEIGHTS_FILE}", "vae/config.json"}
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["options"] == dict(upscale=2.0, process_size=32, color="adain", strength=0.75)
    assert config["format_version"] == 1 and config["dtype"] == "float32"
    assert config["scoredistill_version"] != ""
    loaded = TSDSRPipeline.from_pretrained(path, tiles=TILES)  # nothing else needed
    assert loaded.options == OPTIONS  # the saved defaults
    for a, b in zip(loaded(images(), output_type="pt").images,
                    pipe(images(), output_type="pt").images, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert leftovers(tmp_path) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir, not mkdtemp's 0700


def test_weights_hold_no_fused_copies_and_load_in_another_dtype(pipe, tmp_path):
    from safetensors import safe_open

    path = pipe.save_pretrained(tmp_path / "model")
    with safe_open(str(path / "transformer" / WEIGHTS_FILE), "pt") as f:
        keys = list(f.keys())
    assert any(".to_q." in k for k in keys) and not any("qkv" in k for k in keys)
    half = TSDSRPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert half.model.cond["prompt_embeds"].dtype == torch.bfloat16
    override = SROptions(upscale=3.0)
    assert TSDSRPipeline.from_pretrained(path, options=override).options == override


def test_an_existing_folder_is_never_replaced_silently(pipe, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists: pick a new folder, or pass overwrite"):
        pipe.save_pretrained(target)
    with pytest.raises(FileExistsError, match=r"is not a model folder .* refusing to replace"):
        pipe.save_pretrained(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    pipe.save_pretrained(empty)  # an empty folder is filled
    assert (empty / CONFIG_FILE).is_file()
    (empty / "stale.txt").write_text("from before")
    pipe.save_pretrained(empty, overwrite=True)  # a model folder, replaced when asked
    assert not (empty / "stale.txt").exists() and (empty / CONFIG_FILE).is_file()
    assert leftovers(tmp_path) == []


def test_a_failed_save_leaves_nothing_and_keeps_the_earlier_folder(pipe, tmp_path, monkeypatch):
    path = pipe.save_pretrained(tmp_path / "model")
    before = (path / "vae" / WEIGHTS_FILE).read_bytes()
    save = model_folder._save_module

    def fail_on_vae(module, folder):
        if folder.name == "vae":
            raise OSError(28, "No space left on device")
        save(module, folder)

    monkeypatch.setattr(model_folder, "_save_module", fail_on_vae)
    for target, overwrite in ((tmp_path / "new", False), (path, True)):
        with pytest.raises(OSError, match="No space left"):
            pipe.save_pretrained(target, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert (path / "vae" / WEIGHTS_FILE).read_bytes() == before
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(model_folder, "_save_module", save)
    rename = os.replace

    def fail_moving_in(src, dst):  # the last step: the finished folder renamed into place
        if ".tmp-" in os.fspath(src):
            raise OSError(18, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(model_folder.os, "replace", fail_moving_in)
    with pytest.raises(OSError, match="cross-device"):
        pipe.save_pretrained(path, overwrite=True)
    assert (path / "vae" / WEIGHTS_FILE).read_bytes() == before  # put back
    assert leftovers(tmp_path) == []


def test_damaged_or_incomplete_folders_are_named(pipe, tmp_path):
    path = pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"is a model folder .* give lora, release and embeds "
                                         r"only with an SD3 folder"):
        TSDSRPipeline.from_pretrained(path, lora=tmp_path)
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 9}))
    with pytest.raises(ValueError, match="format_version 9, this scoredistill reads 1"):
        TSDSRPipeline.from_pretrained(path)
    (path / CONFIG_FILE).write_text(json.dumps({**config, "options": {"strength": 2.0}}))
    with pytest.raises(ValueError, match=r"scoredistill_sr.json's options: strength must be in"):
        TSDSRPipeline.from_pretrained(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*scoredistill_sr\.json"):
        TSDSRPipeline.from_pretrained(path)
    (path / CONFIG_FILE).write_text(json.dumps(config))
    (path / EMBEDS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks prompt_embeds\.safetensors"):
        TSDSRPipeline.from_pretrained(path)
