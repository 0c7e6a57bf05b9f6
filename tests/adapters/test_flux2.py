"""FLUX.2: tokens, 4-axis position ids, timestep and guidance as diffusers' Flux2Pipeline does
them; its step-dependent shift; the VAE side (2x2 patches, batch-norm statistics)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import FLUX2_LATENT, flux2_cond, tiny_flux2_transformer

from scoredistill import ddim_step, empirical_shift
from scoredistill.adapters import Flux2ScoreModel, flux2_latents, flux2_vae_latents
from scoredistill.parametrization import expand_like

flux2 = pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2",
                            reason="diffusers before 0.36 has no FLUX.2")
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler  # noqa: E402

Flux2Pipeline, compute_empirical_mu = flux2.Flux2Pipeline, flux2.compute_empirical_mu
# What decides the pipeline's sigmas: dynamic shifting with the mu it passes, exponential shift.
DYNAMIC = {"use_dynamic_shifting": True, "time_shift_type": "exponential"}
H, W = FLUX2_LATENT[1:]


def pipeline_call(module, x, t, cond):
    """The transformer call of Flux2Pipeline's denoising loop, with its own helpers."""
    latents, latent_ids = Flux2Pipeline._pack_latents(x), Flux2Pipeline._prepare_latent_ids(x)
    out = module(hidden_states=latents, timestep=t / 1000, guidance=cond.get("guidance"),
                 encoder_hidden_states=cond["prompt_embeds"],
                 txt_ids=Flux2Pipeline._prepare_text_ids(cond["prompt_embeds"]),
                 img_ids=latent_ids, return_dict=False)[0]
    return Flux2Pipeline._unpack_latents_with_ids(out[:, :latents.size(1)], latent_ids)


def pipeline_scheduler(tokens: int, steps: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler as Flux2Pipeline sets it: sigmas linspace(1, 1/n, n), empirical mu."""
    sched = FlowMatchEulerDiscreteScheduler(**DYNAMIC)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                        mu=compute_empirical_mu(image_seq_len=tokens, num_steps=steps))
    return sched


@pytest.mark.parametrize("guidance", [4.0, None])
def test_equals_flux2_pipeline_transformer_call(guidance):
    module = tiny_flux2_transformer(guidance_embeds=guidance is not None)
    model = Flux2ScoreModel.for_resolution(module, H, W)
    x = torch.randn(2, *FLUX2_LATENT, generator=torch.Generator().manual_seed(0))
    cond = flux2_cond(2, guidance=guidance)
    if guidance is not None:
        cond["guidance"] = torch.tensor([4.0, 2.5])  # per-sample guidance travels with the cond
    t = model.schedule.timesteps(torch.tensor([100, 700]))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), pipeline_call(module, x, t, cond))


@pytest.mark.parametrize("steps", [4, 50])
@pytest.mark.parametrize("size", [(4, 6), (32, 32), (64, 64), (96, 96)])  # 96 x 96 > 4300 tokens
def test_schedule_is_flux2_pipeline_shift(size, steps):
    tokens = size[0] * size[1]
    mu = compute_empirical_mu(image_seq_len=tokens, num_steps=steps)
    assert empirical_shift(tokens, steps) == pytest.approx(math.exp(mu), rel=1e-12)
    sched = pipeline_scheduler(tokens, steps)
    schedule = Flux2ScoreModel.for_resolution(None, *size, num_inference_steps=steps).schedule
    index = torch.arange(0, 1000, 1000 // steps)  # the pipeline's n sigmas on our 1000-step table
    torch.testing.assert_close(schedule.sigmas(index), sched.sigmas[:-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schedule.timesteps(index), sched.timesteps, rtol=1e-5, atol=1e-4)


def test_one_step_equals_the_pipeline_denoising_step():
    # The pipeline's transformer call and Euler step = our model and ddim_step on our schedule.
    module = tiny_flux2_transformer()
    model = Flux2ScoreModel.for_resolution(module, H, W, num_inference_steps=4)
    sched = pipeline_scheduler(H * W, 4)
    x = torch.randn(1, *FLUX2_LATENT, generator=torch.Generator().manual_seed(1))
    cond, i = flux2_cond(1), torch.tensor([250])
    t, t1 = model.schedule.timesteps(i), model.schedule.timesteps(i + 250)
    sched.set_begin_index(1)
    with torch.no_grad():
        want = sched.step(pipeline_call(module, x, sched.timesteps[1:2], cond),
                          sched.timesteps[1], x, return_dict=False)[0]
        v = model(x, t, cond)
    a, s = (expand_like(c, x) for c in model.schedule.alpha_sigma(t))
    a1, s1 = (expand_like(c, x) for c in model.schedule.alpha_sigma(t1))
    torch.testing.assert_close(ddim_step(x, v, "flow", a, s, a1, s1), want, rtol=1e-5, atol=1e-5)


def test_fixed_shift_config_and_unsupported_time_shift():
    fixed = Flux2ScoreModel.for_resolution(None, 64, 64, scheduler_config={"shift": 2.0})
    assert fixed.schedule.shift == 2.0
    with pytest.raises(ValueError, match="time_shift_type"):
        Flux2ScoreModel.for_resolution(None, 64, 64,
                                       scheduler_config={**DYNAMIC, "time_shift_type": "linear"})


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    """No downsampling, 4 latent channels: 2x2 patches give the tiny transformer's 16."""
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,), layers_per_block=1, latent_channels=4, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False).eval()
    with torch.no_grad():  # non-trivial running statistics, so the normalisation shows
        vae.bn.running_mean.copy_(torch.randn(16))
        vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    return vae


def test_vae_side_equals_the_pipeline_encoding_and_inverts():
    vae = tiny_flux2_vae()
    image = torch.rand(2, 3, 2 * H, 2 * W) * 2 - 1
    pipe = SimpleNamespace(vae=vae, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        want = Flux2Pipeline._encode_vae_image(pipe, image, generator=None)  # posterior mode
        raw = vae.encode(image).latent_dist.mode()
    latents = flux2_latents(vae, raw)
    assert latents.shape == (2, *FLUX2_LATENT)
    torch.testing.assert_close(latents, want)
    torch.testing.assert_close(flux2_vae_latents(vae, latents), raw, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    dev = Flux2ScoreModel.for_resolution(tiny_flux2_transformer(), H, W)
    x, t = torch.randn(1, *FLUX2_LATENT), torch.tensor([500.0])
    with pytest.raises(ValueError, match="guidance"):
        dev(x, t, flux2_cond(1, guidance=None))
    with pytest.raises(ValueError, match="pooled_projections"):  # a FLUX.1 condition
        dev(x, t, {**flux2_cond(1), "pooled_projections": torch.randn(1, 32)})
    with pytest.raises(ValueError, match="prompt_embeds"):
        dev(x, t, torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="flux2_latents"):  # raw 4-channel VAE latents
        dev(torch.randn(1, 4, 2 * H, 2 * W), t, flux2_cond(1))
    klein = Flux2ScoreModel.for_resolution(tiny_flux2_transformer(False), H, W)
    with pytest.raises(ValueError, match="klein"):
        klein(x, t, flux2_cond(1))


def test_latents_of_another_size_than_the_schedules_are_refused():
    model = Flux2ScoreModel.for_resolution(tiny_flux2_transformer(), H, W)  # 24 tokens
    t = torch.tensor([500.0])
    with pytest.raises(ValueError, match=rf"built for {H}x{W} latents .* got 8x8 latents"):
        model(torch.randn(1, FLUX2_LATENT[0], 8, 8), t, flux2_cond(1))
    with torch.no_grad():  # the same token count has the same shift: accepted
        assert model(torch.randn(1, FLUX2_LATENT[0], W, H), t, flux2_cond(1)).shape[-2:] == (W, H)
    fixed = Flux2ScoreModel.for_resolution(tiny_flux2_transformer(), H, W,
                                           scheduler_config={"shift": 2.0})
    with torch.no_grad():
        fixed(torch.randn(1, FLUX2_LATENT[0], 8, 8), t, flux2_cond(1))
