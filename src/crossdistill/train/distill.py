"""Cross-space DMD2 (DESIGN.md §3): a one-step Student generator trained against a Teacher in another latent space.

One step of the generator ``G_θ`` (the Student's UNet) turns noise into a Student latent, the Bridge ``B_φ`` carries
it into the Teacher's space, and there the Teacher (real score, with CFG) and a fake score (a Teacher-space denoiser
that tracks the generator's own distribution) give the distribution-matching gradient. With the ``identity`` Bridge
and the Student's own base as Teacher this is plain (shared-space) DMD2, the baseline.

The loop reads top to bottom (edm2 style): resume → for each step: generator update every
``critic_steps_per_generator_step`` steps, a critic update every step → log → samples → checkpoint. Every random draw
of a step comes from ``step_generator(seed, rank, step, stream)``, so a resumed run repeats an uninterrupted one.
Distribution (DDP / FSDP), mixed precision and trackers come from ``accelerate``; nothing here is home-made.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs
from torch import Tensor, nn

from crossdistill.bridge.model import TRAINABLE_KINDS, Bridge
from crossdistill.config import RESUME_SAFE_KEYS, config_hash, prepare_run_dir, warn_ignored
from crossdistill.data.images import ImageDataset, read_prompts
from crossdistill.errors import ConfigError, DataError
from crossdistill.eval.report import tensor_grid
from crossdistill.losses.bridge import reconstruction_loss
from crossdistill.losses.dm import (
    GANHead,
    capture_features,
    dm_loss,
    fake_score_loss,
    feature_module,
    gan_discriminator_loss,
    gan_generator_loss,
    run_to,
)
from crossdistill.models.base import Denoiser, PromptEmbeds, Space
from crossdistill.models.registry import get_family
from crossdistill.models.registry import load_space as load_space_folder
from crossdistill.train.guard import NonFiniteGuard
from crossdistill.train.perf import (
    MODULE_SWAPS,
    compile_blocks,
    compile_cache_counts,
    is_convolutional,
    log_first_compiled_step,
    make_adamw,
    to_channels_last,
)
from crossdistill.train.runner import train_loop
from crossdistill.train.seeding import derive_seed, seed_everything, step_generator
from crossdistill.train.sharded import (
    ShardedOptimizer,
    ShardedParams,
    UnshardedOptimizer,
    WrapPolicy,
    clip_grad_norm,
    full_tensor,
    is_fsdp,
    shard_frozen,
)
from crossdistill.train.stats import tracker_kwargs

logger = logging.getLogger(__name__)

# The attention projections of UNet, MMDiT and FLUX blocks (diffusers names): where the fake score's LoRA goes.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# The DDP wrapping options: train.ddp_* -> the field of accelerate's DistributedDataParallelKwargs each one sets, which
# torch's DistributedDataParallel gets (ddp_kwargs builds it from this; check_ddp_accelerator compares these fields).
# A new DDP option is one entry here and its TrainConfig field.
DDP_KWARGS = {
    "ddp_comm_hook": "comm_hook",
    "ddp_bucket_mb": "bucket_cap_mb",
    "ddp_static_graph": "static_graph",
    "ddp_grad_as_bucket_view": "gradient_as_bucket_view",
    "ddp_broadcast_buffers": "broadcast_buffers",
}
DDP_KEYS = tuple(DDP_KWARGS)
# Speed options change how a step runs, not what it computes (up to rounding): a run may resume with them toggled.
# The module swaps (perf.MODULE_SWAPS) and the DDP options are among them; ddp_comm_hook rounds the all-reduced
# gradients to bf16 / fp16, a rounding like mixed precision.
SPEED_KEYS = (
    "train.compile",
    "train.fused_optimizer",
    "train.channels_last",
    "train.offload_text_encoders",
    "train.offload_idle_vaes",
    *(f"train.{key}" for key in MODULE_SWAPS),
    *(f"train.{key}" for key in DDP_KEYS),
    "train.ddp_split_graphs",
)
DISTILL_RESUME_SAFE = (*RESUME_SAFE_KEYS, *SPEED_KEYS)
# Where train.offload_text_encoders / offload_idle_vaes put what they move (tests set "meta": any later use fails).
OFFLOAD_DEVICE = "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(kw_only=True)
class ModelConfig:
    student_family: str = "sd15"  # registry name of the Student family (the generator's architecture)
    student_path: str = ""  # Student base: diffusers folder, hub id, "emoji:student" or "tiny:SEED" (tests)
    teacher_family: str = "sd3"  # registry name of the Teacher family
    teacher_path: str = ""  # Teacher: diffusers folder, hub id, "emoji:teacher" or "tiny:SEED"
    bridge_kind: Literal["prior_projector", "projector_only", "decode_encode", "identity"] = "prior_projector"
    bridge_path: str | None = None  # trained Bridge folder (needed by prior_projector / projector_only)
    fake_score: Literal["copy", "lora"] = "copy"  # full Teacher copy, or LoRA on the shared Teacher base
    lora_rank: int = 64  # rank of the fake score's LoRA (fake_score="lora")


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 1000  # critic updates; the generator is updated every critic_steps_per_generator_step of them
    batch_size: int = 4  # per process
    # micro-batches of batch_size per update, gradients averaged before one optimiser step (the same memory as one;
    # under DDP one all-reduce per update). Samples per update: batch_size x this x processes
    gradient_accumulation_steps: int = 1
    lr_generator: float = 1e-5  # AdamW learning rate of G_θ (and of B_φ when co-trained)
    lr_critic: float = 1e-5  # AdamW learning rate of the fake score (and GAN head)
    weight_decay: float = 0.01  # AdamW weight decay of both optimisers (DMD2's value)
    critic_steps_per_generator_step: int = 5  # two time-scale update rule (DMD2: 5–10)
    guidance_scale: float = 1.75  # CFG scale of the real score (FLUX-dev: its guidance embedding value)
    t_min: float = 0.02  # Teacher times τ drawn for the DM gradient and the fake-score loss
    t_max: float = 0.98
    conditioning_t: float = 1.0  # the generator's one time: noise at t=1 (SD 1.5 timestep 999) → x0
    gan_weight: float = 0.0  # weight of the GAN loss in the generator update (0 = no GAN; DMD2: 1e-3)
    gan_critic_weight: float = 1e-2  # weight of the discriminator loss in the critic update (with GAN on)
    ema_decay: float = 0.0  # EMA of the generator (0 = off; e.g. 0.999)
    cotrain_bridge: bool = False  # train B_φ with the generator, regularised by L_rec on real images
    bridge_rec_weight: float = 1.0  # λ_rec of the co-trained Bridge
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # accelerate's autocast; frozen models stored in it
    gradient_checkpointing: bool = False  # recompute activations of the generator and fake score in backward
    seed: int = 0  # all randomness derives from (seed, rank, step)
    max_grad_norm: float = 10.0  # gradient clipping of both updates (<= 0: off)
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row
    cpu: bool = False  # run on CPU even when a GPU is present
    compile: bool = False  # regional torch.compile of the backbones, Student VAE decoder and projector (perf.py)
    fused_optimizer: bool = True  # single-kernel AdamW update on CUDA (torch's default update elsewhere)
    channels_last: bool = False  # NHWC weights for the convolutional modules (UNet, VAEs, projector); not transformers
    offload_text_encoders: bool = True  # move both text encoders to CPU once every prompt embedding is cached
    offload_idle_vaes: bool = True  # once the reals are encoded: Teacher VAE and Student VAE encoder to CPU
    subpixel_upsample: bool = False  # UNet / VAE "nearest x2 + 3x3 conv" in exact sub-pixel form (models/subpixel.py)
    channel_stats_norm: bool = False  # GroupNorm statistics per channel, then per group (models/groupnorm.py)
    wide_head_attention: bool = False  # attention heads wider than 256 (the VAE's) as matmuls (models/wide_attention)
    # DDP only (ignored on one process and under FSDP), passed to torch's DistributedDataParallel through accelerate:
    ddp_comm_hook: Literal["none", "fp16", "bf16"] = "none"  # all-reduce gradients in this dtype (bf16: CUDA + NCCL)
    ddp_bucket_mb: int = 25  # gradient bucket size in MiB (bucket_cap_mb; torch's default 25)
    ddp_static_graph: bool = False  # static_graph: the same parameters get gradients every step (not with the GAN)
    ddp_grad_as_bucket_view: bool = False  # gradient_as_bucket_view: gradients are views into the all-reduce buckets
    # broadcast_buffers: rank 0 sends every buffer to the others before a forward of a DDP module (the SD3 fake score:
    # its 0.9 GB positional table). Our models' buffers are constants that every rank builds alike: false skips it.
    # Profiled on 2 x H100 (compiled SD3.5-M preset): ~2.6 ms per generator update, so torch's default stays
    ddp_broadcast_buffers: bool = True
    # train.compile under DDP: true lets dynamo's DDPOptimizer split each compiled graph where DDP's gradient buckets
    # end, so a bucket's all-reduce can start inside that graph's backward (torch._dynamo.config.optimize_ddp, torch's
    # default). train.compile compiles block by block, and the real blocks outgrow a bucket, so the split cuts the
    # blocks themselves (bench/ddp_graph_split.py, 25 MiB buckets: SD3.5-M with 4 of its blocks, 17 graphs instead of
    # 2; the SD 1.5 UNet, 61 instead of 19). False (ours) keeps one graph per block: its gradients are all-reduced when
    # its backward ends, beside the next block's backward. Compiled SD3.5-M preset on 4 x H100, each DDP pair against a
    # one-process run on the same host: false 1.86x and 1.91x, true 1.71x (docs/performance.md, session 14).
    ddp_split_graphs: bool = False


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (and one at the end)
    keep: int = 3  # complete checkpoints kept


@dataclass(kw_only=True)
class LogConfig:
    sample_every: int = 500  # steps between sample grids in run_dir/samples/ (<= 0: only at the end)
    sample_prompts: list[str] = field(default_factory=list)  # fixed prompts of the grids (default: first 8 of data)
    tensorboard: bool = False  # also log to tensorboard (if installed)


@dataclass(kw_only=True)
class DataConfig:
    prompts: str = "emoji:train"  # a text file (one prompt a line) or "emoji:SPLIT"
    real_images: str | None = None  # GAN / Bridge co-training reals: "emoji:SPLIT" or a folder of images + .txt
    max_real_images: int = 4096  # cap on the real images encoded up front


@dataclass(kw_only=True)
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    data: DataConfig = field(default_factory=DataConfig)


def check_config(cfg: DistillConfig) -> None:
    """Refuse inconsistent options up front, and warn about options that will be ignored."""
    m, t = cfg.model, cfg.train
    if m.bridge_kind in TRAINABLE_KINDS and not m.bridge_path:
        raise ConfigError(
            f"bridge kind {m.bridge_kind!r} needs a trained Bridge: --set model.bridge_path=RUN_DIR/bridge "
            "(from `crossdistill bridge train`), or use decode_encode / identity"
        )
    if t.cotrain_bridge and m.bridge_kind not in TRAINABLE_KINDS:
        raise ConfigError(f"train.cotrain_bridge needs a trainable bridge kind, not {m.bridge_kind!r}")
    if (t.gan_weight > 0 or t.cotrain_bridge) and not cfg.data.real_images:
        raise ConfigError("the GAN and Bridge co-training need real images: --set data.real_images=emoji:train")
    if not 0.0 <= t.t_min < t.t_max <= 1.0:
        raise ConfigError(f"need 0 <= train.t_min < train.t_max <= 1, got {t.t_min}, {t.t_max}")
    if t.critic_steps_per_generator_step < 1 or t.batch_size < 1 or t.max_steps < 0:
        raise ConfigError("train.critic_steps_per_generator_step and train.batch_size must be >= 1")
    if t.gradient_accumulation_steps < 1:
        raise ConfigError(
            f"train.gradient_accumulation_steps must be >= 1 (1: no accumulation), got {t.gradient_accumulation_steps}"
        )
    if m.fake_score != "lora":
        warn_ignored(cfg, "model.lora_rank", "model.fake_score is not 'lora'")
    if t.gan_weight <= 0:
        warn_ignored(cfg, "train.gan_critic_weight", "train.gan_weight is 0 (no GAN)")
    if not t.cotrain_bridge:
        warn_ignored(cfg, "train.bridge_rec_weight", "train.cotrain_bridge is false")
    if t.compile and not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            "train.compile=true, but torch.compile is not supported on this platform / Python: "
            "--set train.compile=false"
        )
    check_ddp_options(t)
    if t.ddp_static_graph and t.gan_weight > 0:
        raise ConfigError(
            "train.ddp_static_graph=true cannot run with the GAN (train.gan_weight > 0): the generator update runs "
            "the critic's GAN pass under DDP's no_sync (its gradients only need to reach the generator, and the "
            "critic's blocks past the feature block get none), and DDP's static graph wants one synchronised backward "
            "of the same parameters every step (torch fails in its reducer: 'expect_autograd_hooks_ INTERNAL ASSERT "
            "FAILED'). --set train.ddp_static_graph=false, or train.gan_weight=0"
        )
    if t.ddp_static_graph and t.gradient_accumulation_steps > 1:
        raise ConfigError(
            "train.ddp_static_graph=true cannot run with train.gradient_accumulation_steps > 1: the micro-batches "
            "before the last run under DDP's no_sync, which torch's static-graph reducer does not take (the same "
            "INTERNAL ASSERT as with the GAN). --set train.ddp_static_graph=false, or "
            "train.gradient_accumulation_steps=1"
        )


# ---------------------------------------------------------------------------------------------------------------------
# DDP tuning (train.ddp_*): torch's DistributedDataParallel arguments, passed through accelerate

DDP_COMM_HOOKS = ("none", "fp16", "bf16")


def check_ddp_options(t: TrainConfig) -> None:
    """Refuse ``train.ddp_*`` values DDP cannot take, naming the key and what it accepts."""
    if t.ddp_comm_hook not in DDP_COMM_HOOKS:
        raise ConfigError(
            f"train.ddp_comm_hook must be one of {', '.join(map(repr, DDP_COMM_HOOKS))}; got {t.ddp_comm_hook!r}"
        )
    if isinstance(t.ddp_bucket_mb, bool) or not isinstance(t.ddp_bucket_mb, int) or t.ddp_bucket_mb < 1:
        raise ConfigError(f"train.ddp_bucket_mb must be an int >= 1 (MiB, torch default 25); got {t.ddp_bucket_mb!r}")
    for key in ("ddp_static_graph", "ddp_grad_as_bucket_view", "ddp_broadcast_buffers", "ddp_split_graphs"):
        if not isinstance(getattr(t, key), bool):
            raise ConfigError(f"train.{key} must be true or false; got {getattr(t, key)!r}")


def ddp_kwargs(t: TrainConfig) -> DistributedDataParallelKwargs:
    """accelerate's ``DistributedDataParallelKwargs`` for ``train.ddp_*`` (it hands them to torch's DDP, and
    registers the compression hook, when it wraps a model under DDP; FSDP and one process ignore it)."""
    check_ddp_options(t)
    values = {field: getattr(t, key) for key, field in DDP_KWARGS.items()}
    values["comm_hook"] = {"none": DDPCommunicationHookType.NO, "fp16": DDPCommunicationHookType.FP16,
                           "bf16": DDPCommunicationHookType.BF16}[t.ddp_comm_hook]  # fmt: skip
    return DistributedDataParallelKwargs(**values)


def bf16_comm_hook_supported() -> bool:
    """Whether torch's DDP takes the bf16 compression hook: it refuses it, by the hook's name and whatever the process
    group's backend, unless torch is a CUDA / ROCm build with NCCL >= 2.10, or XPU with XCCL
    (``DistributedDataParallel._check_comm_hook``). So a CPU build refuses it even on gloo, which all-reduces bf16."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    cuda_build = torch.version.cuda is not None or torch.version.hip is not None
    try:
        nccl = dist.is_nccl_available() and torch.cuda.nccl.version() >= (2, 10)
    except Exception:  # no NCCL in this build
        nccl = False
    xccl = getattr(dist, "is_xccl_available", lambda: False)() and torch.xpu.is_available()
    return bool((cuda_build and nccl) or xccl)


def is_ddp(accelerator) -> bool:
    """True when accelerate wraps trained models in DDP: several processes, any ``MULTI_*`` type (CPU/gloo too)."""
    return accelerator.num_processes > 1 and accelerator.distributed_type.value.startswith("MULTI_")


def non_default_ddp_options(t: TrainConfig) -> list[str]:
    defaults = TrainConfig()
    return [f"train.{k}={getattr(t, k)!r}" for k in DDP_KEYS if getattr(t, k) != getattr(defaults, k)]


def check_ddp_accelerator(cfg: DistillConfig, accelerator, *, sharded: bool) -> None:
    """``train.ddp_*`` set off their defaults: say so (one info line) when the run has no DDP; under DDP refuse a bf16
    hook torch would refuse, and an accelerator (maybe built by the caller) that does not carry the options."""
    chosen = non_default_ddp_options(cfg.train)
    if not chosen:
        return
    if not is_ddp(accelerator):
        if accelerator.is_main_process:
            kind = "FSDP2 (it shards instead)" if sharded else "on one process"
            logger.info("%s ignored: DDP options, and this run is %s", ", ".join(chosen), kind)
        return
    if cfg.train.ddp_comm_hook == "bf16" and not bf16_comm_hook_supported():
        raise ConfigError(
            "train.ddp_comm_hook=bf16: torch's DDP takes the bf16 hook only in a CUDA / ROCm build with NCCL >= "
            "2.10 (or XPU with XCCL), and this torch is not one: --set train.ddp_comm_hook=fp16 (or none)"
        )
    want, have = ddp_kwargs(cfg.train), getattr(accelerator, "ddp_handler", None)
    if have is None or any(getattr(have, f) != getattr(want, f) for f in DDP_KWARGS.values()):
        raise ConfigError(
            f"{', '.join(chosen)} set, but the accelerator given to the trainer was built without them: "
            "build it with crossdistill.train.distill.make_accelerator(cfg, run_dir)"
        )


def apply_ddp_graph_split(t: TrainConfig, accelerator) -> None:
    """``train.ddp_split_graphs`` -> ``torch._dynamo.config.optimize_ddp``, which dynamo reads when it compiles a graph
    inside a DDP module's forward (process-wide: set by every compiled DDP run). Off its default without DDP or
    without ``train.compile``: one info line."""
    if t.compile and is_ddp(accelerator):
        torch._dynamo.config.optimize_ddp = t.ddp_split_graphs
        if accelerator.is_main_process:
            how = "split at the gradient buckets" if t.ddp_split_graphs else "one graph per block"
            logger.info("compile under DDP: %s (train.ddp_split_graphs=%s)", how, str(t.ddp_split_graphs).lower())
    elif t.ddp_split_graphs != TrainConfig.ddp_split_graphs and accelerator.is_main_process:
        logger.info("train.ddp_split_graphs=%s ignored: it applies to train.compile=true under DDP only",
                    str(t.ddp_split_graphs).lower())


def make_accelerator(cfg: DistillConfig, run_dir: str | Path) -> Accelerator:
    """The run's accelerator: DDP / FSDP come from ``accelerate launch`` (its config), precision from ``cfg``, and the
    DDP wrapping options from ``train.ddp_*``."""
    t = cfg.train
    return Accelerator(
        mixed_precision=t.mixed_precision,
        cpu=t.cpu,
        kwargs_handlers=[ddp_kwargs(t)],
        **tracker_kwargs(run_dir, cfg.log.tensorboard),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Small pieces


class DenoiserCall(nn.Module):
    """Runs a denoiser method (by name) or a function of the denoiser through ``forward``.

    DDP / FSDP and accelerate's autocast act on ``forward`` only, while the denoiser contract has named methods
    (``denoise``, ``raw``, ``loss``). Everything one update needs from a wrapped denoiser happens in one call, as DDP
    expects one forward per backward. Under FSDP a sharded module's weights exist whole only inside that call, so
    every use of the generator, fake score and real score goes through here.

    ``head`` (the GAN head) rides in the critic's module: FSDP2 prepares one model with one optimiser, and the head
    trains with the fake score. Functions reach it as ``self.gan_head`` inside the call.
    """

    def __init__(self, denoiser: Denoiser, head: nn.Module | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.head = head
        # accelerate's transformer-based FSDP auto-wrap reads the block classes to shard one by one from the root
        self._no_split_modules = list(getattr(denoiser.backbone, "_no_split_modules", None) or [])

    def forward(self, fn, *args, **kwargs):
        if isinstance(fn, str):
            return getattr(self.denoiser, fn)(*args, **kwargs)
        return fn(self.denoiser, *args, **kwargs)


class TrainableParams:
    """``state_dict`` of a module's trainable parameters only (a LoRA fake score saves its adapter, not 12 B)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.params().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        params = self.params()
        if set(state) != set(params):
            raise ConfigError(
                f"checkpoint does not match the model's trainable parameters "
                f"({len(set(state) ^ set(params))} names differ): was it written with another model config?"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])


def add_lora(backbone: nn.Module, rank: int) -> None:
    """LoRA (peft, through diffusers' adapter API) on the backbone's attention projections; base stays frozen."""
    from peft import LoraConfig

    names = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n, _ in backbone.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names]
    backbone.requires_grad_(False)
    backbone.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets), "fake_score"
    )


@contextlib.contextmanager
def adapters_disabled(backbone: nn.Module) -> Iterator[None]:
    """The real score inside a LoRA fake score: the shared Teacher base with its adapter switched off."""
    backbone.disable_adapters()
    try:
        yield
    finally:
        backbone.enable_adapters()


@contextlib.contextmanager
def weights_frozen(params: list[Tensor]) -> Iterator[None]:
    """Within the block ``params`` do not require grad (their flags come back after): autograd records no weight
    gradient for a forward run here, while gradients still flow through to the inputs."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _randn(shape, gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen, device=gen.device)


# ---------------------------------------------------------------------------------------------------------------------
# Where models, prompts and real images come from


def load_space(family: str, path: str) -> Space:
    """A space from a diffusers folder / hub id, ``"emoji:teacher"`` / ``"emoji:student"`` (the shipped world) or
    ``"tiny:SEED"`` (the family's tiny random space, for tests). Each call loads a fresh, independent copy."""
    if not path:
        raise ConfigError(
            f"no model path for the {family} space: --set model.student_path=... / model.teacher_path=..."
        )
    kind, _, arg = path.partition(":")
    if kind == "tiny":
        return get_family(family).tiny(seed=int(arg or 0))
    if kind == "emoji":
        from crossdistill.toy.world import load_world

        if arg not in ("teacher", "student"):
            raise ConfigError(f"{path!r}: the emoji world has the spaces 'emoji:teacher' and 'emoji:student'")
        space = getattr(load_world(), arg)
        if space.family != family:
            raise ConfigError(f"{path!r} is a {space.family} space, but the config says family {family!r}")
        return space
    return load_space_folder(family, path)


def _emoji_world():
    from crossdistill.data.emoji import EmojiWorld
    from crossdistill.toy.world import read_manifest

    return EmojiWorld(**read_manifest()["world"])


def load_prompts(spec: str) -> list[str]:
    """Training prompts: ``"emoji:SPLIT"`` (the shipped world's captions) or a prompt file (.txt / .jsonl)."""
    if not spec:
        raise DataError("no prompts given: --set data.prompts=FILE (one prompt per line) or data.prompts=emoji:train")
    if spec.startswith("emoji:"):
        return _emoji_world().prompts(spec.partition(":")[2])
    return read_prompts(spec)


def load_real_images(spec: str, resolution: int, limit: int) -> tuple[Tensor, list[str]]:
    """Real images ``[N, 3, R, R]`` in [-1, 1] with their captions: ``"emoji:SPLIT"`` or any captioned image set
    :class:`~crossdistill.data.images.ImageDataset` reads (folder, metadata.jsonl, parquet; corrupt files counted)."""
    from crossdistill.data.emoji import uint8_to_unit

    if spec.startswith("emoji:"):
        world = _emoji_world()
        split = spec.partition(":")[2]
        pixels, _ = world.tensor_cache(split, resolution)
        return uint8_to_unit(pixels[:limit]), world.prompts(split)[:limit]
    data = ImageDataset(spec, resolution=resolution)
    items = [data[i] for i in range(min(limit, len(data)))]
    return torch.stack([it["pixels"] for it in items]), [it["caption"] for it in items]


# ---------------------------------------------------------------------------------------------------------------------
# Trainer


class DistillTrainer:
    """Owns the models, optimisers and caches of one distillation run; :meth:`train` runs the loop.

    Roles: ``generator`` (the Student denoiser, trained, used once at ``conditioning_t``), ``bridge`` (frozen unless
    co-trained), ``real`` (the Teacher denoiser, frozen, CFG), ``fake`` (Teacher-space fake score: a copy, or the
    Teacher itself with a LoRA adapter that :meth:`_real_score` switches off).
    """

    def __init__(self, cfg: DistillConfig, run_dir: str | Path, accelerator: Accelerator | None = None):
        check_config(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        t = cfg.train
        self.accelerator = accelerator or make_accelerator(cfg, self.run_dir)
        acc = self.accelerator
        self.sharded = is_fsdp(acc)  # FSDP2: the generator, the critic and the real score are sharded
        if self.sharded and t.cotrain_bridge:
            raise ConfigError(
                "train.cotrain_bridge is not supported under FSDP (the Bridge would need its own sharded optimiser): "
                "use DDP (an accelerate config without FSDP) or --set train.cotrain_bridge=false"
            )
        check_ddp_accelerator(cfg, acc, sharded=self.sharded)
        if acc.is_main_process:  # config.json beside the run; refuses a run dir that holds another run
            prepare_run_dir(self.run_dir, cfg, resume_safe=DISTILL_RESUME_SAFE)
        acc.wait_for_everyone()
        seed_everything(derive_seed(t.seed, acc.process_index))
        device = acc.device
        frozen_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.mixed_precision]

        # ---- spaces, Bridge -----------------------------------------------------------------------------------------
        self.student: Space = load_space(cfg.model.student_family, cfg.model.student_path)
        self.teacher: Space = load_space(cfg.model.teacher_family, cfg.model.teacher_path)
        for space in (self.student, self.teacher):
            space.requires_grad_(False)
            space.to(device=device, dtype=frozen_dtype)
        if cfg.model.bridge_kind in TRAINABLE_KINDS:
            self.bridge = Bridge.load(cfg.model.bridge_path, self.student, self.teacher)
        else:
            self.bridge = Bridge.build(cfg.model.bridge_kind, self.student, self.teacher)
        self.bridge.to(device).requires_grad_(t.cotrain_bridge)

        # ---- prompt caches (both spaces encode the same text with their own encoders) -------------------------------
        self.prompts = load_prompts(cfg.data.prompts)
        self.sample_prompts = list(cfg.log.sample_prompts) or self.prompts[:8]
        self.cond_s = self.student.prompt_encoder.encode_cached(self.prompts).to(device)
        self.cond_t = self.teacher.prompt_encoder.encode_cached(self.prompts).to(device)
        self.uncond_t = self.teacher.prompt_encoder.encode_cached([""]).to(device)
        self.sample_cond = self.student.prompt_encoder.encode_cached(self.sample_prompts).to(device)
        self.reals = self._encode_reals() if cfg.data.real_images else None
        if t.offload_text_encoders:  # every embedding a run needs is cached above; nothing below encodes text
            self._offload("text encoders", [space.prompt_encoder for space in (self.student, self.teacher)])
        if t.offload_idle_vaes:  # the reals are encoded above; a step decodes with the Student's decoder only
            self._offload("idle VAE parts", self._idle_vae_parts())

        # ---- generator, fake score, GAN head, EMA -------------------------------------------------------------------
        generator = self.student.denoiser  # the Student base itself: nothing else needs its frozen weights
        generator.to(torch.float32).requires_grad_(True)
        if cfg.model.fake_score == "copy":
            fake = copy.deepcopy(self.teacher.denoiser).to(torch.float32).requires_grad_(True)
        else:
            fake = self.teacher.denoiser  # shared base; only the adapter trains
            add_lora(fake.backbone, cfg.model.lora_rank)
            for p in fake.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if t.gradient_checkpointing:
            for d in (generator, fake):
                d.backbone.enable_gradient_checkpointing()
        step_modules = self._step_modules(generator, fake)
        if t.channels_last:  # before the EMA copy, so the EMA (the sampler) has the same layout
            conv = {role: m for role, m in step_modules.items() if is_convolutional(m)}
            for m in conv.values():
                to_channels_last(m)
            logger.info("channels_last: %s", ", ".join(conv) or "no convolutional module in the step")
        for key, switch in MODULE_SWAPS.items():  # before the EMA copy too: the copy keeps the classes / processors
            if getattr(t, key):
                switched = {role: switch(m) for role, m in step_modules.items()}
                logger.info("%s: %s", key, ", ".join(f"{r} ({n})" for r, n in switched.items() if n) or "none")
        self.gan_head = self._build_gan_head(fake) if t.gan_weight > 0 else None
        self.ema = copy.deepcopy(generator).requires_grad_(False) if t.ema_decay > 0 else None
        if t.compile:  # after LoRA (peft wraps Linears first) and the EMA copy; before prepare (DDP wraps outside)
            counts = {role: compile_blocks(m) for role, m in step_modules.items()}
            logger.info("compile: %s", ", ".join(f"{role} ({n} blocks)" for role, n in counts.items()))
        apply_ddp_graph_split(t, acc)

        gen_call, critic_call = DenoiserCall(generator), DenoiserCall(fake, head=self.gan_head)
        gen_params = list(generator.parameters()) + (list(self.bridge.parameters()) if t.cotrain_bridge else [])
        critic_params = [p for p in critic_call.parameters() if p.requires_grad]  # fake score (or LoRA) + GAN head
        opt_g = make_adamw(gen_params, lr=t.lr_generator, weight_decay=t.weight_decay, fused=t.fused_optimizer)
        opt_c = make_adamw(critic_params, lr=t.lr_critic, weight_decay=t.weight_decay, fused=t.fused_optimizer)
        # One model with its optimiser per prepare call: what FSDP2 asks, and the same as one call under DDP.
        wrap = WrapPolicy(acc) if self.sharded else None
        if wrap:
            wrap.fit(gen_call)
        self.generator, self.opt_g = acc.prepare(gen_call, opt_g)
        if wrap:
            wrap.fit(critic_call)
        self.fake, self.opt_c = acc.prepare(critic_call, opt_c)
        if t.cotrain_bridge:
            self.bridge = acc.prepare(self.bridge)
        # The real score: the Teacher, frozen (no DDP needed); sharded like the rest under FSDP. A LoRA fake score is
        # the Teacher itself, so the real score runs through the critic's module with the adapter off.
        if cfg.model.fake_score == "lora":
            self.real = self.fake
        else:
            self.real = DenoiserCall(self.teacher.denoiser)
            if self.sharded:
                wrap.fit(self.real)
                self.real = shard_frozen(acc, self.real)
        if self.sharded:  # FSDP2 swaps the parameters for DTensor shards: the optimisers now hold those
            gen_params = [p for g in self.opt_g.optimizer.param_groups for p in g["params"]]
            critic_params = [p for g in self.opt_c.optimizer.param_groups for p in g["params"]]
        self.gen_params, self.critic_params = gen_params, critic_params
        self.generator_denoiser, self.fake_denoiser = generator, fake  # unwrapped, for checkpoints and hooks

        # ---- bookkeeping --------------------------------------------------------------------------------------------
        self.guard = NonFiniteGuard(t.max_nonfinite_steps, accelerator=acc)
        self.step = 0
        self._compile_logged = not t.compile  # the first step of a compiled run says what it compiled

    # ---- setup helpers ----------------------------------------------------------------------------------------------
    def _offload(self, what: str, modules: list[nn.Module]) -> None:
        """Move modules the step never runs to :data:`OFFLOAD_DEVICE` (CPU); logs the accelerator memory freed."""
        device = self.accelerator.device
        cuda = device.type == "cuda"
        before = torch.cuda.memory_allocated(device) if cuda else 0
        for module in modules:
            module.to(OFFLOAD_DEVICE)
        if cuda:
            torch.cuda.empty_cache()
            freed = (before - torch.cuda.memory_allocated(device)) / 2**30
            logger.info("%s offloaded to %s: %.2f GiB freed on %s", what, OFFLOAD_DEVICE, freed, device)

    def _idle_vae_parts(self) -> list[nn.Module]:
        """The VAE parts no step uses: the Student's encoder (its decoder feeds the Bridge prior and the samples) and
        the Teacher's whole VAE, or its decoder side only when the ``decode_encode`` Bridge encodes with it."""
        student, teacher = self.student.codec.vae, self.teacher.codec.vae
        parts = [student.encoder, student.quant_conv]
        if self.cfg.model.bridge_kind == "decode_encode":
            parts += [teacher.decoder, teacher.post_quant_conv]
        else:
            parts.append(teacher)
        return [m for m in parts if m is not None]

    def _step_modules(self, generator: Denoiser, fake: Denoiser) -> dict[str, nn.Module]:
        """The networks a training step runs, by role, each once: what ``train.compile`` / ``channels_last`` touch.

        The real score is the Teacher's backbone; with a LoRA fake score it *is* the fake score's backbone."""
        modules = {"generator": generator.backbone, "fake_score": fake.backbone}
        if self.teacher.denoiser.backbone is not fake.backbone:
            modules["real_score"] = self.teacher.denoiser.backbone
        kind = self.cfg.model.bridge_kind
        if kind in ("prior_projector", "decode_encode"):  # the Bridge decodes z_s (also for Bridge co-training)
            modules["student_vae_decoder"] = self.student.codec.vae.decoder
        if kind == "decode_encode":
            modules["teacher_vae_encoder"] = self.teacher.codec.vae.encoder
        if self.bridge.projector is not None:
            modules["bridge_projector"] = self.bridge.projector
        return modules

    def _encode_reals(self) -> dict[str, Tensor | PromptEmbeds]:
        """Real images → Teacher latents (GAN reals) and Student latents (Bridge co-training), with captions."""
        resolution = max(self.teacher.resolution, self.student.resolution)
        images, captions = load_real_images(self.cfg.data.real_images, resolution, self.cfg.data.max_real_images)
        device = self.accelerator.device
        out: dict = {"real_cond_t": self.teacher.prompt_encoder.encode_cached(captions).to(device)}
        for key, space in (("real_z_t", self.teacher), ("real_z_s", self.student)):
            latents = []
            for chunk in images.split(32):
                pixels = torch.nn.functional.interpolate(
                    chunk.float(), size=(space.resolution,) * 2, mode="bilinear", antialias=True
                )
                dtype = next(space.codec.parameters()).dtype
                with torch.no_grad():
                    latents.append(space.codec.encode(pixels.to(device, dtype)).float())
            out[key] = torch.cat(latents)
        return out

    def _build_gan_head(self, fake: Denoiser) -> GANHead:
        """Size the head by one probe forward through the fake score's feature block."""
        c, h, w = self.teacher.latent_shape
        device = self.accelerator.device
        x = torch.zeros(1, c, h, w, device=device)
        with torch.no_grad(), capture_features(feature_module(fake.backbone)) as feats:
            fake.raw(x, torch.full((1,), 0.5, device=device), self.cond_t[:1])
        channels = feats[0].shape[1] if feats[0].ndim == 4 else feats[0].shape[-1]
        return GANHead(channels).to(device)

    # ---- the pieces of one step -------------------------------------------------------------------------------------
    def batch(self, gen: torch.Generator) -> dict:
        """Prompt indices drawn from the step's generator, with their cached embeddings (and reals)."""
        b = self.cfg.train.batch_size
        idx = torch.randint(len(self.prompts), (b,), generator=gen, device=gen.device).cpu()
        batch = {"cond_s": self.cond_s[idx], "cond_t": self.cond_t[idx], "uncond_t": self.uncond_t.repeat(b)}
        if self.reals is not None:
            ridx = torch.randint(len(self.reals["real_z_t"]), (b,), generator=gen, device=gen.device).cpu()
            batch |= {k: v[ridx] for k, v in self.reals.items()}
        return batch

    def generate(
        self, cond_s: PromptEmbeds, gen: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """``z_s = G_θ(z, c)``: one x0-prediction of the generator from pure noise at ``conditioning_t``."""
        if noise is None:
            noise = _randn((len(cond_s), *self.student.latent_shape), gen)
        t = torch.full((len(noise),), self.cfg.train.conditioning_t, device=noise.device)
        return self.generator("denoise", noise, t, cond_s)

    def _real_score(self, x_t: Tensor, t: Tensor, batch: dict) -> Tensor:
        """``μ_real``: the Teacher's CFG x0-prediction (adapter off when the fake score is a LoRA on it)."""
        lora = self.cfg.model.fake_score == "lora"
        scale = self.cfg.train.guidance_scale

        def real(denoiser: Denoiser) -> Tensor:
            with adapters_disabled(denoiser.backbone) if lora else contextlib.nullcontext():
                return denoiser.denoise(x_t, t, batch["cond_t"], guidance_scale=scale, uncond=batch["uncond_t"])

        with torch.no_grad():
            return self.real(real)

    def _gan_logits(self, x0: Tensor, cond: PromptEmbeds, t: Tensor, eps: Tensor) -> Tensor:
        """GAN-head logits of Teacher latents ``x0`` noised to ``t`` (one forward of the wrapped critic).

        The generator update only needs the gradient that reaches ``x0``: the pass stops at the feature block, and
        (unsharded) the critic's weights are frozen for it, so its backward computes no weight gradient the critic
        update would zero (17.1 TFLOP for the SD3.5-M fake score at batch 4, bench/gan_pass_flops.py). Under DDP the
        forward also runs in ``no_sync``: DDP waits for no critic gradient. Under FSDP2 the weights keep
        ``requires_grad`` (freezing sharded parameters for one pass is not tried) and their gradients are
        reduce-scattered as before (FSDP2 finalises blocks that got none).

        With ``train.gradient_checkpointing`` the weights keep ``requires_grad`` too: the checkpointed blocks are
        recomputed in the backward, after the pass, and a recompute with the weights requiring grad saves other
        tensors than the frozen forward did (torch's CheckpointError). Their gradients are computed and dropped by the
        critic update's ``zero_grad``, as under FSDP2."""
        block = feature_module(self.fake_denoiser.backbone)

        def logits(denoiser: Denoiser) -> Tensor:
            with capture_features(block) as feats, run_to(denoiser.backbone, block):  # features only: stop there
                denoiser.raw(denoiser.noise(x0, t, eps), t, cond)
            return self.gan_head(feats[-1])

        if self.sharded:
            return self.fake(logits)
        checkpointed = self.cfg.train.gradient_checkpointing
        frozen = contextlib.nullcontext() if checkpointed else weights_frozen(self.critic_params)
        with self.accelerator.no_sync(self.fake), frozen:
            return self.fake(logits)

    def generator_loss(self, batch: dict, gen: torch.Generator) -> tuple[Tensor, dict]:
        """DM loss (+ GAN, + Bridge reconstruction) of one generator update; gradients reach ``G_θ`` (and ``B_φ``)."""
        t = self.cfg.train
        z_hat = self.bridge(self.generate(batch["cond_s"], gen))  # ẑ_t = B_φ(G_θ(z, c))
        tau = self.teacher.denoiser.sample_time(len(z_hat), gen, t.t_min, t.t_max)
        eps = _randn(z_hat.shape, gen)
        x_tau = self.teacher.denoiser.noise(z_hat.detach(), tau, eps)
        mu_real = self._real_score(x_tau, tau, batch)
        with torch.no_grad():
            mu_fake = self.fake("denoise", x_tau, tau, batch["cond_t"])
        loss, logs = dm_loss(z_hat, mu_real, mu_fake)
        logs["loss/dm"] = loss.item()
        if self.gan_head is not None:
            loss_gan = gan_generator_loss(self._gan_logits(z_hat, batch["cond_t"], tau, eps))
            loss = loss + t.gan_weight * loss_gan
            logs["loss/gan_g"] = loss_gan.item()
        if t.cotrain_bridge:
            loss_rec = reconstruction_loss(self.bridge(batch["real_z_s"]), batch["real_z_t"])
            loss = loss + t.bridge_rec_weight * loss_rec
            logs["loss/bridge_rec"] = loss_rec.item()
        return loss, logs

    def critic_loss(self, batch: dict, gen: torch.Generator) -> tuple[Tensor, dict]:
        """Fake-score denoising loss on ``sg(ẑ_t)`` (+ GAN discriminator loss); gradients reach the critic only."""
        t = self.cfg.train
        with torch.no_grad():
            z_hat = self.bridge(self.generate(batch["cond_s"], gen))
        tau = self.teacher.denoiser.sample_time(len(z_hat), gen, t.t_min, t.t_max)
        eps = _randn(z_hat.shape, gen)
        if self.gan_head is None:
            loss = self.fake(fake_score_loss, z_hat, batch["cond_t"], tau, eps)
            return loss, {"loss/fake": loss.item()}
        block = feature_module(self.fake_denoiser.backbone)

        def loss_and_logits(denoiser: Denoiser) -> tuple[Tensor, Tensor]:
            # One forward of the wrapped critic for all three passes; the fake sample's features come from the
            # fake-score loss pass itself (same x_τ), the reals are noised with the same (τ, ε).
            with capture_features(block) as feats:
                loss = fake_score_loss(denoiser, z_hat, batch["cond_t"], tau, eps)
                real = batch["real_z_t"]
                with run_to(denoiser.backbone, block):  # the reals' pass only needs the features
                    denoiser.raw(denoiser.noise(real, tau, eps), tau, batch["real_cond_t"])
            feat_fake, feat_real = feats
            return loss, self.gan_head(torch.cat([feat_real, feat_fake]))

        loss, logits = self.fake(loss_and_logits)
        loss_d = gan_discriminator_loss(*logits.chunk(2))
        logs = {"loss/fake": loss.item(), "loss/gan_d": loss_d.item()}
        return loss + t.gan_critic_weight * loss_d, logs

    # ---- updates ----------------------------------------------------------------------------------------------------
    def _update(self, micro_batch: Callable[[], tuple[Tensor, dict]], opt, params: list[Tensor], name: str,
                step: int, synced: list[nn.Module]) -> dict:
        """One optimiser update: backward ``train.gradient_accumulation_steps`` micro-batches (each ``micro_batch()``
        draws its batch and returns its loss and logs; gradients averaged over them), clip and step, unless a loss is
        NaN/inf (then the update is skipped). Logs: each value averaged over the micro-batches, and the grad norm.

        Under DDP the micro-batches before the last run in ``no_sync`` of ``synced`` (the wrapped modules that get
        gradients in this update): one all-reduce per update. Under FSDP2 every backward reduce-scatters, so the
        gradients stay sharded (the memory of one micro-batch). The guard decides for every process at once, before
        the last backward, so all processes take or skip it alike."""
        k = self.cfg.train.gradient_accumulation_steps
        opt.zero_grad(set_to_none=True)  # also drops grads the other update left (the GAN path reaches the critic)
        losses, micro_logs, norm = {}, [], None
        for i in range(k):
            last = i == k - 1
            with contextlib.ExitStack() as no_sync:
                if not (last or self.sharded):
                    for module in synced:
                        no_sync.enter_context(self.accelerator.no_sync(module))
                with self.accelerator.autocast():
                    loss, logs = micro_batch()
                micro_logs.append(logs)
                losses[f"loss/{name}" if k == 1 else f"loss/{name}[{i}]"] = loss.detach()
                if last and not self.guard.check(losses, step):
                    break  # no process runs the synchronised backward
                self.accelerator.backward(loss / k)
        else:
            max_norm = self.cfg.train.max_grad_norm
            max_norm = max_norm if max_norm > 0 else float("inf")
            if self.sharded:  # accelerate clips only a whole model's parameters (not a LoRA's) under FSDP
                self.accelerator.unscale_gradients(opt)
                norm = clip_grad_norm(params, max_norm)
            else:
                norm = self.accelerator.clip_grad_norm_(params, max_norm)
            opt.step()
        opt.zero_grad(set_to_none=True)
        logs = {key: sum(micro[key] for micro in micro_logs) / k for key in micro_logs[0]}
        if norm is not None:
            logs[f"grad_norm/{name}"] = float(norm)
        return logs

    def generator_step(self, step: int) -> dict:
        gen = step_generator(self.cfg.train.seed, self.accelerator.process_index, step, self.accelerator.device,
                             "generator")  # fmt: skip
        synced = [self.generator, self.bridge] if self.cfg.train.cotrain_bridge else [self.generator]
        logs = self._update(lambda: self.generator_loss(self.batch(gen), gen), self.opt_g, self.gen_params,
                            "generator", step, synced)  # fmt: skip
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.generator_denoiser.parameters()):
                    e.lerp_(full_tensor(p.detach()).to(e.dtype), 1.0 - self.cfg.train.ema_decay)
        return logs

    def critic_step(self, step: int) -> dict:
        gen = step_generator(self.cfg.train.seed, self.accelerator.process_index, step, self.accelerator.device,
                             "critic")  # fmt: skip
        return self._update(lambda: self.critic_loss(self.batch(gen), gen), self.opt_c, self.critic_params, "critic",
                            step, [self.fake])  # fmt: skip

    def train_step(self, step: int) -> dict:
        """Step ``step`` (from 1): a generator update every ``critic_steps_per_generator_step`` steps, then a critic
        update (DMD2's order: the generator first, at the first step)."""
        first, logs = not self._compile_logged, {}
        if first:
            t0, before = time.perf_counter(), compile_cache_counts()
        if (step - 1) % self.cfg.train.critic_steps_per_generator_step == 0:
            logs |= self.generator_step(step)
        logs |= self.critic_step(step)
        if first:
            self._compile_logged = True
            log_first_compiled_step(time.perf_counter() - t0, compile_cache_counts(since=before))
        return logs

    # ---- state ------------------------------------------------------------------------------------------------------
    def state_objects(self) -> dict:
        """Everything a resumed run needs, by checkpoint name (only trainable parameters of the models)."""
        if self.sharded:  # the same names and shapes, gathered whole from the shards (collective)
            objects = {
                "generator": ShardedParams(self.generator, "denoiser."),
                "fake_score": ShardedParams(self.fake, "denoiser."),
                "opt_generator": ShardedOptimizer(self.generator, self.opt_g),
                "opt_critic": ShardedOptimizer(self.fake, self.opt_c),
            }
        else:
            objects = {
                "generator": TrainableParams(self.generator_denoiser),
                "fake_score": TrainableParams(self.fake_denoiser),
                "opt_generator": UnshardedOptimizer(self.opt_g),
                "opt_critic": UnshardedOptimizer(self.opt_c),
            }
        if self.ema is not None:
            objects["ema"] = self.ema
        if self.gan_head is not None:
            objects["gan_head"] = ShardedParams(self.fake, "head.") if self.sharded else self.gan_head
        if self.cfg.train.cotrain_bridge:
            objects["bridge"] = TrainableParams(self.accelerator.unwrap_model(self.bridge))
        return objects

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """A grid of one-step samples (EMA weights if kept) on the fixed prompts and noise: samples/step_N.png.

        Called on every process; a sharded generator (FSDP, no EMA) runs on all of them, the main one saves."""
        gathered = self.sharded and self.ema is None
        if not (self.accelerator.is_main_process or gathered):
            return None
        device = self.accelerator.device
        gen = torch.Generator(device).manual_seed(derive_seed(self.cfg.train.seed, "samples"))
        noise = torch.randn((len(self.sample_cond), *self.student.latent_shape), generator=gen, device=device)
        t = torch.full((len(noise),), self.cfg.train.conditioning_t, device=device)
        with self.accelerator.autocast():
            if self.ema is not None:
                x0 = self.ema.denoise(noise, t, self.sample_cond)
            elif gathered:
                x0 = self.generator("denoise", noise, t, self.sample_cond)
            else:
                x0 = self.generator_denoiser.denoise(noise, t, self.sample_cond)
        if not self.accelerator.is_main_process:
            return None
        pixels = self.student.codec.decode(x0.to(next(self.student.codec.parameters()).dtype))
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor_grid(pixels.float(), ncol=min(8, len(pixels))).save(path)
        return path

    # ---- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to ``train.max_steps`` through the shared loop (resume → step → log → samples → checkpoint)."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.log.tensorboard:
            acc.init_trackers("distill")

        def step_fn(step: int) -> dict:
            self.step = step
            return self.train_step(step)

        def sample_fn(step: int) -> None:
            self.step = step
            self.save_samples()

        result = train_loop(
            self.run_dir, max_steps=cfg.train.max_steps, step_fn=step_fn, objects=self.state_objects(),
            checkpoint_every=cfg.checkpoint.every, keep=cfg.checkpoint.keep, sample_every=cfg.log.sample_every,
            sample_fn=sample_fn, config_hash=config_hash(cfg, DISTILL_RESUME_SAFE), guard=self.guard, accelerator=acc,
            desc="distill",
        )  # fmt: skip
        acc.end_training()
        self.step = result.step
        return result.step
