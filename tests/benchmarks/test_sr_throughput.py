"""The end-to-end SR benchmark's CPU smoke run: every way on every workload, files written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from benchmarks.sr_throughput import main


def test_quick_run_measures_every_row(tmp_path):
    main(["--quick", "--device", "cpu", "--count", "2", "--folder", str(tmp_path / "none"),
          "--out", str(tmp_path)])
    report = json.loads((tmp_path / "sr_throughput.json").read_text())
    assert report["complete"] is True and report["config"] == "tiny"
    assert report["folder"] == "2 generated 32 px images"
    rows = {(r["way"], r.get("workload")): r for r in report["rows"]}
    measured = [r for r in rows.values() if "s" in r]
    assert {r["workload"] for r in measured} == {"folder 32 -> 128 px", "64 -> 256 px"}
    assert {r["way"] for r in measured} == {"release way (torch.float32)", "pipeline eager"}
    for r in measured:
        assert "note" not in r, r  # every output file was written
        assert r["images/s"] == pytest.approx(r["images"] / r["s"])
    for r in (r for r in measured if r["way"].startswith("release")):
        stages = [r[k] for k in ("I/O s", "VAE encode s", "transformer s", "VAE decode s")]
        assert all(v > 0 for v in stages) and sum(stages) <= r["s"]
    [seam] = report["seams"]
    assert seam["size"] == 256 and 0 < seam["mean abs diff"] <= seam["max abs diff"]
