"""SD3 latents, the one-step student forward, and the embedded tiny backbone."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("diffusers")

from scoredistill.adapters import SD3ScoreModel
from scoredistill.schedules import RectifiedFlow
from scoredistill.sr.latents import decode, encode, one_step


def image(h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_encode_subtracts_shift_then_scales(parts):
    vae, x = parts.vae, image()
    dist = vae.encode(x).latent_dist
    expected = (dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(encode(vae, x, posterior="mode"), expected)
    assert encode(vae, x, posterior="mode").shape == (1, 16, 4, 6)


@torch.no_grad()
def test_encode_sample_is_seeded_and_differs_from_mode(parts):
    vae, x = parts.vae, image()
    a = encode(vae, x, posterior="sample", generator=torch.Generator().manual_seed(1))
    b = encode(vae, x, posterior="sample", generator=torch.Generator().manual_seed(1))
    c = encode(vae, x, posterior="sample", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, encode(vae, x, posterior="mode"))
    with pytest.raises(ValueError, match="posterior"):
        encode(vae, x, posterior="mean")  # type: ignore[arg-type]


@torch.no_grad()
def test_decode_inverts_the_latent_transform_and_clamps(parts):
    vae = parts.vae
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0)) * 5
    raw = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    out = decode(vae, z)
    torch.testing.assert_close(out, raw.clamp(-1, 1))
    assert out.shape == (1, 3, 32, 48) and out.dtype == torch.float32


@dataclass(eq=False)
class ConstantVelocity:
    """A flow "student" returning ``2 x + 1`` and recording the timesteps it is called at."""

    prediction: str = "flow"
    schedule: RectifiedFlow = field(default_factory=RectifiedFlow)

    def __post_init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, x, t, cond):
        self.seen.append(t)
        return 2 * x + 1


def test_one_step_is_x0_at_t_1000():
    student, z = ConstantVelocity(), torch.randn(3, 16, 4, 4)
    z_hat = one_step(student, z, None)
    torch.testing.assert_close(z_hat, z - (2 * z + 1))  # sigma(1000) = 1
    assert torch.equal(student.seen[0], torch.full((3,), 1000.0))


def test_one_step_refuses_epsilon_at_pure_noise():
    # Flow's index 0 has alpha = 0: an epsilon prediction there determines no x0.
    with pytest.raises(ValueError, match="alpha = 0"):
        one_step(ConstantVelocity(prediction="epsilon"), torch.zeros(1, 16, 2, 2), None)


@torch.no_grad()
def test_one_step_on_the_tiny_sd3_transformer(parts):
    student, z = SD3ScoreModel(parts.transformer), torch.randn(2, 16, 8, 8)
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in parts.cond.items()}
    v = parts.transformer(hidden_states=z, timestep=torch.full((2,), 1000.0),
                          encoder_hidden_states=cond["prompt_embeds"],
                          pooled_projections=cond["pooled_projections"]).sample
    torch.testing.assert_close(one_step(student, z, cond), z - v)


@torch.no_grad()
def test_tiny_forward_is_fast(parts):
    student, x = SD3ScoreModel(parts.transformer), image(64, 64)
    decode(parts.vae, one_step(student, encode(parts.vae, x, posterior="mode"), parts.cond))
    start = time.perf_counter()
    decode(parts.vae, one_step(student, encode(parts.vae, x, posterior="mode"), parts.cond))
    assert time.perf_counter() - start < 1.0
