"""Image loading/saving helpers of the TSD-SR example."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scoredistill.sr.imageio import list_images, load_image, save_png

RNG = np.random.default_rng(0)


def _write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit grey + alpha / RGB / RGBA PNG written by hand, independently of save_png."""
    height, width, channels = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    colour_type = {2: 4, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _png_bit_depth(path: Path) -> int:
    """The IHDR bit depth of a PNG file."""
    return path.read_bytes()[24]


def test_rgb_png_loads_as_float_chw(tmp_path):
    array = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.rgb.dtype == torch.float32
    assert image.rgb.shape == (3, 6, 9)
    assert image.alpha is None and not image.grey
    assert image.bits == 8
    np.testing.assert_array_equal(image.rgb.permute(1, 2, 0).numpy() * 255, array)


def test_rgba_drops_alpha_and_returns_it(tmp_path):
    array = RNG.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    Image.fromarray(array, mode="RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.rgb.shape == (3, 4, 5)
    assert image.alpha is not None and image.alpha.shape == (1, 4, 5)
    np.testing.assert_allclose(image.alpha[0].numpy() * 255, array[..., 3], atol=1e-4)
    np.testing.assert_allclose(image.rgb.permute(1, 2, 0).numpy() * 255, array[..., :3], atol=1e-4)


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_is_replicated_and_remembered(tmp_path, mode):
    channels = 1 if mode == "L" else 2
    array = RNG.integers(0, 256, (4, 5, channels), dtype=np.uint8)
    Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.grey
    assert image.rgb.shape == (3, 4, 5)
    for channel in image.rgb:
        np.testing.assert_allclose(channel.numpy() * 255, array[..., 0], atol=1e-4)
    assert (image.alpha is not None) == (mode == "LA")


def test_16bit_grey_png_is_scaled_by_65535(tmp_path):
    array = RNG.integers(0, 65536, (4, 5), dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "g16.png")
    image = load_image(tmp_path / "g16.png")
    assert image.grey and image.bits == 16
    np.testing.assert_allclose(image.rgb[0].double().numpy() * 65535, array, atol=5e-3)


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_png_keeps_16_bits(tmp_path, channels):
    array = RNG.integers(0, 65536, (4, 5, channels))
    _write_png16(tmp_path / "c16.png", array)
    image = load_image(tmp_path / "c16.png")
    assert not image.grey and image.bits == 16
    np.testing.assert_allclose(
        image.rgb.permute(1, 2, 0).double().numpy() * 65535, array[..., :3], atol=5e-3
    )
    assert (image.alpha is not None) == (channels == 4)


def test_16bit_grey_alpha_png_keeps_16_bits_and_stays_grey(tmp_path):
    array = RNG.integers(0, 65536, (4, 5, 2))
    _write_png16(tmp_path / "la16.png", array)
    image = load_image(tmp_path / "la16.png")
    assert image.grey and image.bits == 16 and image.alpha is not None
    for channel in image.rgb:
        np.testing.assert_allclose(channel.double().numpy() * 65535, array[..., 0], atol=5e-3)
    np.testing.assert_allclose(image.alpha[0].double().numpy() * 65535, array[..., 1], atol=5e-3)


def test_16bit_grey_tiff_keeps_16_bits(tmp_path):
    array = RNG.integers(0, 65536, (4, 5), dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "g16.tif")
    image = load_image(tmp_path / "g16.tif")
    assert image.grey and image.bits == 16
    np.testing.assert_array_equal((image.rgb[0].double().numpy() * 65535).round(), array)


@pytest.mark.parametrize(("channels", "layout"), [(3, "contig"), (4, "contig"), (3, "separate"),
                                                 (2, "contig")])
@pytest.mark.parametrize("compression", [None, "lzw", "zlib"])
def test_16bit_tiffs_keep_16_bits(tmp_path, channels, layout, compression):
    tifffile = pytest.importorskip("tifffile")  # Pillow cannot write 16-bit colour TIFFs
    if compression:
        pytest.importorskip("imagecodecs")  # tifffile's codecs for compressed TIFFs
    array = RNG.integers(0, 65536, (4, 5, channels), dtype=np.uint16)
    stored = array.transpose(2, 0, 1) if layout == "separate" else array
    tifffile.imwrite(tmp_path / "c16.tif", stored, photometric="rgb" if channels > 2 else
                     "minisblack", planarconfig=layout, compression=compression,
                     extrasamples=["unassalpha"] if channels in (2, 4) else None)
    image = load_image(tmp_path / "c16.tif")
    assert image.bits == 16 and image.grey == (channels == 2)
    colour = image.rgb[:1] if image.grey else image.rgb
    restored = torch.cat([colour, image.alpha]) if channels in (2, 4) else colour
    np.testing.assert_array_equal((restored.double().numpy() * 65535).round(),
                                  array.transpose(2, 0, 1))


def test_float_tiff_in_unit_range_is_read_and_other_ranges_refused(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    array = RNG.random((4, 5, 3), dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", array, photometric="rgb")
    assert torch.equal(load_image(tmp_path / "f.tif").rgb, torch.from_numpy(array).permute(2, 0, 1))
    tifffile.imwrite(tmp_path / "hdr.tif", array * 4, photometric="rgb")
    with pytest.raises(ValueError, match=r"hdr\.tif.*outside \[0, 1\]"):
        load_image(tmp_path / "hdr.tif")


def test_palette_image_is_expanded_to_rgb(tmp_path):
    array = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    palette = Image.fromarray(array).quantize(colors=4)
    palette.save(tmp_path / "p.png")
    image = load_image(tmp_path / "p.png")
    expected = np.asarray(palette.convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_allclose(image.rgb.permute(1, 2, 0).numpy(), expected)
    assert image.alpha is None and not image.grey


def test_truncated_image_raises_value_error_naming_file(tmp_path):
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"t\.png"):
        load_image(tmp_path / "t.png")


def test_non_image_raises_value_error_naming_file(tmp_path):
    (tmp_path / "junk.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"junk\.jpg"):
        load_image(tmp_path / "junk.jpg")


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_save_png_round_trips_8bit_values(tmp_path, channels):
    tensor = torch.from_numpy(RNG.integers(0, 256, (channels, 5, 6))).float() / 255
    save_png(tensor, tmp_path / "out.png")
    assert _png_bit_depth(tmp_path / "out.png") == 8
    with Image.open(tmp_path / "out.png") as img:
        array = np.asarray(img).reshape(5, 6, channels)
    np.testing.assert_array_equal(array.transpose(2, 0, 1), (tensor * 255).round().numpy())


def test_save_png_replaces_atomically_leaving_no_temp_files(tmp_path):
    target = tmp_path / "out.png"
    save_png(torch.zeros(3, 4, 4), target)
    save_png(torch.ones(3, 4, 4), target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    assert load_image(target).rgb.min() == 1.0


@pytest.mark.parametrize("exists", [False, True])
def test_ctrl_c_mid_write_leaves_no_temp_file_and_the_old_file(tmp_path, monkeypatch, exists):
    from scoredistill.sr import imageio

    target = tmp_path / "out.png"
    if exists:
        save_png(torch.zeros(3, 4, 4), target)
    before = target.read_bytes() if exists else None

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio.os, "fsync", interrupted)  # after the data, before the rename
    with pytest.raises(KeyboardInterrupt):
        save_png(torch.ones(3, 4, 4), target)
    assert [p.name for p in tmp_path.iterdir()] == (["out.png"] if exists else [])
    assert (target.read_bytes() if exists else None) == before


def test_save_png_without_overwrite_keeps_an_existing_file(tmp_path):
    target = tmp_path / "out.png"
    save_png(torch.zeros(3, 4, 4), target)
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match=r"out\.png exists; not replaced"):
        save_png(torch.ones(3, 4, 4), target, overwrite=False)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    save_png(torch.ones(3, 4, 4), tmp_path / "new.png", overwrite=False)
    assert load_image(tmp_path / "new.png").rgb.min() == 1.0


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_save_png_16bit_round_trips_exactly(tmp_path, channels):
    levels = torch.from_numpy(RNG.integers(0, 65536, (channels, 5, 6)))
    levels[:, 0, :2] = torch.tensor([0, 65535])  # both ends of the range
    tensor = levels.float() / 65535
    save_png(tensor, tmp_path / "out.png", bits=16)
    assert _png_bit_depth(tmp_path / "out.png") == 16
    image = load_image(tmp_path / "out.png")
    assert image.bits == 16 and image.grey == (channels == 1)
    rgb = image.rgb[:1] if channels == 1 else image.rgb
    restored = rgb if image.alpha is None else torch.cat([rgb, image.alpha])
    assert torch.equal(restored, tensor)


def test_save_png_16bit_grey_reads_back_in_pillow(tmp_path):
    levels = RNG.integers(0, 65536, (5, 6))
    save_png(torch.from_numpy(levels).float()[None] / 65535, tmp_path / "g.png", bits=16)
    with Image.open(tmp_path / "g.png") as img:
        assert img.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(img), levels)


def test_save_png_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="C,H,W"):
        save_png(torch.zeros(2, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty"):
        save_png(torch.zeros(3, 0, 4), tmp_path / "x.png", bits=16)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bits", [12, 0, 32])
def test_save_png_rejects_other_bit_depths(tmp_path, bits):
    with pytest.raises(ValueError, match=f"got {bits}"):
        save_png(torch.zeros(3, 4, 4), tmp_path / "x.png", bits=bits)
    assert not any(tmp_path.iterdir())


def test_list_images_filters_by_extension_and_sorts(tmp_path):
    names = ["b.PNG", "a b ü.jpg", "c.jpeg", "d.bmp", "e.tif", "f.tiff", "g.webp", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    listed = [p.name for p in list_images(tmp_path)]
    assert listed == sorted(n for n in names if n != "notes.txt")


def test_list_images_requires_a_folder(tmp_path):
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "missing")
