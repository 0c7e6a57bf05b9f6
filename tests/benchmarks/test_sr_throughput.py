"""The end-to-end SR benchmark's CPU smoke run: every way on every workload, files written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from benchmarks.sr_throughput import main


def test_quick_run_measures_every_row(tmp_path):
    main(["--quick", "--device", "cpu", "--count", "2", "--generated", "--out", str(tmp_path)])
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
        release = rows[("release way (torch.float32)", r["workload"])]
        assert r["x release"] == pytest.approx(release["s"] / r["s"])
    for r in measured:  # every stage timed, and together within the wall time
        stages = [r[k] for k in ("VAE encode s", "transformer s", "VAE decode s", "other s")]
        assert all(v > 0 for v in stages) and sum(stages) + r["I/O s"] <= r["s"]
    skipped = [r for r in report["rows"] if "compiled" in r["way"]]
    assert len(skipped) == 4 and all("skipped in --quick" in r["note"] for r in skipped)
    [seam] = report["seams"]
    assert seam["size"] == 256 and 0 < seam["mean abs diff"] <= seam["max abs diff"]


def test_a_stopped_run_shows_the_rows_it_did_not_reach(tmp_path, monkeypatch):
    import benchmarks.sr_throughput as bench

    real = bench.make_runner

    def stop_at_eager(way, *args):
        if way == "eager":
            raise KeyboardInterrupt  # as a time limit would
        return real(way, *args)

    monkeypatch.setattr(bench, "make_runner", stop_at_eager)
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--device", "cpu", "--count", "1", "--generated",
              "--ways", "release", "eager", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "sr_throughput.json").read_text())
    assert report["complete"] is False
    notes = [(r["way"].split()[0], r["workload"].split()[0], r.get("note")) for r in report["rows"]]
    assert notes == [("release", "folder", None),
                     ("pipeline", "folder", "not reached: the run stopped before it"),
                     ("release", "64", "not reached: the run stopped before it"),
                     ("pipeline", "64", "not reached: the run stopped before it")]
