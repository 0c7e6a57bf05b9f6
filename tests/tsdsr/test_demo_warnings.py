"""make demo's stages print no third-party warnings (issue 23, "the first five minutes"): the
tiny precompute, LPIPS and infer.py, each run the way run_tiny runs it."""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("diffusers")

from examples.tsdsr import infer
from examples.tsdsr.models.tiny import random_backbone
from examples.tsdsr.precompute import precompute
from examples.tsdsr.training.models import make_lpips
from scoredistill.sr.imageio import save_png

LIBRARIES = ("diffusers", "transformers", "peft", "torchvision", "lpips")


@contextmanager
def third_party_warnings() -> Iterator[list[str]]:
    """Python warnings and the libraries' logged warnings (their loggers do not propagate, and
    their handlers keep the stderr of the moment they were made), collected while in the block."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(f"[{record.name}] {record.getMessage()}")

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found.extend(f"[{w.category.__name__}] {w.message}" for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_precompute_lpips_and_infer_print_no_third_party_warnings(tmp_path, monkeypatch):
    # diffusers' .to() warned about fp32-kept modules once precompute no longer silenced all of
    # diffusers' logging for the rest of the process.
    monkeypatch.setattr(infer, "fitted_backbone", lambda dtype, device:
                        random_backbone("tiny", dtype=dtype, device=device))
    g = torch.Generator().manual_seed(0)
    (tmp_path / "hq").mkdir()
    for name in ("a", "b"):
        save_png(torch.rand(3, 32, 32, generator=g), tmp_path / "hq" / f"{name}.png")
    (tmp_path / "hq" / "a.txt").write_text("an astronaut in a white space suit with a flag\n")
    with third_party_warnings() as found:
        precompute(tmp_path / "hq", tmp_path / "embeds")
        make_lpips(None)
        assert infer.main([str(tmp_path / "hq"), "--out", str(tmp_path / "sr"), "--embeds",
                           str(tmp_path / "embeds"), "--process-size", "64",
                           "--no-progress"]) == 0
    assert found == []
