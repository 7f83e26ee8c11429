"""Distribution matching (DMD2) losses in the Teacher's space: the DM gradient, the fake score and the GAN.

Symbols follow DESIGN.md §3: ``ẑ_t = B_φ(G_θ(z, c))`` is the generator's sample carried into the Teacher's
normalised latent space, ``μ_real`` the Teacher's (CFG) x0-prediction at a noised ``ẑ_t``, ``μ_fake`` the fake
score's. Every function returns a scalar loss (and, where useful, a dict of detached logs); none of them knows
which model family it is talking to.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossdistill.models.base import Denoiser, PromptEmbeds


def dm_loss(z_hat: Tensor, mu_real: Tensor, mu_fake: Tensor, min_denominator: float = 1e-5) -> tuple[Tensor, dict]:
    """Distribution-matching loss whose gradient w.r.t. ``ẑ_t`` is the DMD2 update direction.

    Args:
        z_hat: ``ẑ_t`` ``[B, C, h, w]``, the generated sample in Teacher space (with grad into ``B_φ``, ``G_θ``).
        mu_real: ``μ_real`` ``[B, C, h, w]``, Teacher x0-prediction at ``x_τ = noise(ẑ_t, τ, ε)`` (no grad).
        mu_fake: ``μ_fake`` ``[B, C, h, w]``, fake-score x0-prediction at the same ``x_τ`` (no grad).

    ``g = (μ_fake − μ_real) / mean|ẑ_t − μ_real|`` (mean over C, h, w per sample: DMD's normaliser, which keeps the
    step size independent of how far the Teacher's denoising moves the sample), and
    ``L = ½ ‖ẑ_t − sg(ẑ_t − g)‖²`` averaged over all elements, so ``∂L/∂ẑ_t = g / (B·C·h·w)``. Descending ``L``
    moves ``ẑ_t`` along ``μ_real − μ_fake``: towards the Teacher's distribution, away from the generator's own.
    """
    z = z_hat.float()
    with torch.no_grad():
        mu_real, mu_fake = mu_real.float(), mu_fake.float()
        denominator = (z - mu_real).abs().mean(dim=tuple(range(1, z.ndim)), keepdim=True)
        g = (mu_fake - mu_real) / denominator.clamp_min(min_denominator)
    loss = 0.5 * F.mse_loss(z, (z - g).detach())
    logs = {"dm/grad_norm": g.flatten(1).norm(dim=1).mean().item(), "dm/denominator": denominator.mean().item()}
    return loss, logs


def fake_score_loss(denoiser: Denoiser, x0: Tensor, cond: PromptEmbeds, t: Tensor, eps: Tensor) -> Tensor:
    """The fake score's training loss: the family's own denoising loss on ``sg(ẑ_t)`` (eps / v / flow target).

    Trained on the generator's current samples, the fake score tracks the score of the generator's distribution.
    """
    return denoiser.loss(x0.detach(), cond, t, eps)


# ---------------------------------------------------------------------------------------------------------------------
# Optional GAN (DMD2 §4.3): a small classifier on the fake score's middle features.


def feature_module(backbone: nn.Module) -> nn.Module:
    """The block whose output feeds the GAN head: a UNet's ``mid_block`` (its bottleneck, as in DMD2), otherwise the
    middle block of a transformer's ``transformer_blocks``. Chosen by structure, never by family name."""
    if hasattr(backbone, "mid_block") and backbone.mid_block is not None:
        return backbone.mid_block
    blocks = getattr(backbone, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        return blocks[len(blocks) // 2]
    raise ValueError(f"no mid_block or transformer_blocks in {type(backbone).__name__}: cannot place the GAN head")


@contextmanager
def capture_features(module: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, each forward of ``module`` appends its output features to the yielded list.

    Transformer blocks return ``(encoder_hidden_states, hidden_states)`` tuples: the last tensor is the image stream.
    """
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[-1] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def run_to(backbone: nn.Module, block: nn.Module) -> Iterator[None]:
    """Within the block, a forward of ``backbone`` stops computing after ``block`` (the GAN head's feature block).

    For a pass that only reads that block's features: the transformer blocks after it (and FLUX's single-stream
    blocks), or a UNet's up blocks and output convolutions, are taken out for the block's duration and put back on
    exit. The features are the same bit for bit; the backbone's output is not meaningful (a transformer still runs
    its final norm and projection on the truncated stream; a UNet returns the mid block's output). The SD3.5-M fake
    score at batch 4 skips 16.3 of a forward's 45.0 TFLOP (``bench/gan_pass_flops.py``)."""
    saved: dict[str, nn.Module | None] = {}

    def swap(name: str, value: nn.Module | None) -> None:
        saved[name] = getattr(backbone, name)
        setattr(backbone, name, value)

    blocks = getattr(backbone, "transformer_blocks", None)
    index = next((i for i, b in enumerate(blocks) if b is block), None) if blocks is not None else None
    if index is not None:
        swap("transformer_blocks", nn.ModuleList(list(blocks)[: index + 1]))
        if getattr(backbone, "single_transformer_blocks", None) is not None:
            swap("single_transformer_blocks", nn.ModuleList())
    elif getattr(backbone, "mid_block", None) is block and hasattr(backbone, "up_blocks"):
        swap("up_blocks", nn.ModuleList())
        swap("conv_norm_out", None)
        swap("conv_out", nn.Identity())
    else:
        raise ValueError(
            f"{type(block).__name__} is neither a transformer block nor the mid block of {type(backbone).__name__}"
        )
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(backbone, name, value)


class GANHead(nn.Module):
    """Real/fake logit per sample from backbone features ``[B, D, h, w]`` (UNet) or ``[B, N, D]`` (transformer).

    Features become tokens ``[B, N, D]``, a two-layer MLP scores each token and the scores are averaged: small,
    family-agnostic, and cheap next to the backbone that produced the features.
    """

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        return self.net(tokens.float()).mean(dim=(1, 2))


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss ``E[softplus(−D(ẑ_t))]``: the generator wants its samples called real."""
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss ``E[softplus(−D(real))] + E[softplus(D(sg(ẑ_t)))]``."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
