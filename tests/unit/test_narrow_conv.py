"""Convolutions with few channels run padded to 8 channels compute what the stock convolutions compute."""

from __future__ import annotations

import pytest
import torch
from test_fast_path import reference_images, tiny_models
from torch import nn

from crossdistill.errors import ConfigError
from crossdistill.export.fast import FastPathOptions, OneStepRunner
from crossdistill.models.narrow_conv import (
    PaddedNarrowConv2d,
    disable_padded_narrow_convs,
    enable_padded_narrow_convs,
    padded,
)

CPU = dict(dtype="float32", channels_last=False, compile=None, cuda_graphs=False)


def test_padded_rounds_up_to_multiples_of_8():
    assert [padded(n) for n in (1, 3, 4, 8, 9, 320)] == [8, 8, 8, 8, 16, 320]


@pytest.mark.parametrize(("cin", "cout", "k"), [(4, 32, 3), (32, 3, 3), (4, 4, 1), (3, 5, 3), (16, 16, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_conv_equals_the_stock_conv(cin, cout, k, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2).double()
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    ref = conv(x)
    eligible = cin % 8 != 0 or cout % 8 != 0
    assert enable_padded_narrow_convs(conv) == int(eligible)
    if not eligible:
        assert type(conv) is nn.Conv2d
        return
    assert type(conv) is PaddedNarrowConv2d
    assert conv._padded_weight.shape == (padded(cout), padded(cin), k, k)
    assert list(conv.state_dict()) == ["weight", "bias"]  # the snapshot is not saved
    conv.requires_grad_(False)
    out = conv(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-12


def test_trainable_padded_conv_sends_the_same_gradients_and_uses_current_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    conv(x).square().sum().backward()
    ref = [t.grad.clone() for t in (x, conv.weight, conv.bias)]
    for t in (x, conv.weight, conv.bias):
        t.grad = None
    enable_padded_narrow_convs(conv)
    conv(x).square().sum().backward()
    for got, want in zip((x.grad, conv.weight.grad, conv.bias.grad), ref):
        assert (got - want).abs().max().item() < 1e-10
    with torch.no_grad():  # trainable weights: each forward pads the current ones, never a stale snapshot
        conv.weight.mul_(2)
        assert (conv(x) - nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max().item() < 1e-12


def test_disable_restores_plain_convs():
    unet, vae = tiny_models()
    n = enable_padded_narrow_convs(unet)
    assert n == 2  # conv_in (4 -> 32) and conv_out (32 -> 4)
    assert disable_padded_narrow_convs(unet) == n
    assert not any(isinstance(m, PaddedNarrowConv2d) for m in unet.modules())
    assert not any(name.startswith("_padded") for name, _ in unet.named_buffers())


def test_runner_with_padded_narrow_convs_equals_eager_diffusers():
    unet, vae = tiny_models()
    embeds, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    assert not FastPathOptions().pad_narrow_convs
    runner = OneStepRunner(unet, vae, options=FastPathOptions(**CPU, pad_narrow_convs=True))
    # UNet conv_in / conv_out; VAE encoder conv_in (3 in), conv_out (8 out is aligned), quant_conv (8 -> 8 aligned),
    # post_quant_conv (4 -> 4), decoder conv_in (4 in), decoder conv_out (3 out)
    swapped = {name for name, m in (*unet.named_modules(), *vae.named_modules()) if type(m) is PaddedNarrowConv2d}
    assert {"conv_in", "conv_out", "post_quant_conv", "decoder.conv_in", "decoder.conv_out"} <= swapped
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5


def test_inductor_config_takes_dotted_nested_settings():
    FastPathOptions(inductor_config={"triton.cudagraphs": False})
    with pytest.raises(ConfigError, match="triton.no_such_setting"):
        FastPathOptions(inductor_config={"triton.no_such_setting": True})
