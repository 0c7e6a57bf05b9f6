"""The tiled-VAE benchmark's CPU smoke run: every variant measured, offload changes nothing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from benchmarks.tiled_vae import main


def test_quick_run_reports_every_variant_against_untiled(tmp_path):
    main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "tiled_vae.json").read_text())
    assert report["complete"] is True and report["config"] == "tiny"
    assert report["command"] == "python -m benchmarks.tiled_vae --quick --device cpu"
    rows = report["rows"]
    assert {(r["stage"], r["variant"]) for r in rows} == {
        (s, v) for s in ("encode", "decode") for v in (
            "untiled", "per-tile statistics, blended", "whole-image statistics, offload",
            "whole-image statistics, on device")}
    for r in rows:
        assert r["ms"] > 0 and r["size"] == 128
        if r["variant"] != "untiled":  # tiled for real: the result moved, but stayed finite
            assert 0 < r["mean abs diff"] <= r["max abs diff"] < float("inf")
