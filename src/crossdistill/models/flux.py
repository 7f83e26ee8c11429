"""FLUX.1 dev / schnell: ``FluxTransformer2DModel`` on rectified flow, 2×2 latent packing, guidance embedding.

Latents stay ``[B, 16, h, w]`` outside; packing into ``[B, h/2 · w/2, 64]`` tokens, the image / text position
ids and unpacking all happen inside :meth:`FluxDenoiser.raw`. The time shift comes from the image sequence length
as FluxPipeline's dynamic shifting (``shift = exp(mu)``, ``mu`` from ``calculate_shift``), or the scheduler's
fixed ``shift`` (schnell). The transformer gets ``timestep = sigma`` (it multiplies by 1000 itself). FLUX-dev is
guidance-distilled: ``guidance_scale`` goes into its guidance embedding in one pass instead of CFG.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from crossdistill.models.attention import AttentionSite
from crossdistill.models.base import LatentCodec, PromptEmbeds
from crossdistill.models.loading import DiffusersSpace, codec_from_vae, tiny_vae
from crossdistill.models.registry import register_family
from crossdistill.models.sd3 import FlowDenoiser, flow_scheduler
from crossdistill.models.text import FluxPromptEncoder, tiny_clip, tiny_t5, tiny_tokenizer


def flux_shift(scheduler_config, image_seq_len: int) -> float:
    """The time shift FluxPipeline uses at this many image tokens (``exp(mu)`` with dynamic shifting)."""
    if not scheduler_config.get("use_dynamic_shifting", False):
        return float(scheduler_config.get("shift", 1.0))
    mu = calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return math.exp(mu)


def pack(x: Tensor) -> Tensor:
    """``[B, C, h, w]`` → ``[B, h/2 · w/2, 4C]`` (2×2 patches, FluxPipeline's ``_pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack`."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device) -> Tensor:
    """Position ids ``[h/2 · w/2, 3]`` of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxDenoiser(FlowDenoiser):
    """FluxTransformer2DModel behind the x0 contract. Attention tokens are ordered ``[text, image]``."""

    def __init__(self, model: FluxTransformer2DModel, scheduler, shift: float, **sampler):
        super().__init__(model, scheduler, shift, **sampler)
        self._num_text_tokens = 0  # set by every forward: single-stream blocks see text and image concatenated

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.model.config.guidance_embeds)

    def raw(self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, guidance: Tensor | None = None) -> Tensor:
        """``guidance`` ``[B]`` feeds FLUX-dev's guidance embedding (1.0 when not given); schnell ignores it."""
        dtype, (h, w) = self.model.dtype, x_t.shape[-2:]
        text = cond.tensors["encoder_hidden_states"].to(dtype)
        self._num_text_tokens = text.shape[1]
        if self.guidance_embeds:
            guidance = (guidance if guidance is not None else torch.ones_like(t)).to(x_t.device, dtype)
        out = self.model(
            hidden_states=pack(x_t.to(dtype)),
            timestep=self.sigma(t).to(dtype),
            guidance=guidance if self.guidance_embeds else None,
            pooled_projections=cond.tensors["pooled"].to(dtype),
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=image_ids(h, w, x_t.device).to(dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(x_t.dtype)

    def denoise(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
        uncond: PromptEmbeds | None = None,
    ) -> Tensor:
        """FLUX-dev: one pass with ``guidance_scale`` in the guidance embedding (``uncond`` unused); schnell: CFG."""
        if not self.guidance_embeds:
            return super().denoise(x_t, t, cond, guidance_scale, uncond)
        guidance = torch.full_like(t, float(guidance_scale), dtype=torch.float32)
        return self.to_x0(self.raw(x_t, t, cond, guidance=guidance), x_t, t)

    def _split(self, args: tuple, kwargs: dict) -> tuple[slice, slice]:
        n = self._num_text_tokens
        return slice(n, None), slice(0, n)

    def attention_sites(self) -> dict[str, AttentionSite]:
        # FluxAttnProcessor calls diffusers' dispatch_attention_fn with [B, N, heads, d] tensors.
        hook = ("diffusers.models.transformers.transformer_flux", "dispatch_attention_fn")
        sites = {}
        for prefix in ("transformer_blocks", "single_transformer_blocks"):
            for i, block in enumerate(getattr(self.model, prefix)):
                sites[f"{prefix}.{i}.attn"] = AttentionSite(block.attn, self._split, hook=hook, heads_first=False)
        return sites


@register_family("flux")
class FluxSpace(DiffusersSpace):
    """FLUX.1 dev / schnell (VAE scale / shift 0.3611 / 0.1159 from the VAE config); CLIP-L + T5 text."""

    pipeline_class = "FluxPipeline"
    backbone_subfolder = "transformer"
    backbone_class = FluxTransformer2DModel

    @classmethod
    def required_subfolders(cls) -> tuple[str, ...]:
        return (*super().required_subfolders(), "text_encoder_2", "tokenizer_2")

    @classmethod
    def build_prompt_encoder(cls, folder: Path, backbone, torch_dtype, **options) -> FluxPromptEncoder:
        return FluxPromptEncoder.from_folder(folder, torch_dtype, **options)

    @classmethod
    def build_denoiser(cls, backbone, scheduler, codec: LatentCodec, resolution: int, **options) -> FluxDenoiser:
        image_seq_len = (resolution // codec.downsample // 2) ** 2
        return FluxDenoiser(backbone, scheduler, flux_shift(scheduler.config, image_seq_len), **options)

    @classmethod
    def tiny(cls, seed: int = 0, guidance_embeds: bool = True) -> FluxSpace:
        """Tiny random FLUX space at 16 px (latents 16×8×8 → 16 tokens): dev-like with ``guidance_embeds``
        (dynamic shifting), schnell-like without (fixed shift 1)."""
        encoder = FluxPromptEncoder(
            tiny_clip(seed, 16), tiny_tokenizer(), tiny_t5(seed + 1, 32), tiny_tokenizer(), max_sequence_length=12
        )
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        ).eval()  # fmt: skip
        scheduler = (
            flow_scheduler(3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
            if guidance_embeds
            else flow_scheduler(1.0)
        )
        codec = codec_from_vae(tiny_vae(seed, 16, 0.3611, 0.1159))
        return cls(codec, cls.build_denoiser(transformer, scheduler, codec, 16), encoder, resolution=16)
