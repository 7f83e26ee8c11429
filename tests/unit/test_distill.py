"""The distillation trainer's pieces on every registered family: fake-score loss, LoRA real score, configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossdistill.config import from_dict, to_dict
from crossdistill.errors import ConfigError
from crossdistill.losses.dm import capture_features, fake_score_loss, feature_module, run_to
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


def test_run_to_keeps_the_gan_features_and_skips_what_follows(space):
    """The GAN passes stop the fake score at its feature block: the features, and the gradients they send to the
    input and to every weight before the block, are the whole forward's bit for bit; nothing after the block runs;
    the backbone gets its own modules back."""
    from contextlib import nullcontext

    den = space.denoiser
    backbone = den.backbone
    block = feature_module(backbone)
    children = dict(backbone.named_children())
    if getattr(backbone, "mid_block", None) is block:
        later = [*backbone.up_blocks, backbone.conv_out]
    else:
        k = list(backbone.transformer_blocks).index(block)
        later = [*list(backbone.transformer_blocks)[k + 1 :], *getattr(backbone, "single_transformer_blocks", [])]
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in later]
    trainable = {p: p.requires_grad for p in backbone.parameters()}
    backbone.requires_grad_(True)
    x0, eps, t, cond = _inputs(space)

    def features(stop: bool):
        calls.clear()
        backbone.zero_grad(set_to_none=True)
        x = den.noise(x0, t, eps).clone().requires_grad_(True)
        with capture_features(block) as feats, run_to(backbone, block) if stop else nullcontext():
            den.raw(x, t, cond)
        feats[-1].float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
        return feats[-1].detach(), x.grad, grads, len(calls)

    try:
        full, stopped = features(False), features(True)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        backbone.zero_grad(set_to_none=True)
    assert torch.equal(full[0], stopped[0]) and torch.equal(full[1], stopped[1])
    assert full[2].keys() == stopped[2].keys() and full[2]  # the same weights get gradients, and some do
    assert all(torch.equal(full[2][n], stopped[2][n]) for n in full[2])
    assert full[3] == len(later) and stopped[3] == 0  # what follows the block ran in the whole forward only
    assert dict(backbone.named_children()) == children  # put back, the same module objects
    with pytest.raises(ValueError, match="neither a transformer block nor the mid block"):
        with run_to(backbone, nn.Linear(1, 1)):
            pass


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
