"""Atomic safetensors files with the umask's mode (LoRA files, the patch benchmark's cache)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

pytest.importorskip("safetensors")

from safetensors.torch import load_file

from scoredistill.atomic import new_file_mode, save_safetensors


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_written_whole_with_the_umasks_mode(tmp_path, umask):
    t = {"a": torch.arange(6.0).reshape(2, 3)[:, :2]}  # not contiguous: saved anyway
    path = save_safetensors(t, tmp_path / "sub" / "x.safetensors", {"k": "v"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == new_file_mode()
    assert torch.equal(load_file(path)["a"], t["a"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_safetensors({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_safetensors({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_lora_files_follow_the_umask(tmp_path, umask):
    pytest.importorskip("peft")
    from peft import LoraConfig, inject_adapter_in_model

    from scoredistill.adapters import save_lora

    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]),
                                  torch.nn.Sequential(torch.nn.Linear(4, 4)), "student")
    path = save_lora(tmp_path / "t.safetensors", net, "student")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
