"""Paired HQ/LQ dataset and on-the-fly Real-ESRGAN degradation (Wang et al., ICCVW 2021)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from examples.tsdsr.data import (
    DEFAULT_PROMPT,
    DegradationConfig,
    PairedSRDataset,
    degrade_batch,
    upsample_lq,
    usm_sharpen,
)


def _noise_image(height: int, width: int, seed: int) -> np.ndarray:
    """Random uint8 (H,W,3): every window is unique, so a crop's origin can be found."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255


def _origin(crop: torch.Tensor, full: torch.Tensor) -> tuple[int, int]:
    size = crop.shape[-1]
    for top in range(full.shape[-2] - size + 1):
        for left in range(full.shape[-1] - size + 1):
            if torch.equal(full[:, top : top + size, left : left + size], crop):
                return top, left
    raise AssertionError("crop not found in the image")


@pytest.fixture
def hq_dir(tmp_path: Path) -> Path:
    root = tmp_path / "hq"
    _save(_noise_image(72, 88, 0), root / "a.png")
    _save(_noise_image(64, 64, 1), root / "sub" / "B.PNG")
    _save(_noise_image(80, 68, 2), root / "sub" / "deeper" / "c.bmp")
    (root / "a.txt").write_text("  a red fox \n", encoding="utf-8")
    (root / "notes.md").write_text("not an image", encoding="utf-8")
    return root


def test_lists_images_recursively_with_any_extension_case(hq_dir):
    dataset = PairedSRDataset(hq_dir, crop_size=64)
    names = [Path(p).name for p in dataset.paths]
    assert names == ["a.png", "B.PNG", "c.bmp"]
    assert len(dataset) == 3


def test_crops_are_aligned_windows_of_the_image(hq_dir):
    torch.manual_seed(0)
    dataset = PairedSRDataset(hq_dir, crop_size=32, hflip=False)
    full = _as_tensor(np.asarray(Image.open(hq_dir / "a.png")))
    origins = set()
    for _ in range(6):
        item = dataset[0]
        assert item["hq"].shape == (3, 32, 32) and item["hq"].dtype == torch.float32
        top, left = _origin(item["hq"], full)
        assert top % 4 == 0 and left % 4 == 0
        origins.add((top, left))
    assert len(origins) > 1


def test_flips_are_random_and_optional(hq_dir):
    torch.manual_seed(0)
    full = _as_tensor(np.asarray(Image.open(hq_dir / "sub" / "B.PNG")))
    flipped = PairedSRDataset(hq_dir, crop_size=64, hflip=False, vflip=True)
    seen = {torch.equal(flipped[1]["hq"], full.flip(-2)) for _ in range(10)}
    assert seen == {True, False}
    plain = PairedSRDataset(hq_dir, crop_size=64, hflip=False)
    assert torch.equal(plain[1]["hq"], full)


def test_captions_from_text_files_with_an_explicit_fallback(hq_dir):
    dataset = PairedSRDataset(hq_dir, crop_size=64)
    assert dataset[0]["caption"] == "a red fox"
    assert dataset[1]["caption"] == DEFAULT_PROMPT
    assert PairedSRDataset(hq_dir, crop_size=64, default_caption="")[1]["caption"] == ""
    strict = PairedSRDataset(hq_dir, crop_size=64, require_captions=True)
    assert strict[0]["caption"] == "a red fox"
    with pytest.raises(FileNotFoundError, match=r"B\.txt"):
        strict[1]


def test_image_smaller_than_the_crop_names_the_file(hq_dir):
    _save(_noise_image(40, 100, 3), hq_dir / "small.png")
    dataset = PairedSRDataset(hq_dir, crop_size=64)
    index = [Path(p).name for p in dataset.paths].index("small.png")
    with pytest.raises(ValueError, match=r"small\.png is 100x40"):
        dataset[index]


def test_bad_folders_and_crop_sizes_are_rejected(tmp_path, hq_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        PairedSRDataset(tmp_path / "empty")
    with pytest.raises(NotADirectoryError):
        PairedSRDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="multiple of scale"):
        PairedSRDataset(hq_dir, crop_size=30)


def test_stored_lq_of_the_same_size_is_cropped_and_flipped_with_the_hq(tmp_path, hq_dir):
    lq_dir = tmp_path / "lq"
    for path in PairedSRDataset(hq_dir, crop_size=64).paths:
        relative = Path(path).relative_to(hq_dir).with_suffix(".png")
        _save(np.asarray(Image.open(path)), lq_dir / relative)  # LQ == HQ, lossless
    torch.manual_seed(0)
    dataset = PairedSRDataset(hq_dir, lq_dir, crop_size=32, vflip=True)
    for index in range(3):
        item = dataset[index]
        assert torch.equal(item["lq"], item["hq"])


def test_stored_quarter_size_lq_is_aligned_and_upsampled(tmp_path, hq_dir):
    lq_dir = tmp_path / "lq"
    small = {"a": _noise_image(18, 22, 10), "sub/B": _noise_image(16, 16, 11)}
    small["sub/deeper/c"] = _noise_image(20, 17, 12)
    for stem, array in small.items():
        _save(array, lq_dir / f"{stem}.jpg" if stem == "a" else lq_dir / f"{stem}.png")
    torch.manual_seed(1)
    dataset = PairedSRDataset(hq_dir, lq_dir, crop_size=32, hflip=False)
    full_hq = _as_tensor(np.asarray(Image.open(hq_dir / "sub" / "deeper" / "c.bmp")))
    full_lq = _as_tensor(np.asarray(Image.open(lq_dir / "sub" / "deeper" / "c.png")))
    for _ in range(4):
        item = dataset[2]
        top, left = _origin(item["hq"], full_hq)
        window = full_lq[:, top // 4 : top // 4 + 8, left // 4 : left // 4 + 8]
        assert torch.equal(item["lq"], upsample_lq(window[None], size=(32, 32))[0])
    assert dataset[0]["lq"].shape == (3, 32, 32)  # the .jpg LQ pairs with a.png by stem


def test_lq_errors_name_the_files(tmp_path, hq_dir):
    lq_dir = tmp_path / "lq"
    _save(_noise_image(18, 22, 0), lq_dir / "a.png")
    dataset = PairedSRDataset(hq_dir, lq_dir, crop_size=32)
    for sample in (dataset.check, dataset.__getitem__):  # reported per image, not at once
        with pytest.raises(FileNotFoundError, match=r"no LQ image .*B\.\* for .*B\.PNG"):
            sample(1)
    _save(_noise_image(16, 16, 0), lq_dir / "sub" / "B.png")
    _save(_noise_image(50, 50, 0), lq_dir / "sub" / "deeper" / "c.png")
    dataset = PairedSRDataset(hq_dir, lq_dir, crop_size=32)
    with pytest.raises(ValueError, match=r"c\.png is \(50, 50\)"):
        dataset[2]
    _save(_noise_image(18, 22, 0), lq_dir / "a.jpg")
    with pytest.raises(ValueError, match="share the stem"):
        PairedSRDataset(hq_dir, lq_dir, crop_size=32)


def test_degrade_batch_adds_upsampled_lq_to_a_loader_batch(hq_dir):
    torch.manual_seed(0)
    loader = DataLoader(PairedSRDataset(hq_dir, crop_size=64), batch_size=3)
    batch = next(iter(loader))
    out = degrade_batch(batch, torch.Generator().manual_seed(0))
    assert out["lq"].shape == batch["hq"].shape == (3, 3, 64, 64)
    assert out["lq"].min() >= 0 and out["lq"].max() <= 1
    assert out["hq"] is batch["hq"] and out["path"] == batch["path"]
    again = degrade_batch(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out["lq"], again["lq"])
    # 16x16 LQ upsampled back: far blurrier than the HQ crop.
    detail = F.avg_pool2d(batch["hq"], 4).repeat_interleave(4, -1).repeat_interleave(4, -2)
    assert (out["lq"] - batch["hq"]).abs().mean() > 0.5 * (detail - batch["hq"]).abs().mean()


def test_degrade_batch_with_usm_returns_the_sharpened_target(hq_dir):
    batch = {"hq": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    out = degrade_batch(batch, torch.Generator(), DegradationConfig(usm_sharpen_hq=True))
    torch.testing.assert_close(out["hq"], usm_sharpen(batch["hq"]))
