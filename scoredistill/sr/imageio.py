"""Image files <-> float32 tensors (C,H,W) in [0, 1], the layout the TSD-SR scripts work in.

Every decoder path (Pillow, 16-bit PNGs and deep TIFFs through imagecodecs/tifffile) gets
the same guards: the pixel count is checked from the file's header before anything is decoded
(decompression bombs), the EXIF / TIFF orientation is applied so images are read upright (and
written without a tag, so viewers agree), and files with several frames or pages are warned
about (only the first is read).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scoredistill.atomic import new_file_mode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's decompression-bomb limit (about 9459 x 9459 px), applied to every decoder path."""

log = logging.getLogger("scoredistill.sr.imageio")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GREY_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class LoadedImage:
    """RGB (3,H,W) float32 in [0, 1], the alpha plane (1,H,W) if any, whether it was grey, and
    the file's bits per sample: 8, or 16 for anything deeper."""

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    grey: bool
    bits: int


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by extension, any case) directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    files = (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(files, key=lambda p: p.name)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> LoadedImage:
    """Read an image file as RGB float32 (3,H,W) in [0, 1], upright; ValueError naming
    unreadable files and files of more than ``max_pixels`` pixels (None: no limit)."""
    path = Path(path)
    try:
        if _is_16bit_png_pillow_reduces(path):
            _check_pixels(path, *_png_size(path), max_pixels)
            with _pillow_open(path, None) as img:  # orientation and frames from the header
                orientation, frames = _orientation(img), _frames(img)
            array = _read_16bit_png(path)
            grey, bits = array.shape[2] < 3, 16
        elif path.suffix.lower() in (".tif", ".tiff") and _tiff_bits(path) > 8:
            array, orientation, frames = _read_deep_tiff(path, max_pixels)
            grey, bits = array.shape[2] < 3, 16
        else:
            with _pillow_open(path, max_pixels) as img:
                orientation, frames = _orientation(img), _frames(img)
                img.load()  # decode now so truncated data fails here, not later
                array, grey = _pil_to_array(img)
                bits = 16 if img.mode in _GREY_16BIT_MODES else 8
    except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    if frames > 1:
        log.warning("%s has %d frames or pages (an animation or a multi-page file): only the "
                    "first is used", path, frames)
    array = upright(array, orientation)
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    rgb = tensor[:1].expand(3, -1, -1).contiguous() if grey else tensor[:3].contiguous()
    alpha = tensor[-1:].contiguous() if tensor.shape[0] in (2, 4) else None
    return LoadedImage(rgb=rgb, alpha=alpha, grey=grey, bits=bits)


def upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF/TIFF orientation (1-8) to an (H,W,C) array, as Pillow's exif_transpose."""
    if orientation in (5, 6, 7, 8):  # the stored rows are the displayed columns
        array = array.transpose(1, 0, 2)
    flip_rows, flip_cols = {2: (False, True), 3: (True, True), 4: (True, False),
                            6: (False, True), 7: (True, True), 8: (True, False)}.get(
                                orientation, (False, False))
    return array[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def _check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{width}x{height} = {width * height:,} pixels, above the limit of "
                         f"{max_pixels:,} that guards against decompression bombs; raise it "
                         "(--max-pixels) if you trust the file")


@contextmanager
def _pillow_open(path: Path, max_pixels: int | None) -> Iterator[Image.Image]:
    """``Image.open`` (lazy: the header only) with our pixel limit instead of Pillow's."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # checked by _check_pixels right after, for every path
    try:
        img = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    with img:
        _check_pixels(path, *img.size, max_pixels)
        yield img


def _orientation(img: Image.Image) -> int:
    orientation = img.getexif().get(0x0112, 1)
    return orientation if orientation in range(1, 9) else 1


def _frames(img: Image.Image) -> int:
    # An MPO JPEG (phone cameras) holds the photo plus previews, not an animation.
    return 1 if img.format == "MPO" else int(getattr(img, "n_frames", 1))


def _png_size(path: Path) -> tuple[int, int]:
    with path.open("rb") as f:
        header = f.read(24)
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def save_png(image: torch.Tensor, path: str | os.PathLike, bits: int = 8, *,
             overwrite: bool = True) -> None:
    """Write a (C,H,W) tensor in [0, 1], C in {1, 3, 4}, as an 8- or 16-bit PNG, atomically;
    ``overwrite=False``: FileExistsError if ``path`` exists (see :func:`write_atomic`)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4) or 0 in image.shape[1:]:
        raise ValueError(
            f"expected a non-empty (C,H,W) tensor with C in 1, 3, 4; got {tuple(image.shape)}"
        )
    if bits not in (8, 16):
        raise ValueError(f"PNG bits per sample must be 8 or 16, got {bits!r}")
    levels = (image.detach().float().clamp(0, 1) * (2**bits - 1)).round().cpu().numpy()
    array = levels.transpose(1, 2, 0)
    if bits == 16:
        write_atomic(path, _encode_png16(array.astype(np.uint16)), overwrite=overwrite)
        return
    array = array.astype(np.uint8)
    pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue(), overwrite=overwrite)


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part;
    the file gets the mode a plain ``open`` would give it (0666 less the umask).

    The data goes to a hidden temp file in the same folder, renamed over ``path`` at the end; an
    exception (Ctrl-C included) removes it. ``overwrite=False``: FileExistsError, and nothing
    written, if ``path`` exists, decided atomically (a hard link) where the file system allows.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            _rename_new(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _rename_new(tmp_name: str, path: Path) -> None:
    """Rename ``tmp_name`` to ``path`` unless ``path`` exists (FileExistsError)."""
    try:
        os.link(tmp_name, path)  # fails if path exists: no window between check and rename
    except FileExistsError:
        raise FileExistsError(f"{path} exists; not replaced") from None
    except OSError:  # no hard links here (some network and FAT file systems)
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; not replaced") from None
        os.replace(tmp_name, path)
        return
    os.unlink(tmp_name)


def _pil_to_array(img: Image.Image) -> tuple[np.ndarray, bool]:
    """(H,W,C) float32 in [0, 1] with C in {1, 2, 3, 4} (grey/colour, optional trailing alpha)."""
    mode = img.mode
    if mode in _GREY_16BIT_MODES:
        array = np.asarray(img).astype(np.float32)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"integer image mode {mode} with values outside 16 bits")
        return array[..., None] / 65535.0, True
    if mode in ("1", "L", "LA", "La"):
        target = "LA" if mode in ("LA", "La") else "L"
        grey = True
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        target, grey = "RGBA", False
    else:  # RGB, palette, CMYK, YCbCr, ...
        target, grey = "RGB", False
    array = np.asarray(img.convert(target), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return array, grey


def _tiff_bits(path: Path) -> int:
    """Bits per sample of a TIFF's first page."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return int(tif.pages[0].bitspersample)


def _read_deep_tiff(path: Path, max_pixels: int | None) -> tuple[np.ndarray, int, int]:
    """(H,W,C) float32 in [0, 1] from a TIFF of more than 8 bits per sample (first page), grey or
    RGB with an optional alpha, its orientation tag and its number of pages; Pillow would decode
    colour ones at 8 bits."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        _check_pixels(path, page.imagewidth, page.imagelength, max_pixels)
        orientation, frames = int(page.tags.valueof("Orientation", 1)), len(tif.pages)
        array = page.asarray()
        if page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
            raise ValueError(f"TIFF photometric {page.photometric.name} is not grey or RGB")
        if array.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
            array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] > 4:
        raise ValueError(f"TIFF of shape {array.shape} is not one grey or RGB(A) image")
    orientation = orientation if orientation in range(1, 9) else 1
    if array.dtype.kind == "u":
        return array.astype(np.float32) / np.iinfo(array.dtype).max, orientation, frames
    if array.dtype.kind == "f" and array.min() >= 0 and array.max() <= 1:
        return array.astype(np.float32), orientation, frames
    raise ValueError(f"TIFF samples of type {array.dtype} outside [0, 1]")


def _is_16bit_png_pillow_reduces(path: Path) -> bool:
    """True for 16-bit PNGs with colour or alpha, which Pillow reduces to 8 bits per channel."""
    with path.open("rb") as f:
        header = f.read(26)
    # IHDR sits right after the signature: bit depth at byte 24, colour type at byte 25.
    if len(header) < 26 or not header.startswith(_PNG_SIGNATURE) or header[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = header[24], header[25]
    return bit_depth == 16 and colour_type in (2, 4, 6)  # RGB, grey + alpha, RGBA


def _read_16bit_png(path: Path) -> np.ndarray:
    """(H,W,C) float32 in [0, 1], C in {2, 3, 4}, from a 16-bit PNG, scaled by 65535."""
    import imagecodecs  # libpng keeps the 16 bits (Pillow has no 48/64-bit modes)

    decoded = imagecodecs.png_decode(path.read_bytes())
    return decoded.astype(np.float32) / 65535.0


def _encode_png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG file of an (H,W,C) uint16 array, C in {1, 3, 4}."""
    import imagecodecs  # Pillow cannot write 16-bit colour

    planes = array[..., 0] if array.shape[2] == 1 else array
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(planes)))
