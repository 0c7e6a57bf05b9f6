"""precompute.py on the tiny text encoders: files, shapes, captions and missing captions; one
caption gives one embedding; an earlier run's files are kept unless --overwrite; no third-party
warnings."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from examples.tsdsr.precompute import encode_prompts, image_file, main, tiny_pipeline
from scoredistill.sr.imageio import save_png
from scoredistill.sr.loading import load_prompts
from tests.tsdsr.test_demo_warnings import third_party_warnings


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


def test_require_captions(hq, tmp_path, capsys):
    assert main(["--hq-dir", str(hq), "--out", str(tmp_path / "e"), "--require-captions"]) == 2
    assert "b.png" in capsys.readouterr().err


def test_one_caption_gives_one_embedding_in_a_batch_and_across_calls(hq, tmp_path):
    # T5 dropout (0.1) in training mode gave ["a photo of a dog"] * 2 embeddings 2.3 apart.
    pipe = tiny_pipeline(["a photo of a dog"])
    first, second = (encode_prompts(pipe, ["a photo of a dog"] * 2, 6) for _ in range(2))
    for once, again in zip(first, second, strict=True):
        assert torch.equal(once[0], once[1]) and torch.equal(once, again)
    # The same through the script: two images with one caption get equal files.
    (hq / "b.txt").write_text("a red cat\n")
    assert main(["--hq-dir", str(hq), "--out", str(tmp_path / "e")]) == 0
    a, b = (load_file(image_file(tmp_path / "e", hq, hq / f"{n}.png")) for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_earlier_files_are_kept_unless_overwrite(hq, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["--hq-dir", str(hq), "--out", str(out)]) == 0
    (out / "prompts.safetensors").write_bytes(b"an earlier run's file")
    assert main(["--hq-dir", str(hq), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "prompts.safetensors" in err[0]
    assert (out / "prompts.safetensors").read_bytes() == b"an earlier run's file"
    assert main(["--hq-dir", str(hq), "--out", str(out), "--overwrite"]) == 0
    assert load_prompts(out)["default"]["prompt_embeds"].shape == (1, 12, 32)
    assert not list(out.rglob("*.tmp"))


def test_long_captions_give_no_third_party_warnings(hq, tmp_path):
    # Captions longer than the tiny encoders' 6 tokens (the default prompt is 47): transformers
    # warned of "indexing errors", and of CLIP's default bos_token_id outside the vocabulary.
    (hq / "a.txt").write_text("a red cat on a mat in the sun, seen from far away\n")
    (hq / "b.txt").write_text("a blue dog\n")
    with third_party_warnings() as found:
        assert main(["--hq-dir", str(hq), "--out", str(tmp_path / "e")]) == 0
    assert found == []
