"""A one-step UNet's time embedding as constants: the same function at the one timestep it runs.

A one-step Student always runs its UNet at the same timestep (t = 999). Everything a Stable Diffusion 1.5 / 2 UNet
computes from the timestep alone is then the same on every call: the sinusoidal projection, the two-layer time MLP,
and in each of its ResNet blocks the ``time_emb_proj`` Linear (1280 → C) of the activated embedding — ~25 small
kernels per call that read ~50 MB of weights to produce the same vectors.

Here every ``time_emb_proj`` becomes a :class:`ConstantTimeProjection`: its output at that timestep is recorded once
(from one real forward of the UNet on a tiny input, so it is exactly what the stock modules compute) and returned
for every row of every later call. The time MLP's result then feeds nothing, and a compiler drops it. Weights,
state-dict keys and configs are untouched; :func:`disable_constant_time_projection` switches the modules back.

Only a UNet whose time embedding depends on the timestep alone qualifies: no class embedding, no added embedding
(SDXL's text-time embedding depends on each call's pooled prompt and size ids), no ``timestep_cond``. For any other
:func:`enable_constant_time_projection` changes nothing and returns 0. The constants hold for the recorded timestep
only: a runner that owns the UNet (``OneStepRunner``) uses it at that timestep alone.

Whether it is faster depends on the device and the compiler; docs/performance.md has the measured times.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crossdistill.models.swap import swap_classes


class ConstantTimeProjection(nn.Linear):
    """A ResNet block's ``time_emb_proj`` that returns its recorded output at one timestep (module docstring)."""

    _constant: Tensor

    def forward(self, input: Tensor) -> Tensor:
        return self._constant.expand(input.shape[0], -1)


def time_embedding_is_constant(unet: nn.Module) -> bool:
    """Whether ``unet``'s time embedding depends on the timestep alone (a diffusers ``UNet2DConditionModel``)."""
    time_embedding = getattr(unet, "time_embedding", None)
    return (
        time_embedding is not None
        and getattr(unet, "class_embedding", None) is None
        and getattr(unet, "add_embedding", None) is None
        and getattr(time_embedding, "cond_proj", None) is None
        and isinstance(getattr(getattr(unet, "config", None), "cross_attention_dim", None), int)
    )


def _projections(unet: nn.Module) -> list[nn.Linear]:
    return [m.time_emb_proj for m in unet.modules()
            if isinstance(getattr(m, "time_emb_proj", None), nn.Linear)]  # fmt: skip


@torch.no_grad()
def enable_constant_time_projection(unet: nn.Module, timestep: Tensor) -> int:
    """Switch every ``time_emb_proj`` of ``unet`` to its constant output at ``timestep`` (a one-element tensor on the
    UNet's device); returns how many, 0 when the UNet does not qualify (module docstring). Run it after the UNet has
    its final device, dtype and other module swaps: the constants are recorded in that state."""
    disable_constant_time_projection(unet)  # record from the stock projections
    projections = _projections(unet)
    if not projections or not time_embedding_is_constant(unet):
        return 0
    recorded: dict[nn.Module, Tensor] = {}

    def record(module: nn.Module, _args, output: Tensor) -> None:
        recorded[module] = output[:1].detach().clone()

    hooks = [p.register_forward_hook(record) for p in projections]
    try:
        param = next(unet.parameters())
        down = 2 ** (len(unet.config.block_out_channels) - 1)  # the smallest latent every level can halve
        sample = torch.zeros(1, unet.config.in_channels, down, down, device=param.device, dtype=param.dtype)
        context = torch.zeros(1, 1, unet.config.cross_attention_dim, device=param.device, dtype=param.dtype)
        unet(sample, timestep.reshape(-1)[:1], encoder_hidden_states=context, return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    for p in projections:
        p.register_buffer("_constant", recorded[p], persistent=False)
    return swap_classes(unet, lambda m: any(m is p for p in projections), ConstantTimeProjection)


def disable_constant_time_projection(unet: nn.Module) -> int:
    """Switch every :class:`ConstantTimeProjection` of ``unet`` back to ``nn.Linear``; returns how many."""
    switched = [m for m in unet.modules() if type(m) is ConstantTimeProjection]
    for m in switched:
        del m._constant
    return swap_classes(unet, lambda m: type(m) is ConstantTimeProjection, nn.Linear)
