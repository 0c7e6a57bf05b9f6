"""train.py's command line over TrainConfig (jsonargparse): every field is a flag with nothing
else to write, the precedence holds wherever ``--config`` stands, and every mistake is one line."""

import dataclasses
import json
from typing import Literal

import pytest

from examples.tsdsr.train import main
from examples.tsdsr.training.config import TrainConfig, build_parser, parse_config


def test_every_field_is_a_flag_spelled_with_dashes():
    options = {s for a in build_parser()._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in options, flag
        if f.type in (bool, "bool") and f.name != "tiny":  # --tiny is the preset
            assert "--no-" + flag[2:] in options, flag


def test_a_new_field_needs_nothing_else():
    """A field added to the dataclass, of any type jsonargparse reads, is a flag as it stands."""

    @dataclasses.dataclass
    class Extended(TrainConfig):
        offload: bool = False
        optimiser_bits: int = 32
        optimiser: Literal["adamw", "adamw8bit"] = "adamw"
        preset_file: str | None = None
        buckets: tuple[int, ...] = (1, 2)

    given = build_parser(Extended).parse_args(
        ["--offload", "--optimiser-bits", "8", "--optimiser", "adamw8bit", "--preset-file",
         "p.yaml", "--buckets", "3", "4", "5", "--lr", "1e-5"], defaults=False).as_dict()
    assert given == {"offload": True, "optimiser_bits": 8, "optimiser": "adamw8bit",
                     "preset_file": "p.yaml", "buckets": [3, 4, 5], "lr": 1e-5}
    assert not build_parser(Extended).parse_args(["--no-offload"], defaults=False).offload
    assert Extended(**{**given, "buckets": (3, 4, 5)}).optimiser == "adamw8bit"  # checked
    with pytest.raises(ValueError, match="optimiser must be one of adamw, adamw8bit, got sgd"):
        Extended(optimiser="sgd")


def test_flags_beat_the_file_wherever_config_stands(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-5\nresolution: 128\n")  # YAML 1.1 reads 1e-5 as a string: not here
    for argv in (["--lr", "2e-4", "--config", str(path)], ["--config", str(path), "--lr", "2e-4"]):
        c = parse_config([*argv, "--tiny"])
        assert (c.lr, c.resolution, c.tiny) == (2e-4, 128, True)
    assert parse_config(["--config", str(path)]).lr == 1e-5
    assert parse_config(["--dasm-weights", "1", "0.5", "--dasm-points", "2"]).dasm_weights == (
        1.0, 0.5)


BAD_FLAGS = [
    (["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--batch-size", "two"], "argument --batch-size: 'two' is not an integer"),
    (["--dasm-weights", "1", "-1"], "argument --dasm-weights: must be a finite number >= 0"),
    (["--index-high", "1001"], "argument --index-high: must be a finite number >= 1 and <= 1000"),
    (["--jpeg-codec", "pillow"], "argument --jpeg-codec: invalid choice: 'pillow'"),
    (["--hflip", "false"], "unrecognized arguments: false"),
    (["--hq_dir", "x"], "unrecognized arguments: --hq_dir x"),
    (["--batch", "2"], "unrecognized arguments: --batch 2"),
    (["--config"], "argument --config: expected one argument"),
]


@pytest.mark.parametrize(("argv", "words"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("train: error: "), captured.err
    assert words.lower() in captured.err.lower(), captured.err  # jsonargparse 4.32: "Unrecognized"


BAD_FILES = [
    ("run.yaml", "batch_sise: 4\n", "unknown key(s) batch_sise (did you mean batch_size?)"),
    ("run.yaml", "batch_size: two\n", "batch_size must be an integer, got two"),
    ("run.yaml", "batch_size: 0\n", "batch_size must be a finite number >= 1, got 0"),
    ("run.yaml", "dasm_bias: 3\n", "dasm_bias must be a list, got 3"),
    ("run.yaml", "- lr\n", "expected a mapping of TrainConfig fields, got a list"),
    ("run.yaml", "lr: 1e-5\n  max_steps: [\n", "not valid YAML: mapping values"),
    ("run.json", '{"lr": 1e-4', "not valid JSON"),
    ("run.toml", "lr = 1e-5\n", "config files are .json, .yaml or .yml"),
]


@pytest.mark.parametrize(("name", "text", "words"), BAD_FILES,
                         ids=[w.split(" ")[0] for *_, w in BAD_FILES])
def test_a_bad_file_is_one_line_naming_it(name, text, words, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"train: error: --config {path}: "), err
    assert words in err, err


def test_the_resolved_config_reruns(tmp_path):
    """A run's config.json (save_config) read back with --config gives the same config."""
    from examples.tsdsr.training.config import save_config

    config = parse_config(["--tiny", "--dasm-bias", "-10", "10", "--no-hflip"])
    save_config(config, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["dasm_bias"] == [-10, 10]
    assert parse_config(["--config", str(tmp_path / "config.json")]) == config
