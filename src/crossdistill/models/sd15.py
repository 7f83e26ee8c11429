"""SD 1.x / 2.x: ``UNet2DConditionModel`` on the DDPM schedule, eps or v prediction, one CLIP (or any) encoder.

Time ``t ∈ [0, 1]`` maps to the float timestep ``t · (T - 1)`` (``t = 1`` → 999, the DMD2 one-step generator's
timestep); ``alpha_bar`` is interpolated linearly between integer timesteps so every conversion is exact at any
``t``. :class:`DDPMDenoiser` is shared with SDXL, which adds its extra UNet conditioning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor

from crossdistill.errors import ModelLoadError
from crossdistill.models.attention import AttentionSite, CapturesAttention, cross_split
from crossdistill.models.base import Denoiser, LatentCodec, PromptEmbeds
from crossdistill.models.loading import DiffusersSpace, check_text_width, codec_from_vae, tiny_vae
from crossdistill.models.registry import register_family
from crossdistill.models.text import GenericTextEncoder, tiny_clip, tiny_tokenizer

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}


class DDPMDenoiser(CapturesAttention, Denoiser):
    """A UNet on a DDPM ``alphas_cumprod`` schedule; the scheduler's ``prediction_type`` picks eps or v."""

    def __init__(self, model: UNet2DConditionModel, scheduler):
        super().__init__()
        self.model = model
        self.scheduler = scheduler  # kept for its config (saved with the folder), never stepped
        pred = scheduler.config.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise ModelLoadError(
                f"prediction_type {pred!r} is not supported: expected one of {list(PREDICTION_TYPES)}"
            )
        self.parameterisation = PREDICTION_TYPES[pred]
        # A plain float64 tensor, not a buffer: ``.to(bfloat16)`` on the module must not round the schedule.
        self._alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)

    @property
    def num_train_timesteps(self) -> int:
        return len(self._alphas_cumprod)

    def timestep(self, t: Tensor) -> Tensor:
        """The UNet's float timestep ``t · (T - 1)``."""
        return t.float() * (self.num_train_timesteps - 1)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ts = t.double() * (self.num_train_timesteps - 1)
        lo = ts.floor().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        ac = self._alphas_cumprod.to(t.device)
        w = ts - lo
        alpha_bar = ac[lo.long()] * (1 - w) + ac[hi.long()] * w
        return alpha_bar.sqrt().float(), (1 - alpha_bar).sqrt().float()

    def unet_kwargs(self, x_t: Tensor, cond: PromptEmbeds) -> dict:
        """Extra UNet inputs beyond the text states (SDXL's ``added_cond_kwargs``)."""
        return {}

    def raw(self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, guidance: Tensor | None = None) -> Tensor:
        dtype = self.model.dtype
        out = self.model(
            x_t.to(dtype),
            self.timestep(t),
            encoder_hidden_states=cond.tensors["encoder_hidden_states"].to(dtype),
            return_dict=False,
            **self.unet_kwargs(x_t, cond),
        )[0]
        return out.to(x_t.dtype)

    def attention_sites(self) -> dict[str, AttentionSite]:
        # Cross-attention ("attn2") of every transformer block: image queries, text keys. diffusers registers the
        # mid block after the up blocks, so names are sorted into the order the forward runs them.
        names = [
            name
            for name, module in self.model.named_modules()
            if name.endswith("attn2") and getattr(module, "is_cross_attention", False)
        ]
        names.sort(key=lambda n: ("down_blocks", "mid_block", "up_blocks").index(n.split(".")[0]))
        return {name: AttentionSite(self.model.get_submodule(name), cross_split) for name in names}


class SD15Denoiser(DDPMDenoiser):
    """SD 1.x / 2.x UNet: conditioned on ``encoder_hidden_states`` only."""


def tiny_unet(seed: int, cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    """A 2-level UNet (one cross-attention level each way) for 4-channel 8×8 latents."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8, **extra,
    ).eval()  # fmt: skip


def ddpm_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The SD training schedule: scaled-linear betas 0.00085–0.012 over 1000 steps."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )  # fmt: skip


@register_family("sd15")
class SD15Space(DiffusersSpace):
    """Stable Diffusion 1.x / 2.x (eps or v prediction; VAE scale 0.18215 from the VAE config).

    The text encoder may be CLIP or any transformers encoder (:class:`GenericTextEncoder`): the UNet's
    ``cross_attention_dim`` must equal its hidden size."""

    pipeline_class = "StableDiffusionPipeline"
    backbone_subfolder = "unet"
    backbone_class = UNet2DConditionModel

    @classmethod
    def build_prompt_encoder(cls, folder: Path, backbone, torch_dtype, **options) -> GenericTextEncoder:
        encoder = GenericTextEncoder.from_folder(folder, torch_dtype)
        width = backbone.config.cross_attention_dim
        check_text_width(folder, encoder.hidden_size, width, "the UNet's cross_attention_dim")
        return encoder

    @classmethod
    def build_denoiser(cls, backbone, scheduler, codec: LatentCodec, resolution: int, **options) -> SD15Denoiser:
        return SD15Denoiser(backbone, scheduler)

    def index_extra(self) -> dict:
        # Lets unmodified diffusers load the folder as a StableDiffusionPipeline without a safety checker.
        return {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}

    @classmethod
    def tiny(
        cls, seed: int = 0, text_encoder: GenericTextEncoder | None = None, prediction_type: str = "epsilon"
    ) -> SD15Space:
        """Tiny random SD1.5 space at 16 px (latents 4×8×8): real classes, CPU forward in milliseconds.

        ``text_encoder`` defaults to a tiny CLIP; pass e.g. ``GenericTextEncoder.minilm()`` for the emoji world."""
        encoder = text_encoder or GenericTextEncoder(tiny_clip(seed, 32), tiny_tokenizer())
        unet = tiny_unet(seed, cross_attention_dim=encoder.hidden_size)
        codec = codec_from_vae(tiny_vae(seed, 4, 0.18215))
        return cls(codec, SD15Denoiser(unet, ddpm_scheduler(prediction_type)), encoder, resolution=16)
