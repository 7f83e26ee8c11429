"""Each family's time → noise-level map and network inputs, checked against diffusers' own schedulers/pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from crossdistill.models import get_family
from crossdistill.models.flux import flux_shift, image_ids, pack, unpack

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _record_backbone_kwargs(denoiser, monkeypatch) -> dict:
    """Replace the backbone's forward by one that records its inputs and returns zeros of the input shape."""
    seen: dict = {}

    def forward(*args, **kwargs):
        seen.update(kwargs, args=args)
        x = kwargs.get("hidden_states", args[0] if args else None)
        return (torch.zeros_like(x),)

    monkeypatch.setattr(denoiser.model, "forward", forward)
    return seen


def test_ddpm_schedule_matches_the_scheduler_at_integer_timesteps_and_interpolates_between():
    d = get_family("sd15").tiny(0).denoiser
    ac = d.scheduler.alphas_cumprod.double()
    k = torch.tensor([0, 1, 500, 998, 999])
    a, s = d.alpha_sigma(k / 999)
    torch.testing.assert_close(a.double(), ac[k].sqrt(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.double(), (1 - ac[k]).sqrt(), rtol=1e-6, atol=1e-7)
    a_mid, _ = d.alpha_sigma(torch.tensor([500.5 / 999]))
    torch.testing.assert_close(a_mid.double() ** 2, (ac[500:502].mean()).view(1), rtol=1e-6, atol=1e-8)


def test_ddpm_unet_gets_the_float_timestep_and_t1_is_999(monkeypatch):
    space = get_family("sd15").tiny(0)
    seen = _record_backbone_kwargs(space.denoiser, monkeypatch)
    cond = space.encode_prompts(["x", "y"])
    space.denoiser.raw(torch.zeros(2, *space.latent_shape), torch.tensor([1.0, 0.25]), cond)
    torch.testing.assert_close(seen["args"][1], torch.tensor([999.0, 249.75]))


def test_v_prediction_round_trips_and_matches_the_scheduler_velocity():
    d = get_family("sd15").tiny(0, prediction_type="v_prediction").denoiser
    assert d.parameterisation == "v"
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([400 / 999, 999 / 999])
    v = d.target(x0, eps, t)
    torch.testing.assert_close(v, d.scheduler.get_velocity(x0, eps, torch.tensor([400, 999])), rtol=1e-5, atol=1e-5)
    x_t = d.noise(x0, t, eps)
    torch.testing.assert_close(d.to_x0(v, x_t, t), x0, rtol=1e-4, atol=1e-4)


def test_sdxl_unet_gets_pooled_text_and_default_time_ids(monkeypatch):
    space = get_family("sdxl").tiny(0)
    seen = _record_backbone_kwargs(space.denoiser, monkeypatch)
    cond = space.encode_prompts(["x"])
    space.denoiser.raw(torch.zeros(1, *space.latent_shape), torch.tensor([0.5]), cond)
    added = seen["added_cond_kwargs"]
    assert added["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    assert torch.equal(added["text_embeds"], cond.tensors["pooled"])


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_sd3_sigma_is_the_shifted_time_and_timestep_is_sigma_x_1000(t, monkeypatch):
    space = get_family("sd3").tiny(0)
    d = space.denoiser
    sigma = 3.0 * t / (1 + 2.0 * t)
    a, s = d.alpha_sigma(torch.tensor([t]))
    torch.testing.assert_close(s, torch.tensor([sigma]))
    torch.testing.assert_close(a, torch.tensor([1 - sigma]))
    seen = _record_backbone_kwargs(d, monkeypatch)
    d.raw(torch.zeros(1, *space.latent_shape), torch.tensor([t]), space.encode_prompts(["x"]))
    torch.testing.assert_close(seen["timestep"], torch.tensor([sigma * 1000]))


def test_flow_shift_matches_the_diffusers_scheduler():
    """Our sigma(t) equals FlowMatchEulerDiscreteScheduler's sigmas for FluxPipeline's sigmas and mu."""
    d = get_family("flux").tiny(0).denoiser
    cfg = d.scheduler.config
    n, seq_len = 8, 16
    t = np.linspace(1.0, 1 / n, n)
    mu = np.log(flux_shift(cfg, seq_len))
    d.scheduler.set_timesteps(sigmas=t, mu=mu)
    torch.testing.assert_close(d.sigma(torch.tensor(t)), d.scheduler.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    # 1024 px FLUX-dev: 4096 tokens → mu = max_shift.
    assert flux_shift(cfg, 4096) == pytest.approx(np.exp(1.15))
    assert get_family("flux").tiny(0, guidance_embeds=False).denoiser.shift == 1.0


def test_flux_packing_and_ids_match_the_pipeline():
    x = torch.randn(2, 16, 8, 6)
    packed = pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    assert torch.equal(unpack(packed, 8, 6), x)
    assert torch.equal(image_ids(8, 6, "cpu"), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_flux_dev_puts_guidance_into_the_embedding_in_one_pass(monkeypatch):
    space = get_family("flux").tiny(0)
    d = space.denoiser
    calls = []
    seen = _record_backbone_kwargs(d, monkeypatch)
    forward = d.model.forward
    monkeypatch.setattr(d.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    x_t, t = torch.zeros(2, *space.latent_shape), torch.tensor([0.5, 0.5])
    d.denoise(x_t, t, space.encode_prompts(["x", "y"]), guidance_scale=3.5, uncond=space.null_prompt(2))
    assert len(calls) == 1
    torch.testing.assert_close(seen["guidance"], torch.tensor([3.5, 3.5]))
    torch.testing.assert_close(seen["timestep"], d.sigma(t))
    assert seen["txt_ids"].shape == (12, 3) and seen["img_ids"].shape == (16, 3)


def test_flux_schnell_uses_cfg_without_guidance_embedding(monkeypatch):
    space = get_family("flux").tiny(0, guidance_embeds=False)
    d = space.denoiser
    seen = _record_backbone_kwargs(d, monkeypatch)
    d.denoise(torch.zeros(1, *space.latent_shape), torch.tensor([0.5]), space.encode_prompts(["x"]), 2.0,
              space.null_prompt(1))  # fmt: skip
    assert seen["guidance"] is None and seen["hidden_states"].shape[0] == 2


def test_flow_time_samplers():
    d = get_family("sd3").tiny(0).denoiser
    g = torch.Generator().manual_seed(0)
    t = d.sample_time(20000, g)
    assert d.time_sampler == "logit_normal" and 0 < t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01 and t.std().item() < 0.25  # logit-normal(0, 1) clusters mid-way
    d.time_sampler = "uniform"
    assert abs(d.sample_time(20000, g).std().item() - (1 / 12) ** 0.5) < 0.01
    with pytest.raises(ValueError, match="time_sampler"):
        get_family("sd3").tiny(0, time_sampler="beta")


def test_schedule_survives_a_bf16_cast():
    d = get_family("sd15").tiny(0).denoiser
    a32, _ = d.alpha_sigma(torch.tensor([0.7]))
    d.to(torch.bfloat16)
    a16, _ = d.alpha_sigma(torch.tensor([0.7]))
    assert torch.equal(a32, a16)
