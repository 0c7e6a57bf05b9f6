"""Fixtures: tiny SD3 / UNet models and LoRA roles on one tiny SD3 transformer."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tiny_models import randomize_lora, small_config, tiny_sd3_transformer, tiny_unet

from scoredistill.adapters import SD3ScoreModel, UNetScoreModel, lora_roles


@pytest.fixture
def sd3_transformer():
    return tiny_sd3_transformer()


@pytest.fixture
def roles(sd3_transformer):
    """Student, teacher and fake roles on one tiny SD3 transformer, adapters randomised."""
    out = lora_roles(SD3ScoreModel(sd3_transformer), student=small_config("student"),
                     fake=small_config("fake"))
    randomize_lora(sd3_transformer, "student", seed=2)
    randomize_lora(sd3_transformer, "fake", seed=3)
    return out


@pytest.fixture
def unet_model() -> UNetScoreModel:
    config = {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    return UNetScoreModel.from_scheduler_config(tiny_unet(), config)

