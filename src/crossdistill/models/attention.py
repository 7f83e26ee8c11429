"""Image-query → text-key attention capture that leaves the wrapped model's output bit-identical.

Every family runs its attention through a stock diffusers processor that ends in one attention call
(``torch.nn.functional.scaled_dot_product_attention`` for the UNet and SD3, diffusers' ``dispatch_attention_fn``
for FLUX). During a captured layer's processor call we intercept that one call, so we see the exact ``q`` and ``k``
the model uses (after projections, qk-norms and RoPE), recompute ``softmax(q_img k_txtᵀ / √d)`` on the side and hand
the stock call its arguments untouched: the model's output cannot change. Only requested layers are wrapped, because
full maps are large (4096 image tokens × heads × text tokens per layer and sample).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# (args, kwargs) of the processor call → (image token slice, text token slice) within the attention's q / k.
Split = Callable[[tuple, dict], tuple[slice, slice]]


def cross_split(args: tuple, kwargs: dict) -> tuple[slice, slice]:
    """UNet cross-attention (``attn2``): every query is an image token, every key a text token."""
    return slice(None), slice(None)


def image_then_text(args: tuple, kwargs: dict) -> tuple[slice, slice]:
    """SD3 joint attention: tokens are ``[image, text]``; the image length is that of ``hidden_states``."""
    n_image = args[0].shape[1]
    return slice(0, n_image), slice(n_image, None)


@dataclass(frozen=True)
class AttentionSite:
    """One capturable attention module and how to find its image and text tokens.

    ``hook`` names the function the stock processor calls for attention, as ``(module name, attribute)``;
    ``heads_first`` says whether that function takes ``[B, heads, N, d]`` (SDPA) or ``[B, N, heads, d]``.
    """

    module: nn.Module
    split: Split
    hook: tuple[str, str] = ("torch.nn.functional", "scaled_dot_product_attention")
    heads_first: bool = True


def image_text_probs(
    q: Tensor, k: Tensor, image: slice, text: slice, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """``softmax(q_img k_txtᵀ · scale)`` over the text keys, from ``q, k: [B, heads, N, d]`` → ``[B, heads, Ni, Nt]``.

    Computed in float32 so the rows sum to 1 even for a bf16 model; differentiable."""
    q_img, k_txt = q[:, :, image].float(), k[:, :, text].float()
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q_img, k_txt.transpose(-1, -2)) * scale
    if attn_mask is not None:
        mask = attn_mask[..., image, text]
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return logits.softmax(dim=-1)


class _CapturingProcessor:
    """Wraps a stock attention processor: runs it unchanged, recording the image→text map of its attention call."""

    def __init__(self, inner, name: str, site: AttentionSite, store: dict[str, Tensor]):
        self.inner = inner
        self.name = name
        self.site = site
        self.store = store

    def __getattr__(self, item):
        # Processors carry attributes diffusers reads (e.g. ``_attention_backend``): look them up on the stock one.
        if item == "inner":  # not yet set (e.g. during copy): avoid recursing into ourselves
            raise AttributeError(item)
        return getattr(self.inner, item)

    def __call__(self, attn, *args, **kwargs):
        image, text = self.site.split(args, kwargs)
        owner = sys.modules[self.site.hook[0]]
        stock = getattr(owner, self.site.hook[1])
        recorded = False

        def spy(query, key, value, *a, **kw):
            nonlocal recorded
            if not recorded:  # the first attention call of this processor is the one that mixes image and text
                recorded = True
                q, k = (query, key) if self.site.heads_first else (query.transpose(1, 2), key.transpose(1, 2))
                self.store[self.name] = image_text_probs(q, k, image, text, kw.get("attn_mask"), kw.get("scale"))
            return stock(query, key, value, *a, **kw)

        setattr(owner, self.site.hook[1], spy)
        try:
            return self.inner(attn, *args, **kwargs)
        finally:
            setattr(owner, self.site.hook[1], stock)


@contextlib.contextmanager
def capture(sites: dict[str, AttentionSite], layers: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
    """Wrap the processors of ``layers`` (default: all ``sites``); yield the dict each forward fills.

    A later forward inside the same block overwrites the maps of the earlier one."""
    names = list(sites) if layers is None else list(layers)
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise KeyError(f"no capturable attention layer {unknown}; choose from attention_layers(): {list(sites)}")
    store: dict[str, Tensor] = {}
    stock = {n: sites[n].module.processor for n in names}
    try:
        for n in names:
            # Assigned directly (not set_processor) so diffusers does not re-validate or reset anything.
            sites[n].module.processor = _CapturingProcessor(stock[n], n, sites[n], store)
        yield store
    finally:
        for n, proc in stock.items():
            sites[n].module.processor = proc


class CapturesAttention:
    """Mixin for denoisers: implements the contract's capture API from one method, :meth:`attention_sites`."""

    def attention_sites(self) -> dict[str, AttentionSite]:
        raise NotImplementedError

    def attention_layers(self) -> list[str]:
        return list(self.attention_sites())

    @contextlib.contextmanager
    def capture_attention(self, layers: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
        with capture(self.attention_sites(), layers) as store:
            yield store


__all__ = ["AttentionSite", "CapturesAttention", "capture", "cross_split", "image_text_probs", "image_then_text"]
