"""The benchmarks' shared report writer."""

from __future__ import annotations

import json

from benchmarks.report import command_line, write_report


def test_command_line_keeps_the_arguments_that_change_numbers_and_drops_out():
    argv = ["--config", "sd3-medium", "--out", "/tmp/x", "--repeats", "6", "--out=/tmp/y"]
    assert (command_line("benchmarks.inference", argv)
            == "python -m benchmarks.inference --config sd3-medium --repeats 6")
    assert command_line("benchmarks.x", ["--note", "a b"]) == "python -m benchmarks.x --note 'a b'"


def test_report_names_machine_and_command_and_replaces_files_whole(tmp_path):
    rows = [{"variant": "a", "ms": 1.5}]
    write_report("r", "Title", rows, out_dir=tmp_path, command="python -m benchmarks.r", echo=False)
    write_report("r", "Title", rows * 2, out_dir=tmp_path, echo=False)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"] == rows * 2 and data["command"] is None and data["machine"]["device"]
    table = (tmp_path / "r.md").read_text()
    assert table.count("| a |") == 2 and "by `" not in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_pending_table_marks_every_row_and_measures_nothing(tmp_path):
    from benchmarks.report import write_pending

    write_pending("p", "Title", [{"way": "a"}, {"way": "b"}], awaiting="a GPU",
                  fill="bash x.sh", columns=["way", "s", "note"], out_dir=tmp_path)
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["pending"] is True and "machine" not in data
    assert [r["note"] for r in data["rows"]] == ["awaiting a GPU"] * 2
    table = (tmp_path / "p.md").read_text()
    assert "Not measured yet" in table and "Measured on" not in table
    assert "| a |  | awaiting a GPU |" in table
