"""benchmarks/memory_plan.py's quick mode: the validation rows, and the plan and floor tables of
the tiny preset (shared backbone, the release's two copies, precompute, SR); a stopped run goes
on where it was."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lpips", reason="the train step needs the train extra (LPIPS)")
pytest.importorskip("transformers", reason="the precompute plan needs the train extra")

from benchmarks.memory_plan import main
from scoredistill.memory.trace import GIB


@pytest.mark.slow
def test_quick_run_writes_the_check_plans_and_floors(tmp_path):
    from benchmarks.memory_plan import trace

    # Two rows at a time, each in a spawned process: the same rows as traced in this one.
    md = main(["--quick", "--out", str(tmp_path), "--jobs", "2"])
    report = json.loads((tmp_path / "memory_plan.json").read_text())
    peak, floor, sources, _ = trace(0, quick=True)
    assert report["plans"][0] == peak and report["floors"][0] == floor
    assert "scoredistill/memory/steps.py" in sources
    text = md.read_text()
    assert report["machine"]["device"] and "LOWER BOUND" in text
    for r in report["rows"]:
        assert abs(r["error %"]) <= 5, r  # issue 24's target, checkpointing and offload too
    assert {"tiny: train 64 px, batch 1, checkpointing", "tiny: train 64 px, batch 1, VAE offload",
            "tiny: SR 1 x 64x64 px x4, VAE tiled"} <= {r["case"] for r in report["rows"]}
    plans = {p["setup"].split(",")[0]: p for p in report["plans"]}
    ours, release = plans["tiny: ours"], plans["tiny: release"]
    # The release holds a second transformer copy; the same step otherwise.
    assert release["weights GiB"] > ours["weights GiB"]
    for plan in report["plans"]:
        parts = (plan["weights GiB"] + plan["grads + optimiser GiB"]
                 + plan["activations + temp GiB"])
        assert parts == pytest.approx(plan["peak GiB"]) and plan["TFLOP / sample"] > 0
    assert [f["setup"] for f in report["floors"]] == [p["setup"] for p in report["plans"]]
    assert all(v > 0 for f in report["floors"] for k, v in f.items() if k != "setup")
    # Docs tables at most 6 columns wide (tests/test_docs.py checks them at 1280 px).
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.count("|") - 1 <= 6, line


def fake_plan(calls: list[str], name: str, stop: bool = False, host: int = 0):
    def make():
        calls.append(name)
        if stop:
            raise KeyboardInterrupt  # the run stopped while tracing this row
        return SimpleNamespace(peak={"Total": GIB, "Parameter": GIB / 2}, flops=1e12,
                               min_bytes=GIB, host=host)
    return make


def test_a_stopped_run_goes_on_where_it_was(tmp_path, monkeypatch):
    """Traced rows are kept as they finish: a second run traces only the rows left, and only
    rows whose code is unchanged are kept."""
    import benchmarks.memory_plan as mp

    calls: list[str] = []
    monkeypatch.setattr(mp, "CASES", [("tiny", "train", None)])
    monkeypatch.setattr(mp, "row", lambda *case: {"model": "tiny", "predicted MiB": 1})
    monkeypatch.setattr(mp, "plans", lambda quick: [
        ("a", 1, fake_plan(calls, "a")), ("b", 1, fake_plan(calls, "b", stop=True))])
    with pytest.raises(KeyboardInterrupt):
        mp.main(["--quick", "--out", str(tmp_path)])
    assert calls == ["a", "b"] and not (tmp_path / "memory_plan.json").exists()
    kept = json.loads((tmp_path / mp.PARTIAL).read_text())
    assert list(kept) == ["a"] and "benchmarks/memory_plan.py" in kept["a"]["sources"]

    monkeypatch.setattr(mp, "plans", lambda quick: [
        ("a", 1, fake_plan(calls, "a")), ("b", 1, fake_plan(calls, "b"))])
    mp.main(["--quick", "--out", str(tmp_path)])
    assert calls == ["a", "b", "b"] and not (tmp_path / mp.PARTIAL).exists()
    report = json.loads((tmp_path / "memory_plan.json").read_text())
    assert [p["setup"] for p in report["plans"]] == ["a", "b"]
    assert report["plans"][0]["peak GiB"] == 1 and set(report["trace_seconds"]) == {"a", "b"}

    # A row whose code changed since it was traced is traced again.
    (tmp_path / mp.PARTIAL).write_text(json.dumps({"a": {**kept["a"], "digest": "stale"}}))
    mp.main(["--quick", "--out", str(tmp_path)])
    assert calls == ["a", "b", "b", "a", "b"]

    # A source file edited while a run traces is hashed as it is now, not as it ran: not kept.
    monkeypatch.setattr(mp, "STARTED", 0.0)  # every file is newer than the run's start
    monkeypatch.setattr(mp, "plans", lambda quick: [
        ("a", 1, fake_plan(calls, "a")), ("b", 1, fake_plan(calls, "b", stop=True))])
    with pytest.raises(KeyboardInterrupt):
        mp.main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / mp.PARTIAL).read_text()) == {}


def test_only_traces_the_rows_it_names_and_takes_the_others_from_the_report(tmp_path,
                                                                              monkeypatch):
    import benchmarks.memory_plan as mp
    from scoredistill.cli import UserError

    calls: list[str] = []
    monkeypatch.setattr(mp, "CASES", [("tiny", "train", None)])
    monkeypatch.setattr(mp, "row", lambda *case: {"model": "tiny", "predicted MiB": 1})
    monkeypatch.setattr(mp, "plans", lambda quick: [
        ("train a", 1, fake_plan(calls, "train a")),
        ("SR b", 1, fake_plan(calls, "SR b", host=3 * GIB))])
    with pytest.raises(UserError, match=r"memory_plan\.json, which is not there"):
        mp.main(["--quick", "--out", str(tmp_path), "--only", "SR"])
    mp.main(["--quick", "--out", str(tmp_path)])
    first = json.loads((tmp_path / "memory_plan.json").read_text())
    assert calls == ["train a", "SR b"] and "Traced over several runs" not in (
        tmp_path / "memory_plan.md").read_text()

    # A row new since the report ("train c") is traced too.
    monkeypatch.setattr(mp.KeptRows, "__init__", _dated(mp.KeptRows.__init__, "later"))
    monkeypatch.setattr(mp, "plans", lambda quick: [
        ("train a", 1, fake_plan(calls, "train a")),
        ("SR b", 1, fake_plan(calls, "SR b", host=3 * GIB)),
        ("train c", 1, fake_plan(calls, "train c"))])
    mp.main(["--quick", "--out", str(tmp_path), "--only", "SR"])
    assert calls == ["train a", "SR b", "SR b", "train c"]
    report = json.loads((tmp_path / "memory_plan.json").read_text())
    assert report["plans"][:2] == first["plans"] and report["floors"][:2] == first["floors"]
    assert report["traced"] == {"train a": first["traced"]["train a"], "SR b": "later",
                                "train c": "later"}
    md = (tmp_path / "memory_plan.md").read_text()
    assert f"1 row on {first['traced']['train a']}; 2 rows on later" in md
    # The host memory of the SR row, in a table of its own (the docs' tables: <= 6 columns).
    assert "#### Host memory beside the card's" in md and "| SR b | 1 | 3 |" in md
    with pytest.raises(UserError, match="matches no plan row"):
        mp.main(["--quick", "--out", str(tmp_path), "--only", "FLUX"])
    assert calls == ["train a", "SR b", "SR b", "train c"]


def _dated(init, date: str):
    def dated(self, out):
        init(self, out)
        self.date = date
    return dated


def test_the_digest_follows_the_sources_it_names(tmp_path, monkeypatch):
    import benchmarks.memory_plan as mp

    assert {"benchmarks/memory_plan.py", "scoredistill/memory/steps.py"} <= set(
        mp.project_sources())
    monkeypatch.setattr(mp, "ROOT", tmp_path)
    (tmp_path / "m.py").write_text("x = 1\n")
    before = mp.digest(["m.py"])
    assert mp.digest(["m.py"]) == before
    (tmp_path / "m.py").write_text("x = 2\n")
    assert mp.digest(["m.py"]) != before
    (tmp_path / "m.py").unlink()
    assert mp.digest(["m.py"]) != before


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# A run with one --jobs worker busy for ten minutes; it prints the worker's pid once started.
BUSY_RUN = """
import os, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from benchmarks.memory_plan import start_worker
with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=start_worker,
                         initargs=(os.getpid(),)) as pool:
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 600).result()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_run_leaves_no_worker_tracing():
    """--jobs: a run killed with SIGTERM (no Python cleanup runs) takes a busy worker with it;
    without that, the worker would finish its row (minutes at real sizes) and the next queued."""
    root = Path(__file__).resolve().parents[2]
    run = subprocess.Popen([sys.executable, "-c", BUSY_RUN], cwd=root, stdout=subprocess.PIPE,
                           text=True)
    try:
        worker = int(run.stdout.readline())
        assert _alive(worker)
        run.send_signal(signal.SIGTERM)
        run.wait(30)
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        run.kill()
