"""Attention capture reads the model's real attention: checked against diffusers' explicit-probability processor."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from crossdistill.models import get_family

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _inputs(space, prompts=("a red cat", "a blue dog")):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(len(prompts), *space.latent_shape, generator=g)
    return x_t, torch.full((len(prompts),), 0.6), space.encode_prompts(list(prompts))


def test_unet_maps_equal_the_probabilities_diffusers_computes():
    space = get_family("sd15").tiny(0)
    d = space.denoiser
    x_t, t, cond = _inputs(space)
    name = d.attention_layers()[0]
    with d.capture_attention([name]) as maps:
        d.denoise(x_t, t, cond)
    # diffusers' classic processor materialises softmax(q kᵀ · scale) as [B·heads, N_img, N_txt].
    attn = d.model.get_submodule(name)
    stock, seen = attn.processor, {}
    scores = attn.get_attention_scores
    attn.get_attention_scores = lambda *a, **k: seen.setdefault("p", scores(*a, **k))
    attn.set_processor(AttnProcessor())
    try:
        d.denoise(x_t, t, cond)
    finally:
        attn.set_processor(stock)
        del attn.get_attention_scores
    reference = seen["p"].view(maps[name].shape)
    torch.testing.assert_close(maps[name], reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "n_image", "n_text"),
    [("sd3", 16, 32), ("flux", 16, 12)],  # token counts differ, so a swapped [image, text] order would show
)
def test_joint_attention_maps_take_image_queries_and_text_keys(family, n_image, n_text):
    space = get_family(family).tiny(0)
    d = space.denoiser
    x_t, t, cond = _inputs(space)
    assert cond.tensors["encoder_hidden_states"].shape[1] == n_text
    with d.capture_attention() as maps:
        d.denoise(x_t, t, cond)
    for m in maps.values():
        assert m.shape == (2, 2, n_image, n_text)
    # Different prompts attend differently.
    first = maps[d.attention_layers()[0]]
    assert not torch.allclose(first[0], first[1])


def test_maps_are_float32_for_a_bf16_model_and_output_unchanged():
    space = get_family("sd3").tiny(0).to(torch.bfloat16)
    d = space.denoiser
    x_t, t, cond = _inputs(space)
    plain = d.denoise(x_t, t, cond)
    with d.capture_attention() as maps:
        assert torch.equal(d.denoise(x_t, t, cond), plain)
    m = next(iter(maps.values()))
    assert m.dtype == torch.float32
    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
