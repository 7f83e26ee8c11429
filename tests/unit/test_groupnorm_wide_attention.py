"""Per-channel GroupNorm statistics and the wide-head matmul attention compute what the stock modules compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from test_fast_path import reference_images, tiny_models
from torch import nn

from crossdistill.errors import ConfigError
from crossdistill.export.fast import FastPathOptions, OneStepRunner, inductor_options
from crossdistill.models import wide_attention
from crossdistill.models.groupnorm import (
    ChannelStatsGroupNorm,
    channel_stats_group_norm,
    disable_channel_stats_group_norm,
    enable_channel_stats_group_norm,
)
from crossdistill.models.wide_attention import (
    WideHeadMatmulAttnProcessor,
    disable_wide_head_matmul_attention,
    enable_wide_head_matmul_attention,
)

CPU = dict(dtype="float32", channels_last=False, compile=None, cuda_graphs=False)


@pytest.mark.parametrize("shape", [(2, 64, 16, 16), (1, 32, 5, 7), (2, 32, 50)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_channel_stats_equal_group_norm(shape, channels_last, affine):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 40  # a mean far from zero: the per-group combination is exact
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)) if affine else (
        None, None)  # fmt: skip
    out = channel_stats_group_norm(x, 8, w, b, 1e-6)
    ref = F.group_norm(x, 8, w, b, 1e-6)
    assert out.dtype == x.dtype and out.shape == x.shape
    # float64 in, statistics in float32: equal to float32 precision
    assert (out - ref).abs().max().item() < 5e-5


def test_channel_stats_keep_half_inputs_half_and_reject_bad_shapes():
    x = torch.randn(2, 32, 8, 8)
    out = channel_stats_group_norm(x.bfloat16(), 8, None, None, 1e-5)
    assert out.dtype == torch.bfloat16
    assert (out.float() - F.group_norm(x.bfloat16().float(), 8, eps=1e-5)).abs().max().item() < 0.05
    with pytest.raises(ValueError, match="divisible"):
        channel_stats_group_norm(torch.randn(1, 30, 4, 4), 8, None, None, 1e-5)


def test_channel_stats_module_swap_keeps_weights_outputs_and_gradients():
    torch.manual_seed(0)
    unet, vae = tiny_models()
    keys = {name: list(m.state_dict()) for name, m in (("unet", unet), ("vae", vae))}
    x = torch.randn(1, 4, 8, 8)
    ref = vae.decode(x).sample
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    n_norms = sum(type(m) is nn.GroupNorm for m in vae.modules())
    assert enable_channel_stats_group_norm(vae) == n_norms > 0
    assert enable_channel_stats_group_norm(unet) > 0
    assert not any(type(m) is nn.GroupNorm for m in (*vae.modules(), *unet.modules()))
    assert {name: list(m.state_dict()) for name, m in (("unet", unet), ("vae", vae))} == keys
    out = vae.decode(x).sample
    assert (out - ref).abs().max().item() < 1e-5
    out.sum().backward()
    for n, p in vae.named_parameters():
        if n in ref_grads:
            assert torch.allclose(p.grad, ref_grads[n], atol=1e-4, rtol=1e-3), n
    assert disable_channel_stats_group_norm(vae) == n_norms
    assert not any(isinstance(m, ChannelStatsGroupNorm) for m in vae.modules())


def vae_attention(width: int) -> Attention:
    """The attention block the SD VAE builds for its mid block (one head as wide as the channels)."""
    torch.manual_seed(0)
    return Attention(width, heads=1, dim_head=width, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=8,
                     spatial_norm_dim=None, residual_connection=True, bias=True, upcast_softmax=True,
                     _from_deprecated_attn_block=True).eval()  # fmt: skip


def test_wide_head_attention_equals_stock_sdpa():
    attn = vae_attention(288)
    x = torch.randn(2, 288, 6, 5)
    ref = attn(x)
    assert enable_wide_head_matmul_attention(attn) == 1
    assert type(attn.processor) is WideHeadMatmulAttnProcessor
    assert (attn(x) - ref).abs().max().item() < 1e-5
    tokens = x.flatten(2).transpose(1, 2)  # 3-D input [B, N, C]: the same
    assert (attn(tokens) - AttnProcessor2_0()(attn, tokens)).abs().max().item() < 1e-5
    assert disable_wide_head_matmul_attention(attn) == 1 and type(attn.processor) is AttnProcessor2_0
    assert torch.equal(attn(x), ref)


def test_wide_head_attention_leaves_narrow_heads_and_falls_back_when_scores_are_too_large(monkeypatch):
    assert enable_wide_head_matmul_attention(vae_attention(256)) == 0  # flash / cuDNN take 256-wide heads
    unet, _ = tiny_models()
    assert enable_wide_head_matmul_attention(unet) == 0
    attn = vae_attention(288)
    x = torch.randn(1, 288, 4, 4)
    ref = attn(x)
    enable_wide_head_matmul_attention(attn)
    called = []
    real = wide_attention.matmul_attention
    monkeypatch.setattr(wide_attention, "matmul_attention", lambda *a: called.append(1) or real(*a))
    monkeypatch.setattr(wide_attention, "MAX_SCORE_BYTES", 4 * 16 * 16 - 1)  # one image's scores: 16 x 16 floats
    assert torch.equal(attn(x), ref) and not called  # the stock kernel ran
    monkeypatch.setattr(wide_attention, "MAX_SCORE_BYTES", 4 * 16 * 16)
    assert (attn(x) - ref).abs().max().item() < 1e-5 and called  # now the matmul path ran


def wide_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 288), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8).eval()  # fmt: skip


def test_runner_defaults_use_both_and_equal_eager_diffusers():
    unet, _ = tiny_models()
    vae = wide_vae()
    embeds, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    assert FastPathOptions().channel_stats_norm and FastPathOptions().wide_head_attention
    runner = OneStepRunner(unet, vae, options=FastPathOptions(**CPU))
    assert {type(p) for p in vae.attn_processors.values()} == {WideHeadMatmulAttnProcessor}
    assert any(isinstance(m, ChannelStatsGroupNorm) for m in unet.modules())
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5


def test_fuse_qkv_with_wide_heads_fuses_the_unet_and_keeps_the_vae_wide_path():
    unet, _ = tiny_models()
    vae = wide_vae()
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    runner = OneStepRunner(unet, vae, options=FastPathOptions(**CPU, fuse_qkv=True, shared_cross_kv=False))
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert {type(p) for p in vae.attn_processors.values()} == {WideHeadMatmulAttnProcessor}
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5


def test_inductor_config_is_checked_and_merged():
    with pytest.raises(ConfigError, match="needs compile"):
        FastPathOptions(compile=None, cuda_graphs=False, inductor_config={"freezing": True})
    with pytest.raises(ConfigError, match="no_such_setting"):
        FastPathOptions(inductor_config={"no_such_setting": 1})
    assert inductor_options("default", tuning=False, extra={"freezing": True}) == {"freezing": True}
    opts = inductor_options("default", tuning=True, extra={"epilogue_fusion": True})
    assert opts["coordinate_descent_tuning"] is True and opts["epilogue_fusion"] is True  # extra wins
    unet, vae = tiny_models()
    with pytest.warns(UserWarning, match="inductor_config ignored"):
        runner = OneStepRunner(unet, vae, options=FastPathOptions(**(CPU | dict(compile="default")),
                                                                  inductor_config={"freezing": True}))  # fmt: skip
    assert runner._step == runner._eager_step


def test_decode_inductor_config_compiles_the_decode_apart(monkeypatch):
    with pytest.raises(ConfigError, match="decode_inductor_config.*needs compile"):
        FastPathOptions(compile=None, cuda_graphs=False, decode_inductor_config={"max_autotune": True})
    with pytest.raises(ConfigError, match="decode_inductor_config.*no_such_setting"):
        FastPathOptions(decode_inductor_config={"no_such_setting": 1})
    unet, vae = tiny_models()
    options = FastPathOptions(**(CPU | dict(compile="default")), inductor_config={"freezing": True},
                              decode_inductor_config={"max_autotune": True})  # fmt: skip
    with pytest.warns(UserWarning, match="decode_inductor_config ignored"):
        runner = OneStepRunner(unet, vae, options=options)
    calls = []

    def recording_compile(fn, *, options=None, mode=None, dynamic=None):
        calls.append((fn.__name__, options, mode, dynamic))
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    step = runner._compile("default")  # what a CUDA runner builds
    assert [(name, o.get("freezing"), o.get("max_autotune", False)) for name, o, _, _ in calls] == [
        ("_x0", True, False),  # the UNet keeps the step's settings
        ("_decode", True, True),  # the decode gets its own on top
    ]
    embeds, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(step(embeds, noise), runner._eager_step(embeds, noise), rtol=0, atol=0)
    calls.clear()
    runner.options = FastPathOptions(**(CPU | dict(compile="default")))
    assert runner._compile("default") == runner._eager_step and calls == [("_eager_step", None, "default", False)]
