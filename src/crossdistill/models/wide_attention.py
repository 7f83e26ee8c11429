"""Attention with heads wider than 256 as two matmuls: the SD VAE's mid-block attention (one 512-wide head).

The flash and cuDNN kernels of ``scaled_dot_product_attention`` take heads up to 256 wide, so the VAE's single
512-wide head falls to PyTorch's memory-efficient kernel, which is slow at this shape (0.34 ms of a 12.5 ms one-step
image on an H100, batch 1). Written out, ``softmax(q kᵀ / √d) v`` is two bf16 matmuls for cuBLAS and one float32
softmax that inductor fuses with its scaling and cast: the same function up to rounding. The score matrix is
materialised, ``B · heads · N²`` floats (64 MiB per image at 512 px, 1 GiB at 1024 px), so calls whose scores would
pass :data:`MAX_SCORE_BYTES` keep the stock kernel.

:func:`enable_wide_head_matmul_attention` switches, in place, every stock SDPA processor (``AttnProcessor2_0``) whose
attention module has heads wider than 256; the UNet's heads (40–160 wide) are left alone. Weights and configs are
untouched; :func:`disable_wide_head_matmul_attention` switches them back.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

WIDEST_FUSED_HEAD = 256  # flash / cuDNN SDPA take heads up to this width
MAX_SCORE_BYTES = 2**30  # float32 scores larger than this keep the stock SDPA kernel


def matmul_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) as matmuls, the softmax in float32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class WideHeadMatmulAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` whose unmasked self-attention runs :func:`matmul_attention`; any other call (masks,
    cross-attention, a spatial norm, scores larger than :data:`MAX_SCORE_BYTES`) takes the stock path."""

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        tokens = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]
        score_bytes = 4 * hidden_states.shape[0] * attn.heads * tokens * tokens
        stock = (
            encoder_hidden_states is not None
            or attention_mask is not None
            or attn.spatial_norm is not None
            or attn.norm_q is not None
            or attn.norm_k is not None
            or args
            or kwargs
            or score_bytes > MAX_SCORE_BYTES
        )
        if stock:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        b = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = (proj(hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k, v = (t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
        out = matmul_attention(q, k, v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if residual.ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _wide(m: nn.Module) -> bool:
    return (
        isinstance(m, Attention)
        and type(m.processor) is AttnProcessor2_0
        and m.to_q.out_features // m.heads > WIDEST_FUSED_HEAD
    )


def enable_wide_head_matmul_attention(module: nn.Module) -> int:
    """Give every stock-processor attention in ``module`` with heads wider than 256 the matmul processor."""
    count = 0
    for m in module.modules():
        if _wide(m):
            m.set_processor(WideHeadMatmulAttnProcessor())
            count += 1
    return count


def disable_wide_head_matmul_attention(module: nn.Module) -> int:
    """Undo :func:`enable_wide_head_matmul_attention`; returns how many processors went back to the stock one."""
    count = 0
    for m in module.modules():
        if isinstance(m, Attention) and type(m.processor) is WideHeadMatmulAttnProcessor:
            m.set_processor(AttnProcessor2_0())
            count += 1
    return count


__all__ = [
    "MAX_SCORE_BYTES",
    "WideHeadMatmulAttnProcessor",
    "disable_wide_head_matmul_attention",
    "enable_wide_head_matmul_attention",
    "matmul_attention",
]
