"""Convolutions with few channels, run with their channels padded to a multiple of 8: the same function.

A Stable Diffusion UNet and VAE have a handful of convolutions whose input or output has 3 or 4 channels: the UNet's
``conv_in`` (4 → 320) and ``conv_out`` (320 → 4), the VAE decoder's ``post_quant_conv`` (4 → 4) and ``conv_in``
(4 → 512), and its ``conv_out`` (128 → 3, on the full 512 × 512 image). In channels_last bf16, cuDNN's tensor-core
kernels want channel counts that are multiples of 8 (16 bytes); other counts can take slower kernels.

Here such a convolution runs with zero input channels appended to its input and weight, and zero output channels
appended to its weight and bias, and its output sliced back. The appended products are exact zeros, so the result is
the same function (up to the accumulation order of the kernel cuDNN picks). Weights, state-dict keys and configs are
untouched.

The padded weight and bias are kept as a snapshot (non-persistent buffers) taken when the switch is made, so a
frozen module (weights with ``requires_grad=False``, as the inference fast path's) pads nothing per call; a module
whose weights take gradients pads them in each forward instead, with or without grad mode. Change the weights of a
frozen switched module in place and its snapshot is stale: switch it off and on again
(:func:`disable_padded_narrow_convs`, :func:`enable_padded_narrow_convs`).

Whether it is faster depends on the device and cuDNN; docs/performance.md has the measured times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossdistill.models.swap import swap_classes

ALIGN = 8  # channels: 16 bytes of bf16 / fp16


def padded(n: int, align: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def _pad_weights(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Weight ``[O, I, kh, kw]`` and bias ``[O]`` with zero output and input channels appended up to multiples of 8."""
    out_ch, in_ch = weight.shape[:2]
    weight = F.pad(weight, (0, 0, 0, 0, 0, padded(in_ch) - in_ch, 0, padded(out_ch) - out_ch))
    if bias is not None:
        bias = F.pad(bias, (0, padded(out_ch) - out_ch))
    return weight, bias


class PaddedNarrowConv2d(nn.Conv2d):
    """``nn.Conv2d`` run with its channels padded to multiples of 8 (see the module docstring)."""

    _padded_weight: Tensor | None
    _padded_bias: Tensor | None

    def snapshot(self) -> None:
        """Take the padded weight and bias from the current ones (done by :func:`enable_padded_narrow_convs`)."""
        with torch.no_grad():
            weight, bias = _pad_weights(self.weight, self.bias)
        self.register_buffer("_padded_weight", weight.contiguous(memory_format=_format(self.weight)), persistent=False)
        self.register_buffer("_padded_bias", bias, persistent=False)

    def forward(self, input: Tensor) -> Tensor:
        if self.weight.requires_grad or getattr(self, "_padded_weight", None) is None:
            weight, bias = _pad_weights(self.weight, self.bias)  # trainable: always the current weights
        else:
            weight, bias = self._padded_weight, self._padded_bias
        extra_in = weight.shape[1] - input.shape[1]
        if extra_in:
            input = F.pad(input, (0, 0, 0, 0, 0, extra_in))
        out = self._conv_forward(input, weight, bias)
        return out[:, : self.out_channels] if weight.shape[0] != self.out_channels else out


def _format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else (
        torch.contiguous_format)  # fmt: skip


def _eligible(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.padding_mode == "zeros"
        and (m.in_channels % ALIGN != 0 or m.out_channels % ALIGN != 0)
    )


def enable_padded_narrow_convs(module: nn.Module) -> int:
    """Switch every plain ``nn.Conv2d`` in ``module`` whose input or output channels are not a multiple of 8 (and
    that has one group and zero padding) to :class:`PaddedNarrowConv2d`, snapshotting its padded weights; returns how
    many. Call it after moving the module to its device, dtype and memory format."""
    count = swap_classes(module, _eligible, PaddedNarrowConv2d)
    for m in module.modules():
        if type(m) is PaddedNarrowConv2d:
            m.snapshot()
    return count


def disable_padded_narrow_convs(module: nn.Module) -> int:
    """Undo :func:`enable_padded_narrow_convs` (the snapshots go); returns how many went back to ``nn.Conv2d``."""
    for m in module.modules():
        if type(m) is PaddedNarrowConv2d:
            for name in ("_padded_weight", "_padded_bias"):
                m._buffers.pop(name, None)
    return swap_classes(module, lambda m: type(m) is PaddedNarrowConv2d, nn.Conv2d)


__all__ = ["PaddedNarrowConv2d", "disable_padded_narrow_convs", "enable_padded_narrow_convs", "padded"]
