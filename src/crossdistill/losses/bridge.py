"""Stage-1 Bridge losses (DESIGN.md §2): latent reconstruction, attention fidelity, output fidelity.

Symbols: ``z_t* = E_t(x)`` the true Teacher latent, ``ẑ_t = B_φ(z_s)`` the bridged one, both ``[B, C_t, h, w]``.
Attention fidelity noises both with the same ``(τ, ε)``, runs the frozen Teacher on each with the prompt and
compares the captured image→text attention maps ``A_l`` (``[B, heads, N_img, N_txt]``, rows sum to 1):
``L_attn = Σ_l KL(A_l(z_t*) ‖ A_l(ẑ_t))``, averaged over batch, heads and queries. Gradients reach ``P_φ`` through
the frozen Teacher on the ``ẑ_t`` branch only; the reference branch runs without gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from crossdistill.models.base import PromptEmbeds, Space


def reconstruction_loss(z_hat: Tensor, z_star: Tensor) -> Tensor:
    """``L_rec = ‖ẑ_t − z_t*‖²``, mean over elements."""
    return (z_hat.float() - z_star.float()).pow(2).mean()


def attention_kl(ref: dict[str, Tensor], hat: dict[str, Tensor], eps: float = 1e-8) -> Tensor:
    """``Σ_l KL(ref_l ‖ hat_l)``, each layer's KL summed over keys and averaged over batch, heads and queries.

    Zero exactly when the maps agree; ``ref`` is treated as the target distribution."""
    missing = set(ref) ^ set(hat)
    if missing:
        raise ValueError(f"attention maps captured at different layers: {sorted(missing)}")
    total = torch.zeros((), device=next(iter(hat.values())).device)
    for name, p in ref.items():
        p = p.float()
        q = hat[name].float()
        total = total + (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1).mean()
    return total


def attention_mse(ref: dict[str, Tensor], hat: dict[str, Tensor]) -> Tensor:
    """``Σ_l ‖ref_l − hat_l‖²`` (mean over elements): the alternative to KL."""
    return sum((ref[k].float() - hat[k].float()).pow(2).mean() for k in ref)


@dataclass(kw_only=True)
class BridgeLossWeights:
    rec: float = 1.0  # λ_rec: latent reconstruction
    attn: float = 0.1  # λ_attn: attention fidelity (0 turns the Teacher passes off)
    out: float = 0.0  # λ_out: Teacher x0-prediction agreement
    attn_metric: str = "kl"  # "kl" or "mse"
    t_min: float = 0.02  # Teacher times drawn for the fidelity terms
    t_max: float = 0.98


def bridge_loss(
    z_hat: Tensor,
    z_star: Tensor,
    teacher: Space,
    cond: PromptEmbeds | None,
    weights: BridgeLossWeights,
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
    hold: contextlib.ExitStack | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``L_bridge = λ_rec L_rec + λ_attn L_attn + λ_out L_out`` and its detached parts (``loss/rec`` ...).

    ``hold``: see :func:`teacher_agreement` (needed when the Teacher uses gradient checkpointing)."""
    loss_rec = reconstruction_loss(z_hat, z_star)
    logs = {"loss/rec": loss_rec.item()}
    loss = weights.rec * loss_rec
    if (weights.attn > 0 or weights.out > 0) and cond is not None:
        loss_attn, loss_out = teacher_fidelity(z_hat, z_star, teacher, cond, weights, generator, layers, hold)
        logs["loss/attn"] = loss_attn.item()
        logs["loss/out"] = loss_out.item()
        loss = loss + weights.attn * loss_attn + weights.out * loss_out
    logs["loss/bridge"] = loss.item()
    return loss, logs


def teacher_fidelity(
    z_hat: Tensor,
    z_star: Tensor,
    teacher: Space,
    cond: PromptEmbeds,
    weights: BridgeLossWeights,
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
    hold: contextlib.ExitStack | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention fidelity and output fidelity of the frozen Teacher on ``ẑ_t`` vs ``z_t*`` at a random τ, ε."""
    batch = z_hat.shape[0]
    t = teacher.denoiser.sample_time(batch, generator, weights.t_min, weights.t_max).to(z_hat.device)
    eps = torch.randn(z_star.shape, generator=generator, device=generator.device if generator else "cpu")
    eps = eps.to(z_hat.device)
    return teacher_agreement(z_hat, z_star, teacher, cond, t, eps, weights.attn_metric, layers, hold)


def teacher_agreement(
    z_hat: Tensor,
    z_star: Tensor,
    teacher: Space,
    cond: PromptEmbeds,
    t: Tensor,
    eps: Tensor,
    attn_metric: str = "kl",
    layers: Sequence[str] | None = None,
    hold: contextlib.ExitStack | None = None,
) -> tuple[Tensor, Tensor]:
    """``(L_attn, L_out)`` with both latents noised by the given ``t: [B]`` and ``eps: [B, C, h, w]``.

    Split from :func:`teacher_fidelity` so diagnostics can measure at fixed τ (``crossdistill bridge report``).
    ``hold``: an ExitStack that keeps the ``ẑ_t`` branch's attention capture installed until the caller closes it,
    after ``backward``. A gradient-checkpointed Teacher recomputes its blocks during backward, and the recomputation
    must run the same (capturing) processors as the forward did, or torch refuses the mismatch."""
    den = teacher.denoiser
    eps = eps.to(z_hat.dtype)
    x_ref, x_hat = den.noise(z_star, t, eps), den.noise(z_hat, t, eps)
    with torch.no_grad(), den.capture_attention(layers) as maps_ref:
        raw_ref = den.raw(x_ref, t, cond)
    with contextlib.ExitStack() as local:
        maps_hat = (hold or local).enter_context(den.capture_attention(layers))
        raw_hat = den.raw(x_hat, t, cond)
    metric = attention_kl if attn_metric == "kl" else attention_mse
    loss_attn = metric(maps_ref, maps_hat)
    loss_out = (den.to_x0(raw_hat, x_hat, t).float() - den.to_x0(raw_ref, x_ref, t).float()).pow(2).mean()
    return loss_attn, loss_out
