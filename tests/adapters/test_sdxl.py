"""SDXL: the ``text_time`` added conditioning travels in the condition dict."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sdxl_cond, tiny_sdxl_unet

from scoredistill.adapters import UNetScoreModel


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_equals_the_unet_call_with_added_cond_kwargs(prediction_type):
    unet = tiny_sdxl_unet()
    model = UNetScoreModel.from_scheduler_config(unet, {"prediction_type": prediction_type})
    assert model.prediction == {"epsilon": "epsilon", "v_prediction": "v"}[prediction_type]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([10.0, 900.0]), sdxl_cond(2)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": cond["text_embeds"],
                                       "time_ids": cond["time_ids"]}).sample
        got = model(x, t, cond)
        torch.testing.assert_close(got, want)
        # The size/crop ids do condition the output.
        other = {**cond, "time_ids": cond["time_ids"] + 16}
        assert not torch.allclose(model(x, t, other), got, atol=1e-4)


def test_a_condition_without_the_sdxl_keys_is_an_error():
    model = UNetScoreModel(tiny_sdxl_unet())
    cond = sdxl_cond(1)
    del cond["time_ids"]
    with pytest.raises(ValueError, match="time_ids"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), cond)
