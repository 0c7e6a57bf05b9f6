"""The FLUX train-step benchmark's quick mode: runs, checks its gradients, writes its report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from benchmarks.train_step_flux import main


def test_quick_run_writes_calls_times_and_bytes(tmp_path):
    md = main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "train_step_flux.json").read_text())
    assert md == tmp_path / "train_step_flux.md" and "backbone calls" in md.read_text()
    shared, two = report["rows"]
    # One student call, one fused call per DASM point (N = 4), one fake-score call, either way.
    assert shared["backbone calls"] == two["backbone calls"] == 6
    assert shared["median s"] > 0 and two["median s"] > 0
    assert shared["params MiB"] < two["params MiB"]
    assert max(report["grad_rel_error"].values()) < 1e-3
    one, copies = report["resident_flux_dev"]
    assert 11.8e9 < report["param_counts"]["base params"] < 12.0e9  # FLUX.1-dev: 11.9 B
    assert copies["total GiB"] - one["total GiB"] == pytest.approx(one["base GiB"])


def test_lora_count_equals_peft_injection():
    from benchmarks.train_step_flux import lora_params
    from scoredistill.adapters import FLUX_TARGETS, add_lora, lora_config, lora_state_dict
    from tests.adapters.tiny_models import tiny_flux_transformer

    module = tiny_flux_transformer()
    want = {a: lora_params(module, getattr(FLUX_TARGETS, a), 4) for a in ("student", "fake")}
    for adapter in ("student", "fake"):
        add_lora(module, lora_config(getattr(FLUX_TARGETS, adapter), 4), adapter)
        assert sum(p.numel() for p in lora_state_dict(module, adapter).values()) == want[adapter]
