"""The Bridge ``B_φ(z_s) = P_φ(D_s(z_s))``: Student latents into the Teacher's normalised latent space.

DESIGN.md §2. Four kinds share one module so trainers never ask which one they hold:

- ``prior_projector`` (the paper's Bridge, default): the Student's own VAE decoder ``D_s``, frozen, turns ``z_s``
  into an image (or a late decoder feature map) — a spatial prior — and a compact learnable projector ``P_φ``
  (strided stem + residual blocks) maps it onto the Teacher's latent grid. The stride absorbs the resolution change
  (512 px image → 128×128 latent of a 1024 px Teacher: stride 4).
- ``projector_only``: a conv net straight from ``z_s`` to ``ẑ_t`` (the community "latent interposer" baseline).
- ``decode_encode``: ``E_t(resize(D_s(z_s)))`` with both VAEs frozen: exact up to the VAEs, no training, heavy.
- ``identity``: Student and Teacher share one space (shared-space DMD2).

Only the projector is saved: ``D_s`` and ``E_t`` belong to the spaces and are *attached* after loading, which is
also where a Bridge built for other spaces is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from crossdistill.errors import ConfigError, ModelLoadError, SpaceMismatchError
from crossdistill.models.base import Space

BRIDGE_KINDS = ("prior_projector", "projector_only", "decode_encode", "identity")
TRAINABLE_KINDS = ("prior_projector", "projector_only")


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, with a skip: the projector's unit of depth."""

    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(32, channels)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _resampler(in_ch: int, out_ch: int, in_size: int, out_size: int) -> nn.Module:
    """Conv stem that takes an ``in_size`` grid to ``out_size``: strided convs down, nearest+conv up."""
    layers: list[nn.Module] = []
    ch = in_ch
    if in_size > out_size:
        stride = in_size // out_size
        if in_size % out_size:
            raise ConfigError(
                f"bridge: the Student grid {in_size} is not a multiple of the Teacher latent grid {out_size}; "
                "choose resolutions whose ratio is a whole number (e.g. 512 px Student, 1024 px Teacher)"
            )
        # Powers of two become a chain of stride-2 convs (smoother than one big-kernel conv); others one conv.
        if stride & (stride - 1) == 0:
            for _ in range(int(math.log2(stride))):
                layers += [nn.Conv2d(ch, out_ch, 4, stride=2, padding=1), nn.SiLU()]
                ch = out_ch
        else:
            layers += [nn.Conv2d(ch, out_ch, stride, stride=stride), nn.SiLU()]
            ch = out_ch
    elif in_size < out_size:
        if out_size % in_size:
            raise ConfigError(
                f"bridge: the Teacher latent grid {out_size} is not a multiple of the Student grid {in_size}; "
                "choose resolutions whose ratio is a whole number"
            )
        layers += [nn.Upsample(scale_factor=out_size // in_size, mode="nearest")]
    layers += [nn.Conv2d(ch, out_ch, 3, padding=1)]
    return nn.Sequential(*layers)


class Projector(nn.Module):
    """``P_φ``: resample to the Teacher grid, residual blocks, then a conv to the Teacher's latent channels."""

    def __init__(self, in_ch: int, out_ch: int, in_size: int, out_size: int, hidden: int, num_blocks: int):
        super().__init__()
        self.stem = _resampler(in_ch, hidden, in_size, out_size)
        self.blocks = nn.Sequential(*[ResBlock(hidden) for _ in range(num_blocks)])
        groups = math.gcd(32, hidden)
        self.head = nn.Sequential(nn.GroupNorm(groups, hidden), nn.SiLU(), nn.Conv2d(hidden, out_ch, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def prior_geometry(space: dict, prior_up_blocks: int | None, decoder_channels: list[int]) -> tuple[int, int]:
    """Channels and grid size of what the frozen decoder prior hands to the projector."""
    if prior_up_blocks is None:
        return 3, space["resolution"]
    # diffusers' Decoder runs up-blocks from the widest channels down; each block but the last doubles the grid.
    num_up = len(decoder_channels)
    if not 1 <= prior_up_blocks <= num_up:
        raise ValueError(
            f"prior_up_blocks must be in [1, {num_up}] (the Student decoder's up-blocks), got {prior_up_blocks}"
        )
    rev = list(reversed(decoder_channels))
    return rev[prior_up_blocks - 1], space["latent_size"] * 2 ** min(prior_up_blocks, num_up - 1)


def decoder_features(vae, z: Tensor, up_blocks: int) -> Tensor:
    """A diffusers VAE's decoder on *unscaled* latents ``z``, stopped after its first ``up_blocks`` up-blocks.

    Each up-block skipped saves convolutions at the largest grids. SD 1.5 at 512 px, batch 1 (counted): the whole
    decode is 2.52 TFLOP, ``up_blocks=3`` (256 channels at 512×512) 1.95 TFLOP, ``up_blocks=2`` (512 channels at
    256×256) 1.09 TFLOP, ``up_blocks=1`` (512 channels at 128×128) 0.31 TFLOP."""
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    dec = vae.decoder
    h = dec.mid_block(dec.conv_in(z))
    for block in dec.up_blocks[:up_blocks]:
        h = block(h)
    return h


class Bridge(ModelMixin, ConfigMixin):
    """``ẑ_t = B_φ(z_s)``: ``[B, C_s, h_s, w_s]`` normalised Student latent → ``[B, C_t, h_t, w_t]`` normalised
    Teacher latent. Build with :meth:`build`, load with :meth:`load` (both attach the spaces' frozen VAEs)."""

    config_name = "bridge_config.json"

    @register_to_config
    def __init__(
        self,
        kind: str = "prior_projector",
        student_space: dict | None = None,  # Space.describe() of the Student (checked at attach time)
        teacher_space: dict | None = None,  # Space.describe() of the Teacher
        hidden_channels: int = 128,  # width of the projector's residual blocks
        num_blocks: int = 4,  # residual blocks in the projector
        prior_up_blocks: int | None = None,  # None: full decode to pixels; k: stop after k decoder up-blocks
        student_decoder_channels: list[int] | None = None,  # the Student VAE's block_out_channels (geometry)
    ):
        super().__init__()
        if kind not in BRIDGE_KINDS:
            raise ValueError(f"unknown bridge kind {kind!r}; choose one of {', '.join(BRIDGE_KINDS)}")
        if student_space is None or teacher_space is None:
            raise ValueError("a Bridge needs both spaces: build it with Bridge.build(kind, student, teacher)")
        s, t = student_space, teacher_space
        self.projector: nn.Module | None = None
        if kind == "prior_projector":
            in_ch, in_size = prior_geometry(s, prior_up_blocks, student_decoder_channels or [])
            self.projector = Projector(
                in_ch, t["latent_channels"], in_size, t["latent_size"], hidden_channels, num_blocks
            )
        elif kind == "projector_only":
            self.projector = Projector(
                s["latent_channels"],
                t["latent_channels"],
                s["latent_size"],
                t["latent_size"],
                hidden_channels,
                num_blocks,
            )
        elif kind == "identity":
            differs = [k for k in ("latent_channels", "latent_size", "vae_scale", "vae_shift") if s[k] != t[k]]
            if differs:
                raise SpaceMismatchError(
                    f"the identity bridge needs one shared latent space, but Student and Teacher differ in "
                    f"{', '.join(differs)}: use a cross-space kind (e.g. --kind prior_projector)"
                )
        # The spaces' codecs are kept outside the module tree: never saved, never trained, never counted.
        self._student: list[Space] = []
        self._teacher: list[Space] = []

    # ---- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, kind: str, student: Space, teacher: Space, **kwargs) -> Bridge:
        """A new Bridge between two spaces (projector randomly initialised), attached to their frozen VAEs."""
        bridge = cls(
            kind=kind,
            student_space=student.describe(),
            teacher_space=teacher.describe(),
            student_decoder_channels=list(student.codec.vae.config.block_out_channels),
            **kwargs,
        )
        return bridge.attach(student, teacher)

    @classmethod
    def load(cls, path: str | Path, student: Space, teacher: Space, **kwargs) -> Bridge:
        """Load a saved Bridge and attach it; a Bridge built for other spaces is a :class:`SpaceMismatchError`."""
        path = Path(path)
        if not (path / cls.config_name).is_file():
            raise ModelLoadError(
                f"{path} holds no Bridge ({cls.config_name} missing): pass the folder written by "
                "`crossdistill bridge train` (its run dir's bridge/ folder)"
            )
        config = cls.load_config(path)
        if config.get("kind") in TRAINABLE_KINDS:
            bridge = cls.from_pretrained(path, use_safetensors=True, **kwargs)
        else:
            # decode_encode / identity have no weights: save_pretrained wrote only the config.
            bridge = cls.from_config(config, **kwargs)
        return bridge.attach(student, teacher)

    def attach(self, student: Space, teacher: Space) -> Bridge:
        """Give the Bridge the spaces' frozen VAEs after checking they are the spaces it was built for."""
        for role, space, want in (
            ("Student", student, self.config.student_space),
            ("Teacher", teacher, self.config.teacher_space),
        ):
            have = space.describe()
            differs = [k for k in want if _differs(want[k], have.get(k))]
            if differs:
                detail = ", ".join(f"{k}: bridge {want[k]!r} vs model {have.get(k)!r}" for k in differs)
                raise SpaceMismatchError(
                    f"this Bridge was built for another {role} space ({detail}); train a Bridge for these models "
                    "with `crossdistill bridge train` or pass the matching --student/--teacher"
                )
        for codec in (student.codec, teacher.codec):
            codec.requires_grad_(False)
        self._student, self._teacher = [student], [teacher]
        return self

    # ---- forward ---------------------------------------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        return self.config.kind in TRAINABLE_KINDS

    def decoder_prior(self, z_s: Tensor) -> Tensor:
        """``D_s(z_s)``: the frozen Student decoder (full image, or features after ``prior_up_blocks``)."""
        codec = self._need(self._student, "Student").codec
        k = self.config.prior_up_blocks
        if k is None:
            return codec.decode(z_s)
        return decoder_features(codec.vae, (z_s / codec.scale + codec.shift).to(codec.vae.dtype), k)

    def forward(self, z_s: Tensor | None, prior: Tensor | None = None) -> Tensor:
        """``ẑ_t = B(z_s)``. ``prior``: a precomputed ``decoder_prior(z_s)`` for ``prior_projector`` (then ``z_s`` is
        not read): stage-1 training caches it, since the decoder is frozen and each image's ``z_s`` fixed."""
        kind = self.config.kind
        if kind == "identity":
            return z_s
        if kind == "projector_only":
            return self.projector(z_s)
        if kind == "prior_projector":
            prior = self.decoder_prior(z_s) if prior is None else prior
            return self.projector(prior.to(next(self.projector.parameters()).dtype))
        # decode_encode: exact path through both frozen VAEs, resized to the Teacher's resolution.
        teacher = self._need(self._teacher, "Teacher")
        image = self._need(self._student, "Student").codec.decode(z_s)
        if image.shape[-1] != teacher.resolution:
            image = F.interpolate(image, size=(teacher.resolution,) * 2, mode="bilinear", antialias=True)
        return teacher.codec.encode(image)

    @staticmethod
    def _need(spaces: list[Space], role: str) -> Space:
        if not spaces:
            raise RuntimeError(f"Bridge is not attached to a {role} space: use Bridge.build/Bridge.load")
        return spaces[0]


def _differs(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return b is None or a is None or abs(float(a) - float(b)) > 1e-6 * max(1.0, abs(float(a)))
    return a != b
