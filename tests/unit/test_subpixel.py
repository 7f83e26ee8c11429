"""The sub-pixel upsample + conv (models/subpixel.py): the same function as diffusers' Upsample2D, 4/9 of the work."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.upsampling import Upsample2D
from torch.utils.flop_counter import FlopCounterMode

from crossdistill.export.fast import FastPathOptions, OneStepRunner
from crossdistill.models.subpixel import (
    SubpixelUpsample2D,
    disable_subpixel_upsample,
    enable_subpixel_upsample,
    fold_weight,
    subpixel_upsample_conv,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NHWC = torch.channels_last


def _upsampler(c_in: int = 6, c_out: int = 5, bias: bool = True, seed: int = 0) -> Upsample2D:
    torch.manual_seed(seed)
    return Upsample2D(c_in, use_conv=True, out_channels=c_out, bias=bias).double()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(5, 7), (8, 8), (1, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_same_output_and_gradients_as_the_stock_upsampler(channels_last, size, bias):
    m = _upsampler(bias=bias)
    x = torch.randn(2, 6, *size, dtype=torch.float64, requires_grad=True)
    inp = x.contiguous(memory_format=NHWC) if channels_last else x
    params = [x, m.conv.weight] + ([m.conv.bias] if bias else [])
    ref = m(inp)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, grad_out)

    assert enable_subpixel_upsample(m) == 1 and type(m) is SubpixelUpsample2D
    out = m(inp)
    grads = torch.autograd.grad(out, params, grad_out)
    assert out.shape == ref.shape == (2, 5, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    # The output keeps the input's layout (the next conv of a channels_last network must not get NCHW).
    assert out.is_contiguous(memory_format=NHWC if channels_last else torch.contiguous_format)


def test_fold_weight_phase_kernels():
    """Phase (0, 0) reads input offsets (−1, 0) × (−1, 0): row taps (w0, w1 + w2), the same along columns."""
    w = torch.arange(9.0).view(1, 1, 3, 3)  # w[r, c] = 3r + c
    k = fold_weight(w)
    assert k.shape == (4, 1, 2, 2)
    rows0 = torch.tensor([[0.0, 1, 2], [3 + 6, 4 + 7, 5 + 8]])  # phase-0 rows: (w0, w1 + w2)
    torch.testing.assert_close(k[0, 0], torch.stack([rows0[:, 0], rows0[:, 1] + rows0[:, 2]], 1))
    rows1 = torch.tensor([[0.0 + 3, 1 + 4, 2 + 5], [6, 7, 8]])  # phase-1 rows: (w0 + w1, w2)
    torch.testing.assert_close(k[3, 0], torch.stack([rows1[:, 0] + rows1[:, 1], rows1[:, 2]], 1))
    # Low-precision weights are folded in float32 and rounded once.
    wb = torch.randn(3, 2, 3, 3).bfloat16()
    assert fold_weight(wb).dtype == torch.bfloat16
    torch.testing.assert_close(fold_weight(wb), fold_weight(wb.float()).bfloat16(), rtol=0, atol=0)


def test_it_does_four_ninths_of_the_multiply_adds():
    x, w = torch.randn(1, 8, 16, 16), torch.randn(8, 8, 3, 3)
    with FlopCounterMode(display=False) as stock:
        torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0), w, padding=1)
    with FlopCounterMode(display=False) as sub:
        subpixel_upsample_conv(x, w, None)
    # 4 phases × 4 taps on the (H+1)×(W+1) grid vs 9 taps on the 2H×2W grid.
    assert sub.get_total_flops() / stock.get_total_flops() == pytest.approx(16 * 17 * 17 / (9 * 32 * 32))


def test_other_calls_take_the_stock_path():
    m = _upsampler()
    x = torch.randn(1, 6, 5, 7, dtype=torch.float64)
    ref = m(x, output_size=(9, 13))  # a UNet on an odd latent grid asks for this size, not 2×
    enable_subpixel_upsample(m)
    torch.testing.assert_close(m(x, output_size=(9, 13)), ref, rtol=0, atol=0)
    torch.testing.assert_close(m(x, output_size=(10, 14)), m(x), rtol=0, atol=0)


def test_only_plain_nearest_conv_upsamplers_switch_and_nothing_stored_changes():
    plain = _upsampler()
    no_conv = Upsample2D(4, use_conv=False)
    transpose = Upsample2D(4, use_conv_transpose=True)
    one_by_one = Upsample2D(4, use_conv=True, kernel_size=1, padding=0)
    model = torch.nn.ModuleList([plain, no_conv, transpose, one_by_one])
    keys = list(model.state_dict())
    assert enable_subpixel_upsample(model) == 1
    assert [type(m) for m in model] == [SubpixelUpsample2D, Upsample2D, Upsample2D, Upsample2D]
    assert list(model.state_dict()) == keys
    assert enable_subpixel_upsample(model) == 0  # already switched
    assert disable_subpixel_upsample(model) == 1 and type(plain) is Upsample2D


def test_a_lora_wrapped_conv_keeps_the_stock_path():
    """peft wraps the conv after the switch: the forward sees a LoRA layer and must not read only its base weight."""
    from peft import LoraConfig, inject_adapter_in_model

    stock, switched = _upsampler(seed=0), _upsampler(seed=0)
    enable_subpixel_upsample(switched)
    for m in (stock, switched):
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False), m)
        m.double()
    for name, p in switched.named_parameters():  # both LoRAs get the same (random, non-zero) weights
        p.data.copy_(dict(stock.named_parameters())[name])
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(switched(x), stock(x), rtol=0, atol=0)
    assert enable_subpixel_upsample(stock) == 0  # a wrapped conv is not eligible at all
    assert type(stock) is Upsample2D


def test_fast_path_option_gives_the_same_images():
    from test_fast_path import reference_images, tiny_models

    unet, vae = tiny_models()
    embeds, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    options = FastPathOptions(dtype="float32", channels_last=True, compile=None, cuda_graphs=False,
                              subpixel_upsample=True)  # fmt: skip
    runner = OneStepRunner(unet, vae, options=options)
    assert any(type(m) is SubpixelUpsample2D for m in unet.modules())
    assert any(type(m) is SubpixelUpsample2D for m in vae.modules())
    assert not any(type(m) is Upsample2D for m in (*unet.modules(), *vae.modules()))
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5
