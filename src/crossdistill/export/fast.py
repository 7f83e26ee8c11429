"""The one-step Student's inference fast path: noise + prompt embeddings → images, as fast as the GPU allows.

A one-step Student (DESIGN.md §3) is one UNet call at the conditioning timestep, the x0 formula, and one VAE
decode. At 512 px batch 1 the arithmetic is ~3.3 TFLOP (~4 ms on an H100), but eager diffusers spends ~50 ms,
most of it launching ~2000 small kernels from Python and running GroupNorm/SiLU/adds as separate passes over
memory. The options below remove those costs one at a time (docs/performance.md has the measured effect of each):

- ``compile``: ``torch.compile`` of the *whole* step (UNet, x0 formula, decode) fuses the elementwise and
  normalisation passes into neighbouring kernels;
- ``cuda_graphs``: one manually captured CUDA graph per input shape, replayed from static input buffers, so a
  call costs one launch instead of thousands (the step has no data-dependent control flow, so this is exact);
- ``cudnn_benchmark`` / ``cudnn_benchmark_limit``: cuDNN times its candidate algorithms for each convolution shape
  at the first call and keeps the fastest; the limit (a global torch setting, ``torch.backends.cudnn.benchmark_limit``)
  is how many candidates it times: torch's default 10, the runner's default ``0`` every one it has (the first call
  takes ~25 s longer; H100, batch 1, with ``shared_cross_kv`` and ``fuse_qkv``: 9.88–9.98 ms against 10.08 ms with
  torch's 10). cuDNN keeps its choice for a shape for the life of the process, so a limit set after a shape was
  first run does not change that shape's choice. ``None`` leaves torch's setting as it is; off CUDA it means nothing;
- ``channels_last``: NHWC weights and activations, the layout cuDNN's tensor-core convolutions want;
- ``dtype``: bf16 or fp16 weights; the x0 formula itself always runs in float32 (it divides by sqrt(ᾱ) ≈ 0.07
  at t = 999, which would amplify half-precision rounding of the UNet's output ~15×);
- ``fuse_qkv``: diffusers' ``fuse_qkv_projections()`` on the UNet and the VAE: each self-attention's q, k, v
  projections become one Linear (cross-attention: k and v), run by ``FusedAttnProcessor2_0``, so three small
  GEMMs become one larger one. Same arithmetic, same result up to GEMM rounding. A module is fused only when that
  changes nothing: stock SDPA processors (``AttnProcessor2_0``/``AttnProcessor``; an IP-Adapter or other custom
  processor would be replaced) and plain ``nn.Linear`` projections (a peft LoRA's delta would be dropped); any other
  module is left as it is, with a warning that says why. The runner fuses the modules it was given in place (the
  unfused to_q/to_k/to_v stay as attributes, and the fused Linears add ``to_qkv``/``to_kv`` entries to their state
  dicts; ``unfuse_qkv_projections()`` restores the old processors). On by default: on top of ``shared_cross_kv`` a
  tie on the H100 (9.94–10.08 vs 10.01–10.08 ms), kept because the sub-10 ms runs had it. Works on CPU too;
- ``inductor_tuning``: the inductor settings of diffusers' SDXL ``torch.compile`` guide (:data:`INDUCTOR_TUNING`:
  1×1 convs lowered as matmuls, coordinate-descent tuning of every Triton kernel's block sizes over all
  directions, epilogue fusion off). They are passed as this runner's ``torch.compile(options=...)`` on top of
  the compile mode's own options (``torch._inductor.list_mode_options``), so they apply to every compilation of
  this runner's step (each input shape compiles lazily at its first call) and never change the global
  ``torch._inductor.config``. Needs ``compile``; like ``compile`` it only applies on CUDA (ignored with the same
  warning elsewhere). Coordinate descent makes each first call (per input shape) markedly slower;
- ``inductor_config``: any other ``torch._inductor.config`` settings for this runner's compilations, passed the same
  way (e.g. ``{"conv_1x1_as_mm": True}``, ``{"freezing": True}``, or a nested one by its dotted name,
  ``{"triton.enable_pdl": True}``); unknown names are a ``ConfigError``;
- ``decode_inductor_config``: settings for the VAE decode's compilation only, on top of ``inductor_config`` (e.g.
  ``{"max_autotune": True}``: Triton convolution templates timed against cuDNN for the decoder's ~15 convolution
  shapes, at a fraction of the whole step's autotuning time; on an H100 a tie with the default, inductor keeping
  cuDNN for the large convolutions). When set, the UNet + x0 formula and the decode compile as two graphs, called one
  after the other (and captured together in one CUDA graph);
- ``subpixel_upsample``: every "nearest ×2 upsample + 3×3 conv" of the UNet and the VAE decoder runs as one 2×2
  conv with four times the output channels and an interleave (:mod:`crossdistill.models.subpixel`): the same
  arithmetic with 4/9 of those convs' multiply-adds (−15 % of the decode's FLOPs, −4 % of the UNet's), equal up to
  rounding. The runner switches the modules it was given in place
  (:func:`~crossdistill.models.subpixel.disable_subpixel_upsample` switches them back). Works on CPU too;
- ``channel_stats_norm``: every ``nn.GroupNorm`` of the UNet and the VAE takes its statistics per channel first and
  combines them per group exactly (:mod:`crossdistill.models.groupnorm`): the same function up to rounding, as a
  reduction that reads channels_last memory in order and has ``B·C`` outputs instead of ``B·32``. The runner switches
  the modules in place (:func:`~crossdistill.models.groupnorm.disable_channel_stats_group_norm` switches them back).
  Works on CPU too;
- ``wide_head_attention``: attention heads wider than 256 (the VAE's single 512-wide mid-block head), which the flash
  and cuDNN SDPA kernels do not take, run as two matmuls and a float32 softmax instead of the memory-efficient kernel
  (:mod:`crossdistill.models.wide_attention`); the UNet's heads are left alone. With ``fuse_qkv`` too, a module that
  has wide heads (the VAE) keeps them unfused. Works on CPU too;
- ``pad_narrow_convs``: the convolutions with 3 or 4 input or output channels (the UNet's and the decoder's first and
  last) run with zero channels appended up to 8 and the output sliced back (:mod:`crossdistill.models.narrow_conv`):
  the same function, in the channel counts cuDNN's tensor-core kernels take. Works on CPU too;
- ``constant_time_embedding``: the UNet runs at one timestep, so everything it computes from the timestep alone is the
  same on every call; each ResNet block's ``time_emb_proj`` returns its output at that timestep, recorded once at
  construction (:mod:`crossdistill.models.constant_time`), and the compiler drops the time MLP that fed it: ~25 fewer
  kernels per call (H100, batch 1: 10.42 → 10.16 ms, one run). A UNet whose time embedding also depends on other
  inputs (SDXL's added embedding, class labels) is left as it is, with a warning. Works on CPU too;
- ``shared_cross_kv``: the keys and values of every cross-attention (SD 1.5: 16 blocks, 32 small GEMMs over the same
  77 prompt tokens) come from one GEMM against their concatenated weights, each block reading its slices
  (:mod:`crossdistill.models.cross_kv`); the same function up to rounding (H100, batch 1: 10.11–10.29 → 10.01–10.08
  ms, five runs on three machines). With ``fuse_qkv`` too, only the self-attentions are fused
  (:func:`fuse_self_attention_qkv`). A UNet whose prompt embeddings reach anything but stock cross-attentions (or
  whose key/value projections a peft LoRA wraps) is left as it is, with a warning. A switched UNet refuses raw prompt
  embeddings: call it through the runner. Works on CPU too.

On a CPU only ``dtype``, ``channels_last``, ``fuse_qkv``, ``subpixel_upsample``, ``channel_stats_norm``,
``wide_head_attention``, ``pad_narrow_convs``, ``constant_time_embedding`` and ``shared_cross_kv`` apply; the result
equals the plain eager path up to rounding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from crossdistill.errors import ConfigError
from crossdistill.models.constant_time import enable_constant_time_projection
from crossdistill.models.cross_kv import (
    disable_shared_cross_kv,
    enable_shared_cross_kv,
    project_cross_kv,
    shared_cross_kv_applies,
)
from crossdistill.models.groupnorm import enable_channel_stats_group_norm
from crossdistill.models.narrow_conv import enable_padded_narrow_convs
from crossdistill.models.subpixel import enable_subpixel_upsample
from crossdistill.models.wide_attention import enable_wide_head_matmul_attention

# SD 1.5's DDPM schedule ("scaled_linear", β from 0.00085 to 0.012 over 1000 steps); its ᾱ at t = 999 is ≈ 0.00466.
SD15_BETA_START, SD15_BETA_END, SD15_NUM_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000
SD15_SCALE = 0.18215

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# diffusers' SDXL torch.compile guide (docs "Accelerate inference of text-to-image diffusion models").
INDUCTOR_TUNING = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}


def scaled_linear_alpha_bar(
    timestep: int,
    beta_start: float = SD15_BETA_START,
    beta_end: float = SD15_BETA_END,
    num_train_timesteps: int = SD15_NUM_TRAIN_TIMESTEPS,
) -> float:
    """ᾱ_t of diffusers' ``scaled_linear`` DDPM schedule (SD 1.x / 2.x), computed in float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return float(torch.cumprod(1.0 - betas, dim=0)[timestep])


@dataclass(kw_only=True)
class FastPathOptions:
    """How the one-step path runs. Defaults are the fastest measured combination on an H100."""

    dtype: str = "bfloat16"  # weights and activations: float32 | bfloat16 | float16
    channels_last: bool = True  # NHWC memory format for the UNet and VAE (cuDNN tensor-core convs)
    compile: str | None = "default"  # torch.compile mode of the whole step (COMPILE_MODES), or None for eager; CUDA
    cuda_graphs: bool = True  # capture one CUDA graph per input shape and replay it; CUDA only
    cudnn_benchmark: bool = True  # let cuDNN time its conv algorithms once per shape (sets a global torch flag)
    cudnn_benchmark_limit: int | None = 0  # algorithms cuDNN times per shape (global; 0: all; None: torch's 10)
    fuse_qkv: bool = True  # fused q/k/v (cross-attention: k/v) projections in the UNet and VAE attentions
    inductor_tuning: bool = False  # INDUCTOR_TUNING for this runner's compilations; needs compile; CUDA only
    subpixel_upsample: bool = False  # nearest x2 + 3x3 conv in exact sub-pixel form (models/subpixel.py)
    channel_stats_norm: bool = True  # GroupNorm statistics per channel, then per group (models/groupnorm.py)
    wide_head_attention: bool = True  # heads wider than 256 as matmuls, not the mem-efficient kernel (wide_attention)
    pad_narrow_convs: bool = False  # convs with 3/4 channels run padded to 8 channels, exactly (models/narrow_conv.py)
    constant_time_embedding: bool = True  # time_emb_proj outputs recorded at the timestep (models/constant_time.py)
    shared_cross_kv: bool = True  # every cross-attention's keys/values from one GEMM (models/cross_kv.py)
    inductor_config: dict = field(default_factory=dict)  # extra torch._inductor.config settings for the compile
    decode_inductor_config: dict = field(default_factory=dict)  # more settings for the decode only (its own graph)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"fast path dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(f"fast path compile mode must be one of {COMPILE_MODES} or None, got {self.compile!r}")
        if self.cuda_graphs and self.compile in ("reduce-overhead", "max-autotune"):
            # Those modes already capture CUDA graphs (cudagraph trees); capturing them again inside ours fails.
            raise ConfigError(f"compile mode {self.compile!r} captures its own CUDA graphs: set cuda_graphs=False")
        limit = self.cudnn_benchmark_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"cudnn_benchmark_limit must be an integer >= 0 (0: all) or None, got {limit!r}")
        if limit is not None and not self.cudnn_benchmark:
            raise ConfigError("cudnn_benchmark_limit bounds cuDNN's benchmarking: it needs cudnn_benchmark=True")
        if self.inductor_tuning and self.compile is None:
            raise ConfigError("inductor_tuning configures torch.compile's inductor backend: it needs compile set")
        for name in ("inductor_config", "decode_inductor_config"):
            settings = getattr(self, name)
            if not settings:
                continue
            if self.compile is None:
                raise ConfigError(f"{name} configures torch.compile's inductor backend: it needs compile set")
            unknown = sorted(k for k in settings if not has_inductor_setting(k))
            if unknown:
                raise ConfigError(f"{name}: {unknown} are not torch._inductor.config settings (see its docs)")


def has_inductor_setting(name: str, config=None) -> bool:
    """Whether ``name`` (dotted for a nested setting, e.g. ``"triton.enable_pdl"``) is a ``torch._inductor.config``
    setting in this torch."""
    if config is None:
        import torch._inductor.config as config
    head, _, rest = name.partition(".")
    if not hasattr(config, head):
        return False
    return has_inductor_setting(rest, getattr(config, head)) if rest else True


def inductor_options(mode: str, tuning: bool, extra: dict | None = None) -> dict:
    """``torch.compile`` options equivalent to ``mode`` (its inductor settings), plus :data:`INDUCTOR_TUNING` and
    ``extra``."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode, dynamic=False)) | (INDUCTOR_TUNING if tuning else {}) | (extra or {})


STOCK_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def _fusion_blocker(attentions: list[nn.Module]) -> str | None:
    """Why fusing ``attentions`` would change the model, or None: a processor other than the stock ones (a LoRA or
    IP-Adapter processor would be replaced), or a projection that is not a plain ``nn.Linear`` (a peft LoRA wrapper's
    delta would be dropped: the fused weight is concatenated from the base weights)."""
    kinds = {type(a.processor).__name__ for a in attentions}
    if not kinds <= set(STOCK_PROCESSORS):
        return (f"it uses attention processors {sorted(kinds)}, which fusing would replace with FusedAttnProcessor2_0 "
                f"(only {' / '.join(STOCK_PROCESSORS)} are fused)")  # fmt: skip
    projections = [p for a in attentions for p in (a.to_q, a.to_k, a.to_v)]
    wrapped = sorted({f"{type(p).__module__}.{type(p).__qualname__}" for p in projections if type(p) is not nn.Linear})
    if wrapped:
        return f"its q/k/v projections are {wrapped}, not plain Linear layers (fusing would drop what they add)"
    return None


def fuse_qkv_projections(module: nn.Module) -> str | None:
    """diffusers' ``fuse_qkv_projections()`` on ``module``; returns None when fused (or fused already: a second
    runner on the same modules), else why the module was left as it is (:func:`_fusion_blocker`, or no diffusers
    fusion API)."""
    from diffusers.models.attention_processor import Attention

    if not hasattr(module, "fuse_qkv_projections") or not hasattr(module, "attn_processors"):
        return "it has no diffusers fuse_qkv_projections()"
    kinds = {type(p).__name__ for p in module.attn_processors.values()}
    if kinds <= {"FusedAttnProcessor2_0"}:
        return None
    if "FusedAttnProcessor2_0" in kinds and getattr(module, "original_attn_processors", None):
        module.unfuse_qkv_projections()  # an earlier runner fused the self-attentions only: start from the originals
    blocker = _fusion_blocker([m for m in module.modules() if isinstance(m, Attention)])
    if blocker is None:
        module.fuse_qkv_projections()
    return blocker


def fuse_self_attention_qkv(module: nn.Module) -> str | None:
    """Fuse q, k and v of ``module``'s self-attentions only (one ``to_qkv`` Linear each, run by
    ``FusedAttnProcessor2_0``), leaving its cross-attentions as they are: what ``fuse_qkv`` does beside
    ``shared_cross_kv``, whose one GEMM already gives every cross-attention its keys and values. Like diffusers'
    ``fuse_qkv_projections()`` it keeps the processors it replaces in ``original_attn_processors``, so
    ``unfuse_qkv_projections()`` restores them; a module whose self-attentions are fused already is left alone.
    Returns None or why nothing was fused, as :func:`fuse_qkv_projections`."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    selfs = [m for m in module.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    kinds = {type(m.processor).__name__ for m in selfs}
    if not selfs or kinds <= {"FusedAttnProcessor2_0"}:
        return None
    blocker = _fusion_blocker(selfs)
    if blocker is None:
        module.original_attn_processors = module.attn_processors
        for m in selfs:
            m.fuse_projections(fuse=True)
            m.set_processor(FusedAttnProcessor2_0())
    return blocker


class OneStepRunner:
    """Noise ``[B, 4, h, w]`` + prompt embeddings ``[B, L, D]`` → images ``[B, 3, 8h, 8w]`` in ``[-1, 1]``.

    ``images = clamp(vae.decode(x0 / scale + shift))`` with ``x0`` the UNet's x0-prediction at ``timestep`` from the
    input ``z = noise`` (the one-step generator convention of DMD2): ``x0 = (z − √(1−ᾱ)·ε̂) / √ᾱ`` for
    ``prediction_type="epsilon"``, ``x0 = √ᾱ·z − √(1−ᾱ)·v̂`` for ``"v_prediction"``, the UNet's output itself
    for ``"sample"``.

    The runner takes the modules over: it moves them to ``device``/``dtype``/memory format, sets eval mode and
    freezes them. Outputs are float32 and never alias the runner's internal buffers.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        *,
        scale: float = SD15_SCALE,
        shift: float = 0.0,
        timestep: int = 999,
        alpha_bar: float | None = None,
        prediction_type: str = "epsilon",
        options: FastPathOptions | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        self.options = options or FastPathOptions()
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.dtype = DTYPES[self.options.dtype]
        self.prediction_type = prediction_type
        self.scale, self.shift = float(scale), float(shift)
        ab = scaled_linear_alpha_bar(timestep) if alpha_bar is None else float(alpha_bar)
        self.sqrt_ab, self.sqrt_1m_ab = math.sqrt(ab), math.sqrt(1.0 - ab)

        on_cuda = self.device.type == "cuda"
        self.use_graphs = self.options.cuda_graphs and on_cuda
        compile_mode = self.options.compile if on_cuda else None
        cuda_only = (
            ("compile", self.options.compile),
            ("cuda_graphs", self.options.cuda_graphs),
            ("inductor_tuning", self.options.inductor_tuning),
            ("inductor_config", bool(self.options.inductor_config)),
            ("decode_inductor_config", bool(self.options.decode_inductor_config)),
        )
        ignored = [name for name, on in cuda_only if on]
        if not on_cuda and ignored:
            warnings.warn(f"fast path on {self.device.type}: {', '.join(ignored)} ignored (CUDA only)", stacklevel=2)
        if on_cuda and self.options.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
            if self.options.cudnn_benchmark_limit is not None:
                torch.backends.cudnn.benchmark_limit = self.options.cudnn_benchmark_limit

        memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        self.unet, self.vae = (
            m.to(device=self.device, dtype=self.dtype, memory_format=memory_format) for m in (unet, vae)
        )
        wide = [self.options.wide_head_attention and enable_wide_head_matmul_attention(m) > 0
                for m in (self.unet, self.vae)]  # fmt: skip
        # an earlier runner's shared keys/values undone first: they are decided again below
        disable_shared_cross_kv(self.unet)
        if self.options.fuse_qkv:  # after the move: the fused weights are concatenated on the device, in dtype
            for m, has_wide_heads in zip((self.unet, self.vae), wide):
                if has_wide_heads:  # a module with wide heads (the VAE) keeps its faster unfused matmul attention
                    continue
                if m is self.unet and self.options.shared_cross_kv and shared_cross_kv_applies(m):
                    blocker = fuse_self_attention_qkv(m)  # the cross-attentions' keys/values: the shared GEMM
                else:
                    blocker = fuse_qkv_projections(m)
                if blocker is not None:
                    warnings.warn(f"fuse_qkv ignored for the {type(m).__name__}: {blocker}", stacklevel=2)
        for m in (self.unet, self.vae):  # after fusing: the new fused Linears are trainable when created
            m.eval().requires_grad_(False)
            if self.options.subpixel_upsample:
                enable_subpixel_upsample(m)
            if self.options.channel_stats_norm:
                enable_channel_stats_group_norm(m)
            if self.options.pad_narrow_convs:  # last: it snapshots the frozen weights, moved and cast
                enable_padded_narrow_convs(m)
        # A device tensor, so the timestep never forces a host→device copy inside a captured graph.
        self.timestep = torch.full((1,), timestep, device=self.device, dtype=torch.long)
        # last: it records what the UNet computes in its final form (the shared keys/values are switched on after it:
        # the recording calls the UNet with plain prompt embeddings)
        if self.options.constant_time_embedding and not enable_constant_time_projection(self.unet, self.timestep):
            warnings.warn("constant_time_embedding ignored: this UNet's time embedding depends on more than the "
                          "timestep (class labels, an added embedding or timestep_cond)", stacklevel=2)  # fmt: skip
        self._cross_kv = enable_shared_cross_kv(self.unet) if self.options.shared_cross_kv else None
        if self.options.shared_cross_kv and self._cross_kv is None:
            warnings.warn("shared_cross_kv ignored: the prompt embeddings reach more than stock cross-attentions in "
                          "this UNet (fused or custom processors, wrapped key/value projections such as a peft LoRA, "
                          "norm_cross or an encoder projection)", stacklevel=2)  # fmt: skip

        self._compiled_graphs = compile_mode in ("reduce-overhead", "max-autotune")
        self._step: Callable[[Tensor, Tensor], Tensor] = self._eager_step
        if compile_mode is not None:
            self._step = self._compile(compile_mode)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _compile(self, mode: str) -> Callable[[Tensor, Tensor], Tensor]:
        """The step under ``torch.compile`` in ``mode`` with this runner's inductor settings."""
        # dynamic=False: each batch size gets its own specialised kernels (a handful of shapes in practice).
        opts = self.options
        if opts.decode_inductor_config:  # two graphs: the decode's with its own settings
            base = inductor_options(mode, opts.inductor_tuning, opts.inductor_config)
            x0 = torch.compile(self._x0, options=base, dynamic=False)
            decode = torch.compile(self._decode, options=base | opts.decode_inductor_config, dynamic=False)
            return lambda prompt_embeds, noise: decode(x0(prompt_embeds, noise))
        if opts.inductor_tuning or opts.inductor_config:  # mode or options, not both
            options = inductor_options(mode, opts.inductor_tuning, opts.inductor_config)
            return torch.compile(self._eager_step, options=options, dynamic=False)
        return torch.compile(self._eager_step, mode=mode, dynamic=False)

    def _eager_step(self, prompt_embeds: Tensor, noise: Tensor) -> Tensor:
        """The whole one-step computation, written once; every option runs exactly this function."""
        return self._decode(self._x0(prompt_embeds, noise))

    def _x0(self, prompt_embeds: Tensor, noise: Tensor) -> Tensor:
        """The UNet call and the x0 formula: float32 latents ``[B, 4, h, w]`` (in the UNet's latent scale)."""
        memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        z = noise.to(dtype=self.dtype).contiguous(memory_format=memory_format)
        t = self.timestep.expand(noise.shape[0])
        context = prompt_embeds.to(self.dtype)
        if self._cross_kv is not None:  # every cross-attention's keys and values, one GEMM
            context = project_cross_kv(self._cross_kv, context)
        out = self.unet(z, t, encoder_hidden_states=context, return_dict=False)[0].float()
        z32 = noise.float()
        if self.prediction_type == "epsilon":
            x0 = (z32 - self.sqrt_1m_ab * out) / self.sqrt_ab
        elif self.prediction_type == "v_prediction":
            x0 = self.sqrt_ab * z32 - self.sqrt_1m_ab * out
        else:
            x0 = out
        return x0

    def _decode(self, x0: Tensor) -> Tensor:
        """VAE decode of x0 latents (unscaled and shifted first): float32 images clamped to ``[-1, 1]``."""
        memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        latents = (x0 / self.scale + self.shift).to(self.dtype).contiguous(memory_format=memory_format)
        images = self.vae.decode(latents, return_dict=False)[0]
        return images.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def __call__(self, prompt_embeds: Tensor, noise: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in ``[-1, 1]`` for one batch."""
        if prompt_embeds.shape[0] != noise.shape[0]:
            raise ConfigError(f"prompt embeddings hold {prompt_embeds.shape[0]} rows but noise {noise.shape[0]}")
        prompt_embeds, noise = prompt_embeds.to(self.device), noise.to(self.device, torch.float32)
        if not self.use_graphs:
            if not self._compiled_graphs:
                return self._step(prompt_embeds, noise)
            # torch.compile's own CUDA graphs reuse their output memory on the next call: hand out a copy.
            torch.compiler.cudagraph_mark_step_begin()
            return self._step(prompt_embeds, noise).clone()
        key = (tuple(prompt_embeds.shape), prompt_embeds.dtype, tuple(noise.shape))
        if key not in self._graphs:
            self._graphs[key] = self._capture(prompt_embeds, noise)
        graph, static_embeds, static_noise, static_out = self._graphs[key]
        static_embeds.copy_(prompt_embeds)
        static_noise.copy_(noise)
        graph.replay()
        return static_out.clone()

    def _capture(self, prompt_embeds: Tensor, noise: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]:
        """Warm up (compiling, autotuning, cuDNN benchmarking) on a side stream, then capture one graph."""
        static_embeds, static_noise = prompt_embeds.clone(), noise.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            # Several runs: the first compiles, later ones settle lazy inits and cuDNN's algorithm choice.
            for _ in range(3):
                self._step(static_embeds, static_noise)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._step(static_embeds, static_noise)
        return graph, static_embeds, static_noise, static_out
