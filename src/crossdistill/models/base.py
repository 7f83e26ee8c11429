"""The one contract every model family speaks (DESIGN.md §4).

A *space* is everything that defines where a diffusion model lives: a latent codec (VAE + shift/scale +
downsampling factor), a resolution, a denoiser family (parameterisation and noise schedule) and its prompt
encoder. Losses and trainers only ever talk to these interfaces, never to a family by name.

Conventions, fixed for every family:
- pixels are ``[B, 3, H, W]`` in ``[-1, 1]``;
- latents are *normalised* (after the family's VAE shift and scale), ``[B, C, h, w]``;
- time ``t`` is a float tensor ``[B]`` in ``[0, 1]``: 0 is clean data, 1 is (almost) pure noise. Each family maps
  it onto its own noise level (DDPM timestep index, flow-matching sigma with its time shift, ...);
- ``denoise`` always returns an **x0-prediction** in normalised latent space, whatever the network predicts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from crossdistill.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------------
# Prompt conditioning


@dataclass
class PromptEmbeds:
    """Batched text conditioning of one family: a dict of tensors whose first dim is the batch.

    Only tensors, so a batch can be cached to safetensors and sliced/concatenated without knowing the family.
    Typical keys: ``encoder_hidden_states`` ``[B, L, D]``, ``pooled`` ``[B, D]``, ``text_ids`` (FLUX),
    ``add_time_ids`` (SDXL).
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index) -> PromptEmbeds:
        return PromptEmbeds({k: v[index] for k, v in self.tensors.items()})

    def to(self, device=None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        # Only floating tensors change dtype (ids stay integer).
        return PromptEmbeds(
            {
                k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
                for k, v in self.tensors.items()
            }
        )

    def repeat(self, n: int) -> PromptEmbeds:
        """Each row repeated ``n`` times (``repeat_interleave``), e.g. several seeds per prompt."""
        return PromptEmbeds({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        keys = items[0].tensors.keys()
        return PromptEmbeds({k: torch.cat([it.tensors[k] for it in items], dim=0) for k in keys})


class PromptEncoder(nn.Module, ABC):
    """Text → :class:`PromptEmbeds`. Frozen in every training job of this project."""

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode a batch of prompts (the empty string is the unconditional prompt for CFG)."""

    @torch.no_grad()
    def encode_cached(self, prompts: Sequence[str], batch_size: int = 256, cache: bool = True) -> PromptEmbeds:
        """Encode many prompts in batches without gradients, through an on-disk cache.

        Prompt sets are re-encoded by every job of a project (Bridge, each distillation, evaluation); the cache
        keys them by :meth:`fingerprint` and the prompt list, under ``$CROSSDISTILL_CACHE`` (default
        ``~/.cache/crossdistill``). ``CROSSDISTILL_NO_CACHE=1`` or ``cache=False`` turns it off."""
        prompts = list(prompts)
        path = _prompt_cache_path(self, prompts) if cache and os.environ.get("CROSSDISTILL_NO_CACHE") != "1" else None
        if path is not None and path.is_file():
            try:
                device = next(self.parameters(), torch.empty(0)).device
                return PromptEmbeds(load_file(path, device=str(device)))
            except Exception:  # a torn or foreign file is re-made, never trusted
                path.unlink(missing_ok=True)
        chunks = [self.encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        embeds = PromptEmbeds.cat(chunks)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous().cpu() for k, v in embeds.tensors.items()}, tmp)
            os.replace(tmp, path)  # atomic: a killed job leaves no half-written cache entry
        return embeds

    def fingerprint(self) -> str:
        """Identity of this encoder for caching: its class, component configs and a checksum of its weights.

        The weight checksum reads every parameter, so it is remembered until a parameter is written to in place
        (its version counter moves) or replaced; a job calls this once per prompt set."""
        params = sorted(self.named_parameters())
        versions = tuple((name, p.data_ptr(), p._version) for name, p in params)
        memo = getattr(self, "_weights_digest", None)
        if memo is None or memo[0] != versions:
            w = hashlib.sha256()
            for name, p in params:
                w.update(f"{name}{tuple(p.shape)}{p.detach().sum(dtype=torch.float64).item():.12e}".encode())
            memo = self._weights_digest = (versions, w.hexdigest())
        h = hashlib.sha256(type(self).__qualname__.encode())
        for name, module in sorted(self.named_children()):
            config = getattr(module, "config", None)
            h.update(name.encode())
            h.update(repr(config.to_dict() if hasattr(config, "to_dict") else config).encode())
        h.update(memo[1].encode())
        for name in sorted(vars(self)):
            tok = getattr(self, name)
            if hasattr(tok, "model_max_length"):  # tokenizers: their vocabulary size and length limit
                h.update(f"{name}{len(tok)}{tok.model_max_length}".encode())
        return h.hexdigest()[:32]


def _prompt_cache_path(encoder: PromptEncoder, prompts: list[str]) -> Path:
    root = Path(os.environ.get("CROSSDISTILL_CACHE") or Path.home() / ".cache" / "crossdistill") / "prompts"
    key = hashlib.sha256((encoder.fingerprint() + "\0" + "\0".join(prompts)).encode()).hexdigest()[:40]
    return root / f"{key}.safetensors"


# --------------------------------------------------------------------------------------------------------------------
# Latent codec


class LatentCodec(nn.Module):
    """Owns "pixels → raw VAE latents → normalised latents" and back, with the VAE's shift and scale.

    ``normalised = (raw - shift) * scale``. ``vae`` is a diffusers ``AutoencoderKL`` (frozen everywhere here).
    """

    def __init__(self, vae: nn.Module, scale: float, shift: float = 0.0):
        super().__init__()
        self.vae = vae
        self.scale = float(scale)
        self.shift = float(shift)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Pixel size of one latent cell (8 for SD-style VAEs)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] → normalised latents ``[B, C, H/f, W/f]`` (posterior mean unless ``sample``)."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        raw = dist.sample(generator) if sample else dist.mean
        return (raw - self.shift) * self.scale

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents → pixels in [-1, 1] (not clamped, so gradients stay exact)."""
        raw = latents / self.scale + self.shift
        return self.vae.decode(raw.to(self.vae.dtype)).sample


# --------------------------------------------------------------------------------------------------------------------
# Denoiser


class Denoiser(nn.Module, ABC):
    """A family's backbone behind the x0 contract. Subclasses override only what differs (one class per family).

    ``parameterisation`` is one of ``"eps"``, ``"v"`` (DDPM families) or ``"flow"`` (rectified flow, target
    ``eps - x0``). ``raw`` runs the network in its own parameterisation; ``to_x0``/``from_x0`` convert.
    """

    parameterisation: str

    # ---- noise schedule -------------------------------------------------------------------------------------------
    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Signal and noise coefficients ``(a, s)`` with ``x_t = a * x0 + s * eps``; each ``[B]``."""

    def noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_t = a(t) x0 + s(t) eps`` with ``x0, eps: [B, C, h, w]``, ``t: [B]``."""
        a, s = (c.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) for c in self.alpha_sigma(t))
        return a * x0 + s * eps

    def sample_time(
        self, batch_size: int, generator: torch.Generator | None = None, t_min: float = 0.0, t_max: float = 1.0
    ) -> Tensor:
        """Training times ``[B]`` in ``[t_min, t_max]``. Default uniform; flow families may override."""
        u = torch.rand(batch_size, generator=generator, device=generator.device if generator else "cpu")
        return t_min + (t_max - t_min) * u

    # ---- parameterisation ------------------------------------------------------------------------------------------
    def to_x0(self, raw: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output in its parameterisation → x0-prediction."""
        a, s = (c.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) for c in self.alpha_sigma(t))
        if self.parameterisation == "eps":
            return (x_t - s * raw) / a
        if self.parameterisation == "v":  # v = a eps - s x0, with a^2 + s^2 = 1
            return a * x_t - s * raw
        if self.parameterisation == "flow":  # v = eps - x0, x_t = (1 - s) x0 + s eps
            return x_t - s * raw
        raise ValueError(f"unknown parameterisation {self.parameterisation!r}")

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 → what the network should output at ``(x_t, t)``; the exact inverse of :meth:`to_x0`."""
        a, s = (c.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) for c in self.alpha_sigma(t))
        if self.parameterisation == "eps":
            return (x_t - a * x0) / s
        if self.parameterisation == "v":
            return (a * x_t - x0) / s
        if self.parameterisation == "flow":
            return (x_t - x0) / s
        raise ValueError(f"unknown parameterisation {self.parameterisation!r}")

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Regression target of the family's own denoising loss (used for the fake score)."""
        a, s = (c.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) for c in self.alpha_sigma(t))
        if self.parameterisation == "eps":
            return eps
        if self.parameterisation == "v":
            return a * eps - s * x0
        if self.parameterisation == "flow":
            return eps - x0
        raise ValueError(f"unknown parameterisation {self.parameterisation!r}")

    # ---- network ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def raw(self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, guidance: Tensor | None = None) -> Tensor:
        """The network's own output (eps / v / flow velocity) for ``x_t: [B, C, h, w]``, ``t: [B]``.

        ``guidance`` is only read by guidance-distilled families (FLUX-dev's guidance embedding)."""

    def denoise(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
        uncond: PromptEmbeds | None = None,
    ) -> Tensor:
        """x0-prediction ``[B, C, h, w]``, with classifier-free guidance when ``guidance_scale != 1``.

        CFG is applied on x0; the conversion is affine in the output at fixed ``(x_t, t)`` so this equals CFG on
        eps / v / velocity. Families with a guidance embedding override this (no second pass)."""
        if guidance_scale == 1.0 or uncond is None:
            return self.to_x0(self.raw(x_t, t, cond), x_t, t)
        both = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), PromptEmbeds.cat([uncond, cond]))
        raw_u, raw_c = both.chunk(2)
        return self.to_x0(raw_u + guidance_scale * (raw_c - raw_u), x_t, t)

    def loss(self, x0: Tensor, cond: PromptEmbeds, t: Tensor, eps: Tensor) -> Tensor:
        """The family's own denoising loss (mean squared error in its parameterisation), a scalar."""
        x_t = self.noise(x0, t, eps)
        return (self.raw(x_t, t, cond).float() - self.target(x0, eps, t).float()).pow(2).mean()

    # ---- attention capture -----------------------------------------------------------------------------------------
    @abstractmethod
    def attention_layers(self) -> list[str]:
        """Names of the layers whose image→text attention can be captured, in network order."""

    @abstractmethod
    @contextlib.contextmanager
    def capture_attention(self, layers: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
        """Within the block, every forward records image-query → text-key attention probabilities.

        Yields a dict filled during the forward: ``{layer: [B, heads, N_image, N_text]}``, softmax over the text
        keys (rows sum to 1), differentiable. The wrapped model's output is bit-identical to the unwrapped one.
        ``layers=None`` captures every layer of :meth:`attention_layers`."""

    @property
    def backbone(self) -> nn.Module:
        """The diffusers network (UNet / transformer) being wrapped."""
        return self.model


# --------------------------------------------------------------------------------------------------------------------
# Space


class Space(nn.Module):
    """A family's full latent space: codec + denoiser + prompt encoder + the resolution it works at.

    Subclasses (one per family, registered in :mod:`crossdistill.models.registry`) implement loading from a
    diffusers folder or hub id (:meth:`from_pretrained`), saving (:meth:`save_pretrained`) and a tiny random build
    for tests (:meth:`tiny`).
    """

    family: str = "?"

    def __init__(self, codec: LatentCodec, denoiser: Denoiser, prompt_encoder: PromptEncoder, resolution: int):
        super().__init__()
        self.codec = codec
        self.denoiser = denoiser
        self.prompt_encoder = prompt_encoder
        self.resolution = int(resolution)
        self.latent_shape  # noqa: B018 - validates the resolution against the VAE factor now, not mid-training

    # ---- geometry --------------------------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one normalised latent at this space's resolution."""
        f = self.codec.downsample
        if self.resolution % f or self.resolution <= 0:
            lo, hi = max(f, self.resolution // f * f), (self.resolution // f + 1) * f
            raise ConfigError(
                f"{self.family}: resolution {self.resolution} is not a multiple of the VAE factor {f}; "
                f"use {lo} or {hi}"
            )
        return (self.codec.latent_channels, self.resolution // f, self.resolution // f)

    def describe(self) -> dict:
        """A JSON-able identity of the space, recorded in Bridge configs to refuse mismatched loads."""
        c, h, w = self.latent_shape
        return {
            "family": self.family,
            "latent_channels": c,
            "latent_size": h,
            "resolution": self.resolution,
            "vae_scale": self.codec.scale,
            "vae_shift": self.codec.shift,
            "downsample": self.codec.downsample,
            "parameterisation": self.denoiser.parameterisation,
        }

    # ---- convenience -----------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        return self.prompt_encoder.encode(list(prompts))

    def null_prompt(self, batch_size: int) -> PromptEmbeds:
        """Unconditional (empty-prompt) embeddings for CFG, repeated for the batch."""
        return self.prompt_encoder.encode([""]).repeat(batch_size)

    @torch.no_grad()
    def sample(
        self,
        cond: PromptEmbeds,
        num_steps: int,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Multi-step sampler (deterministic DDIM / flow Euler in x0 form) → normalised latents ``[B, C, h, w]``.

        Deterministic under ``generator`` (or the given ``noise``). ``num_steps=1`` is one x0-prediction from t=1.
        """
        batch = len(cond)
        p = next(self.denoiser.parameters())
        if noise is None:
            noise = torch.randn((batch, *self.latent_shape), generator=generator, device=p.device, dtype=torch.float32)
        x = noise.to(device=p.device, dtype=p.dtype)
        uncond = self.null_prompt(batch).to(p.device, p.dtype) if guidance_scale != 1.0 else None
        ts = torch.linspace(1.0, 0.0, num_steps + 1, device=p.device)
        x0 = x
        for i in range(num_steps):
            t = ts[i].expand(batch)
            x0 = self.denoiser.denoise(x, t, cond, guidance_scale=guidance_scale, uncond=uncond)
            if i + 1 == num_steps:
                break
            # Re-noise deterministically: the eps implied by (x, x0) at t, carried to the next time.
            a, s = (c.view(-1, 1, 1, 1).to(x.dtype) for c in self.denoiser.alpha_sigma(t))
            eps = (x - a * x0) / s
            x = self.denoiser.noise(x0, ts[i + 1].expand(batch), eps)
        return x0

    # ---- persistence -----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> Space:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> Space:  # pragma: no cover - abstract
        """A tiny random space of the real classes for tests."""
        raise NotImplementedError
