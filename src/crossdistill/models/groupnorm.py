"""GroupNorm with per-channel statistics: the same function as ``nn.GroupNorm``, in a form that reads NHWC in order.

``nn.GroupNorm`` normalises each (sample, group) by the mean and variance over the group's channels and all pixels.
Lowered by inductor on a channels_last tensor, that reduction walks the group's channels at a stride of ``C`` and, at
batch 1, has only ``num_groups`` (32) outputs to spread over the GPU's SMs.

Here the statistics are taken per channel first, a reduction over the pixels with ``B·C`` outputs that reads
channels_last memory contiguously along ``C``, and then combined per group exactly (every channel has the same count
of pixels, so the group's mean is the mean of its channel means, and its variance the mean of the channel variances
plus the variance of the channel means):

    μ_g = mean_c μ_c          σ²_g = mean_c (σ²_c + (μ_c − μ_g)²)

The normalisation then folds into one per-channel scale and shift (``y = x·a_c + b_c``), which inductor fuses into the
neighbouring elementwise work (the SiLU after it, the residual add before it). Statistics are in float32, as
``nn.GroupNorm``'s are under autocast; the result equals ``nn.GroupNorm``'s up to rounding. Weights, state-dict keys
and configs are untouched.

Whether it is faster depends on the device and the compiler; docs/performance.md has the measured times.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crossdistill.models.swap import swap_classes


def channel_stats_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` for ``x`` of shape ``[B, C, *spatial]`` (spatial ≥ 1 dim)."""
    b, c = x.shape[:2]
    if x.dim() < 3 or c % num_groups:
        raise ValueError(f"channel_stats_group_norm needs [B, C, *spatial] with C divisible by groups, got {x.shape}")
    g = num_groups
    spatial = tuple(range(2, x.dim()))
    xf = x.float()
    var_c, mean_c = torch.var_mean(xf, dim=spatial, correction=0)  # [B, C] each
    mean_c, var_c = mean_c.view(b, g, c // g), var_c.view(b, g, c // g)
    mean_g = mean_c.mean(-1, keepdim=True)  # [B, G, 1]
    var_g = (var_c + (mean_c - mean_g).square()).mean(-1, keepdim=True)
    scale = torch.rsqrt(var_g + eps).expand(b, g, c // g).reshape(b, c)  # [B, C]
    shift = -mean_g.expand(b, g, c // g).reshape(b, c) * scale
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    view = (b, c) + (1,) * len(spatial)
    return (xf * scale.view(view) + shift.view(view)).to(x.dtype)


class ChannelStatsGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` by :func:`channel_stats_group_norm`; inputs with no spatial dim take the stock path."""

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 3:
            return super().forward(input)
        return channel_stats_group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


def enable_channel_stats_group_norm(module: nn.Module) -> int:
    """Switch every plain ``nn.GroupNorm`` in ``module`` to :class:`ChannelStatsGroupNorm`; returns how many."""
    return swap_classes(module, lambda m: type(m) is nn.GroupNorm, ChannelStatsGroupNorm)


def disable_channel_stats_group_norm(module: nn.Module) -> int:
    """Undo :func:`enable_channel_stats_group_norm`; returns how many modules went back to ``nn.GroupNorm``."""
    return swap_classes(module, lambda m: type(m) is ChannelStatsGroupNorm, nn.GroupNorm)


__all__ = [
    "ChannelStatsGroupNorm",
    "channel_stats_group_norm",
    "disable_channel_stats_group_norm",
    "enable_channel_stats_group_norm",
]
