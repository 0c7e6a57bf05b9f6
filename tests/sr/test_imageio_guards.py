"""The guards every decoder path of scoredistill.sr.imageio shares: orientation applied, a pixel
limit checked from the header, multi-frame files warned about, output files following the
umask."""

import logging
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from scoredistill.sr.imageio import load_image, save_png

tifffile = pytest.importorskip("tifffile")  # the deep-TIFF path
RNG = np.random.default_rng(0)
ARRAY = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # 7 wide, 5 high: rotations show


def _with_orientation(path, orientation, array=ARRAY, fmt="PNG"):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, format=fmt, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(tmp_path, orientation):
    path = tmp_path / "o.png"
    _with_orientation(path, orientation)
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img))
    got = load_image(path).rgb.permute(1, 2, 0).numpy() * 255
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_rotated_jpeg_is_read_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    _with_orientation(path, 6, np.zeros((40, 64, 3), np.uint8), fmt="JPEG")
    assert load_image(path).rgb.shape == (3, 64, 40)  # stored 64 wide, shown 64 high


def test_deep_tiff_orientation_tag_is_applied(tmp_path):
    array = RNG.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "o.tif", array, photometric="rgb",
                     extratags=[(274, "H", 1, 8, True)])  # Orientation: rotate 90 CCW
    got = load_image(tmp_path / "o.tif").rgb.permute(1, 2, 0).double().numpy() * 65535
    np.testing.assert_allclose(got, np.rot90(array), atol=5e-3)


def _png16_header_only(path, width, height):
    """A 16-bit RGB PNG whose header claims width x height px, with a tiny IDAT: what a
    decompression bomb looks like before its pixels are inflated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_16bit_png_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    _png16_header_only(path, 14000, 14000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"bomb\.png.*14000x14000 = 196,000,000 pixels.*"
                                         "--max-pixels"):
        load_image(path)
    assert time.perf_counter() - start < 1  # nothing was inflated
    with pytest.raises(ValueError) as error:  # no limit: the decoder runs (and finds no data)
        load_image(path, max_pixels=None)
    assert "limit" not in str(error.value)


@pytest.mark.parametrize("kind", ["8-bit png", "16-bit png", "16-bit tiff"])
def test_every_decoder_path_has_the_limit_and_it_can_be_raised(tmp_path, kind, monkeypatch):
    path = tmp_path / ("a.tif" if "tiff" in kind else "a.png")
    if kind == "8-bit png":
        Image.fromarray(RNG.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(path)
    elif kind == "16-bit png":
        save_png(torch.rand(3, 100, 100), path, bits=16)
    else:
        tifffile.imwrite(path, RNG.integers(0, 65536, (100, 100, 3), dtype=np.uint16),
                         photometric="rgb")
    with pytest.raises(ValueError, match="100x100 = 10,000 pixels, above the limit of 9,999"):
        load_image(path, max_pixels=9_999)
    # Our limit replaces Pillow's (which raises above twice its own) and leaves it as it was.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(path, max_pixels=10_000).rgb.shape == (3, 100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("kind", ["gif", "tiff", "16-bit tiff"])
def test_multi_frame_files_are_read_with_a_warning(tmp_path, kind, caplog):
    frames = [RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / ("anim.gif" if kind == "gif" else "pages.tif")
    if kind == "16-bit tiff":
        tifffile.imwrite(path, np.stack(frames).astype(np.uint16) * 257, photometric="rgb")
    else:
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:])
    with caplog.at_level(logging.WARNING):
        image = load_image(path)
    assert image.rgb.shape == (3, 6, 8)
    assert f"{path} has 3 frames or pages" in caplog.text and "only the first" in caplog.text
    caplog.clear()
    Image.fromarray(frames[0]).save(tmp_path / "one.png")
    with caplog.at_level(logging.WARNING):
        load_image(tmp_path / "one.png")
    assert "frames" not in caplog.text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("bits", [8, 16])
def test_written_files_follow_the_umask(tmp_path, umask, bits):
    previous = os.umask(umask)
    try:
        save_png(torch.rand(3, 4, 4), tmp_path / "out.png", bits=bits)
    finally:
        os.umask(previous)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~umask
