"""Every family's default LoRA targets name real layers of its backbone (tiny configs)."""

from __future__ import annotations

import re

import pytest
from families import FAMILIES
from tiny_models import matches
from torch import nn


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_every_target_hits_a_layer_and_only_layers(family_name):
    model = FAMILIES[family_name].build()
    targets = model.lora_targets
    excluded = re.compile(targets.exclude) if targets.exclude else None
    modules = {name: m for name, m in model.module.named_modules()
               if not (excluded and excluded.fullmatch(name))}
    for target in {*targets.student, *targets.fake}:
        hit = {name: m for name, m in modules.items() if matches(name, target)}
        assert hit, f"{family_name}: LoRA target {target!r} matches no module"
        wrong = [name for name, m in hit.items() if not isinstance(m, nn.Linear | nn.Conv2d)]
        assert not wrong, f"{family_name}: {target!r} hits layers peft cannot wrap: {wrong}"


def test_flux2_exclusion_keeps_the_single_stream_output_projection():
    model = FAMILIES["flux2-dev"].build()
    excluded = re.compile(model.lora_targets.exclude)
    names = [name for name, _ in model.module.named_modules() if name.endswith("attn.to_out")]
    assert {n for n in names if excluded.fullmatch(n)} == {"transformer_blocks.0.attn.to_out"}
    assert "single_transformer_blocks.0.attn.to_out" in names
