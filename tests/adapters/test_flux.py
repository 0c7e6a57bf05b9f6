"""FLUX.1: packing, position ids and guidance as diffusers' FluxPipeline does them; its schedule."""

from __future__ import annotations

import math

import pytest
import torch
from families import SCHNELL
from tiny_models import FLUX_LATENT, flux_cond, tiny_flux_transformer

from scoredistill import ddim_step, resolution_shift
from scoredistill.adapters import FluxScoreModel
from scoredistill.parametrization import expand_like

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift  # noqa: E402

FLUX_DEV_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift": 3.0}


def pipeline_call(module, x, t, cond):
    """The transformer call of FluxPipeline's denoising loop, with its own helpers."""
    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    out = module(hidden_states=packed, timestep=t / 1000, guidance=cond.get("guidance"),
                 pooled_projections=cond["pooled_projections"],
                 encoder_hidden_states=cond["prompt_embeds"],
                 txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3), img_ids=ids,
                 return_dict=False)[0]
    # _unpack_latents takes pixel sizes and the VAE factor: latent size * 8 with factor 8.
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


@pytest.mark.parametrize("guidance", [3.5, None])
def test_equals_flux_pipeline_transformer_call(guidance):
    module = tiny_flux_transformer(guidance_embeds=guidance is not None)
    model = FluxScoreModel.for_resolution(module, 8, 8, None if guidance else SCHNELL)
    x = torch.randn(2, *FLUX_LATENT, generator=torch.Generator().manual_seed(0))
    cond = flux_cond(2, guidance=guidance)
    if guidance is not None:
        cond["guidance"] = torch.tensor([3.5, 5.0])  # per-sample guidance travels with the cond
    t = model.schedule.timesteps(torch.tensor([100, 700]))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), pipeline_call(module, x, t, cond))


@pytest.mark.parametrize("size", [(8, 8), (64, 96), (128, 128), (256, 256)])
def test_schedule_is_flux_dynamic_shift(size):
    h, w = size
    seq = (h // 2) * (w // 2)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert resolution_shift(seq) == pytest.approx(math.exp(mu), rel=1e-12)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    sched.set_timesteps(num_inference_steps=1000, mu=mu)
    schedule = FluxScoreModel.for_resolution(None, h, w, FLUX_DEV_SCHEDULER).schedule
    index = torch.arange(1000)
    torch.testing.assert_close(schedule.sigmas(index), sched.sigmas[:-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schedule.timesteps(index), sched.timesteps, rtol=1e-5, atol=1e-4)


def test_schnell_schedule_is_the_unshifted_table():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**SCHNELL)
    schedule = FluxScoreModel.for_resolution(None, 128, 128, SCHNELL).schedule
    torch.testing.assert_close(schedule.sigmas(torch.arange(1000)), sched.sigmas)


def test_ddim_step_equals_the_scheduler_step():
    # The model's t, the schedule and the flow parametrisation agree with FlowMatch's Euler step.
    module = tiny_flux_transformer()
    model = FluxScoreModel.for_resolution(module, 8, 8)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    sched.set_timesteps(num_inference_steps=1000, mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    x = torch.randn(1, *FLUX_LATENT, generator=torch.Generator().manual_seed(1))
    i = torch.tensor([400])
    t = model.schedule.timesteps(i)
    with torch.no_grad():
        v = model(x, t, flux_cond(1))
    a, s = (expand_like(c, x) for c in model.schedule.alpha_sigma(t))
    t1 = model.schedule.timesteps(i + 1)
    a1, s1 = (expand_like(c, x) for c in model.schedule.alpha_sigma(t1))
    sched.set_begin_index(400)
    want = sched.step(v, sched.timesteps[400], x, return_dict=False)[0]
    torch.testing.assert_close(ddim_step(x, v, "flow", a, s, a1, s1), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    dev = FluxScoreModel.for_resolution(tiny_flux_transformer(), 8, 8)
    x, t = torch.randn(1, *FLUX_LATENT), torch.tensor([500.0])
    with pytest.raises(ValueError, match="guidance"):
        dev(x, t, flux_cond(1, guidance=None))
    with pytest.raises(ValueError, match="even"):
        dev(torch.randn(1, 4, 7, 8), t, flux_cond(1))
    with pytest.raises(ValueError, match="prompt_embeds"):
        dev(x, t, (torch.randn(1, 5, 32), torch.randn(1, 32)))
    schnell = FluxScoreModel.for_resolution(tiny_flux_transformer(False), 8, 8, SCHNELL)
    with pytest.raises(ValueError, match="schnell"):
        schnell(x, t, flux_cond(1))


def test_latents_of_another_size_than_the_schedules_are_refused():
    # Built for 8x8 latents (16 tokens, shift 1.23); 32x32 latents (256 tokens) need shift 1.65.
    model = FluxScoreModel.for_resolution(tiny_flux_transformer(), 8, 8)
    t = torch.tensor([500.0])
    with pytest.raises(ValueError, match=r"built for 8x8 latents .* got 32x32 latents") as err:
        model(torch.randn(1, 4, 32, 32), t, flux_cond(1))
    assert "for_resolution(transformer, 32, 32" in str(err.value)
    with torch.no_grad():  # the same token count has the same shift: accepted
        assert model(torch.randn(1, 4, 4, 16), t, flux_cond(1)).shape == (1, 4, 4, 16)
    # A fixed shift (schnell) does not depend on the size.
    schnell = FluxScoreModel.for_resolution(tiny_flux_transformer(False), 8, 8, SCHNELL)
    with torch.no_grad():
        schnell(torch.randn(1, 4, 16, 16), t, flux_cond(1, guidance=None))
