"""SDXL: the SD DDPM UNet plus added conditioning (pooled CLIP-G text and size/crop time ids), two CLIP encoders.

``add_time_ids`` = (original size, crop top-left, target size) = ``(H, W, 0, 0, H, W)`` from the latent size, as
StableDiffusionXLPipeline's defaults; a ``PromptEmbeds`` key ``add_time_ids`` ``[B, 6]`` overrides it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from crossdistill.models.base import LatentCodec, PromptEmbeds
from crossdistill.models.loading import DiffusersSpace, codec_from_vae, read_json, tiny_vae
from crossdistill.models.registry import register_family
from crossdistill.models.sd15 import DDPMDenoiser, ddpm_scheduler, tiny_unet
from crossdistill.models.text import SDXLPromptEncoder, tiny_clip, tiny_tokenizer


class SDXLDenoiser(DDPMDenoiser):
    """SDXL UNet: ``added_cond_kwargs`` = pooled text embeds + time ids. ``vae_scale_factor`` turns latent size
    into the pixel sizes of the time ids."""

    def __init__(self, model: UNet2DConditionModel, scheduler, vae_scale_factor: int = 8):
        super().__init__(model, scheduler)
        self.vae_scale_factor = int(vae_scale_factor)

    def unet_kwargs(self, x_t: Tensor, cond: PromptEmbeds) -> dict:
        time_ids = cond.tensors.get("add_time_ids")
        if time_ids is None:
            h, w = (n * self.vae_scale_factor for n in x_t.shape[-2:])
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=x_t.device).expand(x_t.shape[0], 6)
        dtype = self.model.dtype
        return {"added_cond_kwargs": {"text_embeds": cond.tensors["pooled"].to(dtype), "time_ids": time_ids.to(dtype)}}


@register_family("sdxl")
class SDXLSpace(DiffusersSpace):
    """SDXL base (VAE scale 0.13025 from the VAE config); CLIP-L + CLIP-G text."""

    pipeline_class = "StableDiffusionXLPipeline"
    backbone_subfolder = "unet"
    backbone_class = UNet2DConditionModel

    @classmethod
    def required_subfolders(cls) -> tuple[str, ...]:
        return (*super().required_subfolders(), "text_encoder_2", "tokenizer_2")

    @classmethod
    def build_prompt_encoder(cls, folder: Path, backbone, torch_dtype, **options) -> SDXLPromptEncoder:
        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        zeros = index.get("force_zeros_for_empty_prompt", True)
        return SDXLPromptEncoder.from_folder(folder, torch_dtype, force_zeros_for_empty_prompt=zeros)

    @classmethod
    def build_denoiser(cls, backbone, scheduler, codec: LatentCodec, resolution: int, **options) -> SDXLDenoiser:
        return SDXLDenoiser(backbone, scheduler, vae_scale_factor=codec.downsample, **options)

    def index_extra(self) -> dict:
        return {"force_zeros_for_empty_prompt": self.prompt_encoder.force_zeros_for_empty_prompt}

    @classmethod
    def tiny(cls, seed: int = 0) -> SDXLSpace:
        """Tiny random SDXL space at 16 px (latents 4×8×8), two tiny CLIPs (8 + 16 wide, pooled 16)."""
        encoder = SDXLPromptEncoder(
            tiny_clip(seed, 8), tiny_tokenizer(), tiny_clip(seed + 1, 16, projection=True), tiny_tokenizer()
        )
        unet = tiny_unet(
            seed, cross_attention_dim=8 + 16, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4, use_linear_projection=True,
        )  # fmt: skip
        codec = codec_from_vae(tiny_vae(seed, 4, 0.13025))
        denoiser = SDXLDenoiser(unet, ddpm_scheduler(), vae_scale_factor=codec.downsample)
        return cls(codec, denoiser, encoder, resolution=16)
