"""The distillation trainer's pieces on every registered family: fake-score loss, LoRA real score, configs."""

from __future__ import annotations

import pytest
import torch

from crossdistill.config import from_dict, to_dict
from crossdistill.errors import ConfigError
from crossdistill.losses.dm import fake_score_loss
from crossdistill.models.registry import family_names, get_family
from crossdistill.train.distill import DistillConfig, adapters_disabled, add_lora, check_config
from crossdistill.train.presets import PRESETS

EXPECTED_PARAMETERISATION = {"sd15": "eps", "sdxl": "eps", "sd3": "flow", "flux": "flow"}


def _inputs(space, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, *space.latent_shape, generator=gen)
    eps = torch.randn(2, *space.latent_shape, generator=gen)
    t = torch.tensor([0.3, 0.8])
    cond = space.encode_prompts(["a red cat", "a blue dog"])
    return x0, eps, t, cond


@pytest.fixture(scope="module", params=family_names())
def space(request):
    return get_family(request.param).tiny(seed=0)


def test_fake_score_loss_regresses_the_family_target(space):
    """The loss is the MSE to the family's own target (eps / flow velocity), computed here from first principles."""
    den = space.denoiser
    assert den.parameterisation == EXPECTED_PARAMETERISATION[space.family]
    x0, eps, t, cond = _inputs(space)
    a, s = (c.view(-1, 1, 1, 1) for c in den.alpha_sigma(t))
    if den.parameterisation == "flow":
        torch.testing.assert_close(a, 1 - s)  # rectified flow: x_t = (1 - σ) x0 + σ ε
        target = eps - x0
    else:
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))  # variance preserving
        target = eps if den.parameterisation == "eps" else a * eps - s * x0
    x_t = a * x0 + s * eps
    x0_leaf = x0.clone().requires_grad_(True)
    with torch.no_grad():
        expected = (den.raw(x_t, t, cond) - target).pow(2).mean()
        # The target is what the x0 contract inverts: a perfect network output maps back to x0 exactly.
        torch.testing.assert_close(den.to_x0(target, x_t, t), x0, rtol=1e-4, atol=1e-4)
    loss = fake_score_loss(den, x0_leaf, cond, t, eps)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert x0_leaf.grad is None  # sg(ẑ_t): the fake score never pushes on the generator


def test_lora_fake_score_leaves_real_score_bit_identical(space):
    den = space.denoiser
    x_t, _, t, cond = _inputs(space, seed=1)
    with torch.no_grad():
        before = den.denoise(x_t, t, cond)
    add_lora(den.backbone, rank=4)
    lora = [p for n, p in den.backbone.named_parameters() if "lora_B" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in den.backbone.named_parameters() if "lora" not in n)
    with torch.no_grad():
        for p in lora:
            p.normal_(std=0.5)  # make the adapter matter (it starts at zero)
        fake = den.denoise(x_t, t, cond)
        with adapters_disabled(den.backbone):
            real = den.denoise(x_t, t, cond)
        again = den.denoise(x_t, t, cond)
    assert torch.equal(real, before)
    assert not torch.allclose(fake, before)
    assert torch.equal(again, fake)  # the adapter is back on after the block


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = PRESETS[name]()
    assert from_dict(DistillConfig, to_dict(cfg)) == cfg


def test_config_refuses_inconsistent_options():
    cfg = PRESETS["emoji"]()
    with pytest.raises(ConfigError, match="bridge_path"):
        check_config(cfg)  # a trainable Bridge kind without a trained Bridge
    cfg = PRESETS["emoji_shared"]()
    check_config(cfg)
    cfg.train.gan_weight = 1e-3
    with pytest.raises(ConfigError, match="real images"):
        check_config(cfg)
    cfg = PRESETS["emoji_shared"]()
    cfg.train.t_min = 0.9
    cfg.train.t_max = 0.5
    with pytest.raises(ConfigError, match="t_min"):
        check_config(cfg)
