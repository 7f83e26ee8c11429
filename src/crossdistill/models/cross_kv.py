"""Every cross-attention's keys and values from one matmul: the same function, one GEMM instead of many.

In a Stable Diffusion 1.5 / 2 UNet each cross-attention block projects the same prompt embeddings to its keys and
values (``to_k``, ``to_v``): SD 1.5 has 16 such blocks, 32 small GEMMs over 77 tokens per call. At batch 1 each is a
kernel launch of a few microseconds for little arithmetic.

:func:`enable_shared_cross_kv` concatenates those weights (and biases) once, in the UNet's module order, and gives
every cross-attention a :class:`PrecomputedKVAttnProcessor` that reads its keys and values as slices of the one
projection. The caller computes the projection, :func:`project_cross_kv`, and passes it to the UNet in place of the
prompt embeddings (``encoder_hidden_states``): each block's keys and values are the same numbers as ``to_k(e)`` and
``to_v(e)``, up to the GEMM's accumulation order. Weights, state-dict keys and configs are untouched;
:func:`disable_shared_cross_kv` restores the stock processors.

A UNet qualifies when the prompt embeddings reach nothing but cross-attentions that use the stock SDPA processor
without a norm on them (no ``encoder_hid_proj``, no text-based added embedding, no ``norm_cross``, no fused or
custom processor) and whose keys and values are plain ``nn.Linear`` layers (a peft LoRA wrapper's delta would be lost
in the concatenated weight); for any other :func:`enable_shared_cross_kv` changes nothing and returns ``None``. A
switched UNet called with raw prompt embeddings fails with an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn


@dataclass
class SharedCrossKV:
    """The concatenated projection: ``weight`` ``[total, D]``, ``bias`` ``[total]`` or None."""

    weight: Tensor
    bias: Tensor | None


class PrecomputedKVAttnProcessor(AttnProcessor2_0):
    """A cross-attention whose keys and values are the slices ``[k_start, k_start + width)`` and ``[v_start, v_start
    + width)`` of the shared projection it receives as ``encoder_hidden_states`` (``total`` channels wide)."""

    def __init__(self, k_start: int, v_start: int, width: int, total: int) -> None:
        super().__init__()
        self.k_start, self.v_start, self.width, self.total = k_start, v_start, width, total

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
        if encoder_hidden_states is None or encoder_hidden_states.shape[-1] != self.total:
            got = None if encoder_hidden_states is None else encoder_hidden_states.shape[-1]
            raise ValueError(
                f"this cross-attention takes the shared key/value projection ({self.total} channels), got {got}: "
                "compute it with crossdistill.models.cross_kv.project_cross_kv, or disable_shared_cross_kv(unet)"
            )
        if attention_mask is not None or args or kwargs:
            raise ValueError("shared cross-attention keys/values: attention masks and extra arguments not supported")
        residual = hidden_states
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        head_dim = self.width // attn.heads
        query = attn.to_q(hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        kv = encoder_hidden_states
        key = kv[..., self.k_start : self.k_start + self.width].view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = kv[..., self.v_start : self.v_start + self.width].view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _cross_attentions(unet: nn.Module) -> list[Attention]:
    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def _qualifies(unet: nn.Module, attentions: list[Attention]) -> bool:
    config = getattr(unet, "config", None)
    return (
        bool(attentions)
        and getattr(unet, "encoder_hid_proj", None) is None
        and getattr(config, "addition_embed_type", None) in (None, "text_time")  # "text", "text_image" read the prompt
        and all(
            type(a.processor) is AttnProcessor2_0
            and getattr(a, "norm_cross", None) is None
            and a.spatial_norm is None
            and a.group_norm is None
            and a.norm_q is None
            and a.norm_k is None
            and type(a.to_k) is nn.Linear  # a peft LoRA wrapper's delta would be lost in the concatenated weight
            and type(a.to_v) is nn.Linear
            and a.to_k.weight.shape == a.to_v.weight.shape
            for a in attentions
        )
    )


def shared_cross_kv_applies(unet: nn.Module) -> bool:
    """Whether :func:`enable_shared_cross_kv` would switch ``unet`` (module docstring)."""
    return _qualifies(unet, _cross_attentions(unet))


@torch.no_grad()
def enable_shared_cross_kv(unet: nn.Module) -> SharedCrossKV | None:
    """Give every cross-attention of ``unet`` a :class:`PrecomputedKVAttnProcessor` and return the concatenated
    projection they read (module docstring); ``None`` (nothing changed) when the UNet does not qualify. Run it after
    the UNet has its final device and dtype: the weights are copied in that state."""
    attentions = _cross_attentions(unet)
    if not _qualifies(unet, attentions):
        return None
    weights, biases, offset = [], [], 0
    total = sum(2 * a.to_k.weight.shape[0] for a in attentions)
    for a in attentions:
        width = a.to_k.weight.shape[0]
        weights += [a.to_k.weight, a.to_v.weight]
        for proj in (a.to_k, a.to_v):
            biases.append(proj.bias if proj.bias is not None else torch.zeros_like(proj.weight[:, 0]))
        a.set_processor(PrecomputedKVAttnProcessor(offset, offset + width, width, total))
        offset += 2 * width
    has_bias = any(a.to_k.bias is not None or a.to_v.bias is not None for a in attentions)
    return SharedCrossKV(torch.cat(weights).contiguous(), torch.cat(biases) if has_bias else None)


def project_cross_kv(shared: SharedCrossKV, prompt_embeds: Tensor) -> Tensor:
    """The keys and values of every cross-attention, ``[B, L, total]``: pass it to the UNet as its
    ``encoder_hidden_states``."""
    return F.linear(prompt_embeds, shared.weight, shared.bias)


def disable_shared_cross_kv(unet: nn.Module) -> int:
    """Give every :class:`PrecomputedKVAttnProcessor` of ``unet`` back the stock processor; returns how many."""
    switched = [m for m in unet.modules() if isinstance(m, Attention)
                and isinstance(m.processor, PrecomputedKVAttnProcessor)]  # fmt: skip
    for m in switched:
        m.set_processor(AttnProcessor2_0())
    return len(switched)
