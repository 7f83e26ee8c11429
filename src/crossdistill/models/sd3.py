"""SD3 / SD3.5: ``SD3Transformer2DModel`` (MMDiT) trained by rectified flow with a time shift.

Time ``t ∈ [0, 1]`` maps to ``sigma = shift·t / (1 + (shift - 1)·t)`` (the scheduler's ``shift``, 3.0 for SD3);
``x_t = (1 - sigma) x0 + sigma eps``, the network predicts the velocity ``eps - x0`` and gets ``timestep =
sigma · 1000``. :class:`FlowDenoiser` (schedule + time sampler) is shared with FLUX.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor

from crossdistill.models.attention import AttentionSite, CapturesAttention, image_then_text
from crossdistill.models.base import Denoiser, LatentCodec, PromptEmbeds, PromptEncoder
from crossdistill.models.loading import DiffusersSpace, check_text_width, codec_from_vae, tiny_vae
from crossdistill.models.registry import register_family
from crossdistill.models.text import GenericTextEncoder, SD3PromptEncoder, tiny_clip, tiny_t5, tiny_tokenizer

TIME_SAMPLERS = ("logit_normal", "uniform")


class FlowDenoiser(CapturesAttention, Denoiser):
    """Rectified flow with a time shift; training times from a logit-normal (SD3 paper) or uniform sampler."""

    parameterisation = "flow"

    def __init__(
        self,
        model,
        scheduler,
        shift: float,
        time_sampler: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        super().__init__()
        if time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler {time_sampler!r}: choose one of {TIME_SAMPLERS}")
        self.model = model
        self.scheduler = scheduler  # kept for its config (saved with the folder), never stepped
        self.shift = float(shift)
        self.time_sampler = time_sampler
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)

    def sigma(self, t: Tensor) -> Tensor:
        t = t.float()
        return self.shift * t / (1 + (self.shift - 1) * t)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t)
        return 1 - sigma, sigma

    def sample_time(
        self, batch_size: int, generator: torch.Generator | None = None, t_min: float = 0.0, t_max: float = 1.0
    ) -> Tensor:
        if self.time_sampler == "uniform":
            return super().sample_time(batch_size, generator, t_min, t_max)
        device = generator.device if generator else "cpu"
        n = torch.randn(batch_size, generator=generator, device=device) * self.logit_std + self.logit_mean
        return t_min + (t_max - t_min) * torch.sigmoid(n)


class SD3Denoiser(FlowDenoiser):
    """SD3Transformer2DModel: ``timestep = sigma · 1000``, pooled text projections; joint attention [image, text]."""

    def raw(self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, guidance: Tensor | None = None) -> Tensor:
        dtype = self.model.dtype
        out = self.model(
            hidden_states=x_t.to(dtype),
            timestep=self.sigma(t) * 1000,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"].to(dtype),
            pooled_projections=cond.tensors["pooled"].to(dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def attention_sites(self) -> dict[str, AttentionSite]:
        # The joint attention of each block (SD3.5's extra image-only "attn2" never sees text).
        return {
            f"transformer_blocks.{i}.attn": AttentionSite(block.attn, image_then_text)
            for i, block in enumerate(self.model.transformer_blocks)
        }


def flow_scheduler(shift: float = 3.0, **dynamic) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **dynamic)


@register_family("sd3")
class SD3Space(DiffusersSpace):
    """SD3 / SD3.5 (Medium, Large). VAE scale / shift (1.5305 / 0.0609) are read from the VAE config.

    Text: CLIP-L + CLIP-G (+ optional T5) as StableDiffusion3Pipeline, or one generic encoder
    (:class:`GenericTextEncoder`, a folder with only ``text_encoder/``) whose hidden size equals the transformer's
    ``joint_attention_dim`` and ``pooled_projection_dim``."""

    pipeline_class = "StableDiffusion3Pipeline"
    backbone_subfolder = "transformer"
    backbone_class = SD3Transformer2DModel

    @classmethod
    def build_prompt_encoder(cls, folder: Path, backbone, torch_dtype, **options) -> PromptEncoder:
        if not (folder / "text_encoder_2").is_dir():
            encoder = GenericTextEncoder.from_folder(folder, torch_dtype)
            cfg = backbone.config
            check_text_width(folder, encoder.hidden_size, cfg.joint_attention_dim, "the joint_attention_dim")
            check_text_width(folder, encoder.hidden_size, cfg.pooled_projection_dim, "the pooled_projection_dim")
            return encoder
        return SD3PromptEncoder.from_folder(
            folder, torch_dtype, joint_attention_dim=backbone.config.joint_attention_dim, **options
        )

    @classmethod
    def build_denoiser(cls, backbone, scheduler, codec: LatentCodec, resolution: int, **options) -> SD3Denoiser:
        return SD3Denoiser(backbone, scheduler, shift=scheduler.config.shift, **options)

    def index_extra(self) -> dict:
        # A generic encoder leaves SD3's other encoder slots empty; CLIP/T5 builds fill them from components().
        slots = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
        return {s: [None, None] for s in slots if s not in self.prompt_encoder.components()}

    @classmethod
    def tiny(
        cls, seed: int = 0, text_encoder: GenericTextEncoder | None = None, t5: bool = True, **options
    ) -> SD3Space:
        """Tiny random SD3.5-style space at 16 px (latents 16×8×8, qk-norm, one dual-attention block).

        Default text: tiny CLIP-L + CLIP-G (+ T5 unless ``t5=False``); pass e.g. ``GenericTextEncoder.minilm()``
        for the emoji world (the transformer is then built for its hidden size)."""
        if text_encoder is not None:
            encoder: PromptEncoder = text_encoder
            text_dim = pooled_dim = text_encoder.hidden_size
        else:
            text_dim, pooled_dim = 32, 8 + 16
            encoder = SD3PromptEncoder(
                tiny_clip(seed, 8, projection=True), tiny_tokenizer(),
                tiny_clip(seed + 1, 16, projection=True), tiny_tokenizer(),
                tiny_t5(seed + 2, text_dim) if t5 else None, tiny_tokenizer() if t5 else None,
                joint_attention_dim=text_dim, max_sequence_length=16,
            )  # fmt: skip
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=text_dim, caption_projection_dim=16,
            pooled_projection_dim=pooled_dim, pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,),
        ).eval()  # fmt: skip
        codec = codec_from_vae(tiny_vae(seed, 16, 1.5305, 0.0609))
        scheduler = flow_scheduler(3.0)
        return cls(codec, SD3Denoiser(transformer, scheduler, shift=3.0, **options), encoder, resolution=16)
