"""benchmarks.tiny_recipe: the quick run trains each variant and scores its student; the paired
verdicts name the better variant only where the seeds agree; the bicubic row matches an
independent scoring of the same pairs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lpips")
pytest.importorskip("kornia")
pytest.importorskip("skimage")

from benchmarks import tiny_recipe
from benchmarks.tiny_sr_headroom import demo_pairs, held_out_pairs, scores


def test_quick_run_trains_every_variant(tmp_path):
    tiny_recipe.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "tiny_recipe_spaces.json").read_text())
    assert (tmp_path / "tiny_recipe_spaces.md").is_file()
    variants = tiny_recipe.GROUPS["spaces"]
    assert [r["variant"] for r in report["rows"]] == ["bicubic (no model)", *variants]
    runs = report["runs"]
    assert set(runs) == set(variants) and all(len(v) == 1 for v in runs.values())
    for variant in runs.values():
        assert variant[0]["s/step"] > 0 and len(variant[0]["per image"]) == 1
    # The flag reaches the training: the two spaces' students differ after two steps.
    flow, eps = (runs[n][0] for n in ("TSD (flow)", "TSD (epsilon)"))
    assert any(flow[m] != eps[m] for m in tiny_recipe.METRICS)


def test_paired_verdicts_follow_the_seeds():
    base = [22.0, 22.3, 21.9, 22.1, 22.2]
    per_seed = {
        "TSD (flow)": [{"PSNR (Y)": p, "SSIM (Y)": 0.5, "grid dB": 0.3} for p in base],
        # 0.5 dB better on every seed; the grid measure is noise around the same mean.
        "TSD (epsilon)": [{"PSNR (Y)": p + 0.5 + 0.01 * k, "SSIM (Y)": 0.5,
                           "grid dB": 0.3 + (-1) ** k * 0.05} for k, p in enumerate(base)],
    }
    rows = {r["metric"]: r for r in tiny_recipe.paired_rows(per_seed)}
    assert rows["-PSNR (Y)"]["verdict"] == "TSD (epsilon) lower"  # negated: lower is better
    assert rows["-PSNR (Y)"]["mean A - B"] == pytest.approx(-0.52)
    assert rows["grid dB"]["verdict"] == "n.s."


def test_bicubic_row_matches_an_independent_scoring():
    pairs = demo_pairs(seed=0)[:3]
    row = tiny_recipe.bicubic_row(pairs)
    # The headroom benchmark scores the float bicubic; the row scores it rounded to 8 bits.
    psnr, ssim = scores(None, held_out_pairs(seed=0)[:3])
    assert float(row["PSNR (Y)"]) == pytest.approx(psnr, abs=0.02)
    assert float(row["SSIM (Y)"]) == pytest.approx(ssim, abs=0.002)


@pytest.mark.parametrize("group", tiny_recipe.GROUPS)
def test_every_variant_is_a_valid_recipe_config(group):
    from examples.tsdsr.training.config import parse_config

    configs = {name: parse_config(["--tiny", *flags])
               for name, flags in tiny_recipe.GROUPS[group].items()}
    assert configs[tiny_recipe.REFERENCE] == parse_config(["--tiny"])  # the recipe's default
    # No two variants train the same thing.
    assert len({repr(c) for c in configs.values()}) == len(configs)
