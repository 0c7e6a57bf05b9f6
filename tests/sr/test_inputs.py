"""TSDSRPipeline's diffusers conventions: PIL / numpy / tensor inputs (uint8 rescaled, floats
outside [0, 1] refused), output_type, the output dataclass and its timings, keyword options,
torch_dtype and .to()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from examples.tsdsr.models.tiny import random_backbone
from scoredistill.sr.images import from_tensors, to_tensors
from scoredistill.sr.loading import load_model
from scoredistill.sr.pipeline import SROptions, TSDSROutput, TSDSRPipeline
from scoredistill.sr.timing import StageTimer

OPTIONS = SROptions(upscale=2.0, process_size=16)
RNG = np.random.default_rng(0)
ARRAY = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # HWC uint8, 20 wide, 12 high
FLOAT = torch.from_numpy(ARRAY).permute(2, 0, 1).float() / 255  # the same image, (3, H, W)


@pytest.fixture(scope="module")
def pipe():
    return TSDSRPipeline(load_model(random_backbone()), tiles=None, options=OPTIONS)


def test_every_input_kind_converts_to_the_same_image():
    grey = ARRAY[..., 0]
    cases = [
        Image.fromarray(ARRAY),                       # PIL RGB
        ARRAY,                                        # numpy HWC uint8
        ARRAY / 255.0,                                # numpy HWC float64 in [0, 1]
        (ARRAY / 255.0).astype(np.float16),           # numpy half
        torch.from_numpy(ARRAY).permute(2, 0, 1),     # tensor CHW uint8
        FLOAT,                                        # tensor CHW float in [0, 1]
        FLOAT[None],                                  # tensor BCHW, batch 1
    ]
    for i, case in enumerate(cases):
        (got,) = to_tensors(case)
        assert got.shape == (3, 12, 20) and got.dtype == torch.float32, i
        torch.testing.assert_close(got, FLOAT, rtol=0, atol=1e-3 if i == 3 else 1e-6, msg=str(i))
    want = FLOAT[:1].expand(3, -1, -1)
    for case in (Image.fromarray(grey), grey, grey[..., None], torch.from_numpy(grey)):
        torch.testing.assert_close(to_tensors(case)[0], want, rtol=0, atol=1e-6)
    wide = (grey.astype(np.uint16) * 257)  # 16-bit grey: numpy uint16 and PIL's I;16
    for case in (wide, Image.fromarray(wide)):
        torch.testing.assert_close(to_tensors(case)[0], want, rtol=0, atol=1e-6)


def test_lists_and_batches_give_one_image_each():
    batch = torch.stack([FLOAT, FLOAT.flip(-1)])
    out = to_tensors([Image.fromarray(ARRAY), batch, ARRAY[None].repeat(2, 0)])
    assert len(out) == 5
    torch.testing.assert_close(out[2], FLOAT.flip(-1))
    assert len(to_tensors(batch)) == 2 and to_tensors([]) == []


@pytest.mark.parametrize(("images", "message"), [
    (FLOAT * 255, r"image 0 has float values in \[0, 255\], outside \[0, 1\].*x / 255"),
    ([FLOAT, FLOAT * 2 - 1], r"image 1 has float values in \[-1, 1\], outside \[0, 1\]"),
    (ARRAY.astype(np.float32), r"image 0 has float values in \[0, 255\]"),
    ([FLOAT, torch.stack([FLOAT, FLOAT + 0.5])], r"image 1\[1\] has float values in \[0.5, 1.5\]"),
    (torch.full((3, 8, 8), float("nan")), "image 0 holds NaN or infinite values"),
    (FLOAT.permute(1, 2, 0), r"shape \(12, 20, 3\): tensors are \(C, H, W\); pass x.permute"),
    (FLOAT.numpy(), r"numpy images are \(H, W, C\); pass np.transpose"),
    (Image.fromarray(ARRAY).convert("RGBA"), r"mode RGBA \(with alpha\): pass image.convert"),
    (np.zeros((8, 8, 4), np.uint8), "expected 3 .RGB. or 1 .grey. channels .drop the alpha"),
    (torch.zeros(3, 8, 8, dtype=torch.int64), "dtype torch.int64: pass uint8, or floats"),
    (np.zeros((8, 8, 3), np.int32), "dtype int32: pass uint8, uint16 or floats"),
    (torch.rand(3, 4, 30), "image 0 is 30x4 px; at least 8 px per side"),
])
def test_unreadable_images_are_refused_naming_the_image(pipe, images, message):
    with pytest.raises(ValueError, match=message):
        pipe(images)


def test_other_objects_are_refused_with_a_type_error(pipe):
    with pytest.raises(TypeError, match="image 1 is a str: pass a PIL image"):
        pipe([FLOAT, "photo.png"])


def test_uint8_tensor_gives_the_output_of_the_same_image_in_floats(pipe):
    # Issue 21's bad case: a uint8 tensor was clamped to near-white (mean 0.985 against 0.498).
    as_uint8 = pipe(torch.from_numpy(ARRAY).permute(2, 0, 1), output_type="pt").images[0]
    torch.testing.assert_close(as_uint8, pipe(FLOAT, output_type="pt").images[0])
    torch.testing.assert_close(pipe(Image.fromarray(ARRAY), output_type="pt").images[0],
                               as_uint8)


def test_output_types(pipe):
    pt = pipe([FLOAT, FLOAT[..., :8]], output_type="pt")
    assert isinstance(pt, TSDSROutput) and pt.timings is None
    assert [tuple(x.shape) for x in pt.images] == [(3, 24, 40), (3, 24, 16)]
    np_out = pipe(FLOAT, output_type="np").images
    assert np_out[0].shape == (24, 40, 3) and np_out[0].dtype == np.float32
    np.testing.assert_allclose(np_out[0], pt.images[0].permute(1, 2, 0).numpy(), atol=1e-6)
    pil = pipe(FLOAT).images[0]  # "pil" is the default, as in diffusers
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and pil.size == (40, 24)
    np.testing.assert_array_equal(np.asarray(pil), (np_out[0] * 255).round().astype(np.uint8))
    images, timings = pipe(FLOAT, output_type="pt", return_dict=False)
    torch.testing.assert_close(images[0], pt.images[0])
    assert timings is None and pipe(FLOAT, output_type="pt")[0][0].shape == (3, 24, 40)
    with pytest.raises(ValueError, match="output_type must be one of 'pil', 'np', 'pt', got "
                                         "'latent'"):
        pipe(FLOAT, output_type="latent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_type"):
        from_tensors(pt.images, "PIL")  # type: ignore[arg-type]


def test_keywords_replace_the_options_fields(pipe):
    assert pipe(FLOAT, output_type="pt", upscale=3).images[0].shape == (3, 36, 60)
    base = SROptions(upscale=1.5, process_size=16, color="none")
    assert pipe(FLOAT, base, output_type="pt").images[0].shape == (3, 18, 30)
    torch.testing.assert_close(pipe(FLOAT, base, output_type="pt", color="wavelet").images[0],
                               pipe(FLOAT, SROptions(1.5, 16), output_type="pt").images[0])


@pytest.mark.parametrize(("fields", "message"), [
    (dict(strength=1.5), r"strength must be in \[0, 1\].*got 1.5"),
    (dict(strength=-0.1), r"strength must be in \[0, 1\]"),
    (dict(strength=float("nan")), r"strength must be in \[0, 1\]"),
    (dict(color="lab"), "unknown colour fix 'lab'; choose from wavelet, adain, none"),
    (dict(process_size=512.0), "process_size must be a positive integer, got 512.0"),
    (dict(upscale=0), "upscale must be a positive number"),
])
def test_bad_options_are_refused(pipe, fields, message):
    with pytest.raises(ValueError, match=message):
        SROptions(**fields)
    with pytest.raises(ValueError, match=message):
        pipe(FLOAT, **fields)
    if "strength" in fields:  # the model-input form checks it too
        with pytest.raises(ValueError, match=message):
            pipe.forward([torch.zeros(1, 3, 16, 16)], fields["strength"])


def test_timings_are_those_of_the_call_when_the_timer_is_on(pipe):
    timer = StageTimer(enabled=True)
    timed = TSDSRPipeline(pipe.model, tiles=None, options=OPTIONS, timer=timer)
    first = timed(FLOAT).timings
    second = timed(FLOAT).timings
    assert {"upload + resize", "VAE encode", "transformer", "VAE decode",
            "colour fix + resize"} == first.keys() == second.keys()
    assert all(s > 0 for s in [*first.values(), *second.values()])
    for stage, total in timer.totals().items():  # per call, not running totals
        assert abs(first[stage] + second[stage] - total) < 1e-9


def test_torch_dtype_and_to_cast_and_move_the_model():
    pipe = TSDSRPipeline.from_pretrained(random_backbone(), torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    assert next(pipe.model.student.module.parameters()).dtype == torch.bfloat16
    assert TSDSRPipeline.from_pretrained(random_backbone(), dtype=torch.bfloat16).dtype == \
        torch.bfloat16  # the earlier keyword, kept as an alias
    assert pipe.to(torch.float32) is pipe
    parts = (pipe.model.student.module, pipe.model.vae)
    assert all(p.dtype == torch.float32 for m in parts for p in m.parameters())
    assert all(c.dtype == torch.float32 for c in pipe.model.cond.values())
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    assert pipe.to("cpu", torch.bfloat16).dtype == torch.bfloat16
    out = pipe(FLOAT, OPTIONS, output_type="pt").images[0]
    assert out.dtype == torch.float32 and out.shape == (3, 24, 40)
    with pytest.raises(ValueError, match=r"torch_dtype=torch.float16 and dtype=torch.float32 "
                                         r"disagree"):
        TSDSRPipeline.from_pretrained(random_backbone(), torch_dtype=torch.float16,
                                      dtype=torch.float32)
    with pytest.raises(TypeError, match=r"torch_dtype must be a torch\.dtype.*got 'fp16'"):
        TSDSRPipeline.from_pretrained(random_backbone(), torch_dtype="fp16")  # type: ignore


def test_an_upscale_that_leaves_no_pixel_is_one_line(pipe):
    """SROptions accepts any upscale > 0; an image it would shrink below 1 px is refused by
    name (it was a ZeroDivisionError)."""
    with pytest.raises(ValueError, match=r"upscale 0.001 makes this 24x16 px image 0x0 px: "
                                         r"give an upscale above 0.03125"):
        pipe(torch.rand(3, 16, 24), upscale=0.001)
