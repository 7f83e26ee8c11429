"""Stage-1 Bridge training (DESIGN.md §2): ``crossdistill bridge train``.

On captioned images ``x`` with prompts ``c``: ``z_s = E_s(x at Student resolution)``, ``z_t* = E_t(x at Teacher
resolution)``, ``ẑ_t = B_φ(z_s)``, and ``L_bridge = λ_rec L_rec + λ_attn L_attn (+ λ_out L_out)`` from
:func:`crossdistill.losses.bridge.bridge_loss`. Both spaces are frozen; only the projector ``P_φ`` learns.

Both VAEs and the Teacher's prompt encoder are frozen, so when the image set is small enough every latent pair and
prompt embedding is computed once and cached to ``<run_dir>/cache/latents.safetensors`` (and, for
``prior_projector``, the decoder prior ``D_s(z_s)`` is kept in memory): a step then costs only the projector and
(for the fidelity terms) two Teacher passes. The loop around a step (resume, stats.jsonl, checkpoints, progress) is
the shared :func:`crossdistill.train.runner.train_loop`; every random draw of a step comes from
``step_generator(seed, rank, step)`` so a resumed run continues exactly. ``accelerate launch`` runs it on several
GPUs (each rank draws its own batch; gradients are averaged by DDP; only the main process writes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from crossdistill.bridge.model import Bridge
from crossdistill.config import config_hash, to_dict, warn_ignored
from crossdistill.errors import ConfigError
from crossdistill.losses.bridge import BridgeLossWeights, bridge_loss
from crossdistill.models.base import PromptEmbeds, Space
from crossdistill.models.registry import get_family, load_space
from crossdistill.train.guard import NonFiniteGuard
from crossdistill.train.runner import progress_enabled, train_loop
from crossdistill.train.seeding import seed_everything, step_generator
from crossdistill.train.stats import tracker_kwargs

logger = logging.getLogger(__name__)

BridgeKind = Literal["prior_projector", "projector_only", "decode_encode", "identity"]

# --------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(kw_only=True)
class ModelConfig:
    source: Literal["emoji", "pretrained", "tiny"] = "emoji"  # emoji: the shipped world; tiny: random test spaces
    student_family: str = "sd15"  # family of the Student (see `crossdistill info`)
    student_path: str | None = None  # local diffusers folder or hub id of the Student (source=pretrained)
    teacher_family: str = "sd3"  # family of the Teacher
    teacher_path: str | None = None  # local diffusers folder or hub id of the Teacher (source=pretrained)
    student_resolution: int | None = None  # pixels; None keeps the space's own (512 for SD 1.5)
    teacher_resolution: int | None = None  # pixels; None keeps the space's own (1024 for SD3.5 / FLUX / SDXL)


@dataclass(kw_only=True)
class BridgeArchConfig:
    kind: BridgeKind = "prior_projector"  # decode_encode / identity have nothing to train: written straight out
    hidden_channels: int = 128  # width of the projector's residual blocks
    num_blocks: int = 4  # residual blocks in the projector
    prior_up_blocks: int | None = None  # None: project the fully decoded image; k: features after k decoder blocks


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["emoji", "images"] = "emoji"  # the emoji world, or an image folder / parquet file
    path: str | None = None  # image folder or .parquet of captioned images (source=images)
    held_out_path: str | None = None  # held-out images for `bridge report` (source=images)
    num_emoji: int | None = None  # emoji world: keep this many emoji (None: all)
    max_images: int | None = None  # use at most this many training images, spread evenly over the set (None: all)
    cache_latents: bool = True  # encode every image and prompt once, to <run_dir>/cache (when the set is small)
    cache_max_images: int = 20000  # above this many images, encode each batch on the fly instead
    cache_prior_gb: float = 2.0  # prior_projector: keep D_s(z_s) of every cached latent in memory up to this size
    encode_batch_size: int = 32  # images per VAE/text-encoder batch while caching


@dataclass(kw_only=True)
class LossConfig(BridgeLossWeights):
    layers: list[str] | None = None  # Teacher attention layers compared by L_attn (None: every capturable layer)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3  # AdamW learning rate of the projector
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 50  # linear learning-rate warm-up
    grad_clip: float = 1.0  # max gradient norm (<= 0: no clipping)


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 2000  # optimiser steps (raising it and rerunning resumes the run)
    batch_size: int = 16  # images per step and process
    seed: int = 0  # seeds the projector init and every per-step draw
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # accelerate autocast for the Bridge and the Teacher
    gradient_checkpointing: bool = False  # recompute the Teacher's activations in backward (less memory)


@dataclass(kw_only=True)
class LogConfig:
    tensorboard: bool = False  # also log to tensorboard through accelerate (if installed)


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 500  # save resumable state every N steps (and at the end)
    keep: int = 2  # how many checkpoints to keep


@dataclass(kw_only=True)
class BridgeTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    bridge: BridgeArchConfig = field(default_factory=BridgeArchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def preset_emoji() -> BridgeTrainConfig:
    """The emoji world: 32 px SD1.5-family Student → 64 px SD3-family Teacher, a few CPU minutes."""
    return BridgeTrainConfig(
        bridge=BridgeArchConfig(hidden_channels=64, num_blocks=2),
        loss=LossConfig(rec=1.0, attn=0.1),
        train=TrainConfig(max_steps=400, batch_size=32),
        checkpoint=CheckpointConfig(every=200),
    )


def _pretrained(teacher_family: str) -> BridgeTrainConfig:
    # Real models: SD 1.5 at 512 px into a 1024 px Teacher; set the folders with --set model.*_path=...
    return BridgeTrainConfig(
        model=ModelConfig(source="pretrained", teacher_family=teacher_family),
        data=DataConfig(source="images"),
        train=TrainConfig(max_steps=5000, batch_size=8, mixed_precision="bf16", gradient_checkpointing=True),
    )


def preset_sd15_sd35() -> BridgeTrainConfig:
    """SD 1.5 ← SD 3.5 Medium or Large (same latent space; pass either folder as model.teacher_path)."""
    return _pretrained("sd3")


def preset_sd15_flux() -> BridgeTrainConfig:
    """SD 1.5 ← FLUX.1-dev."""
    return _pretrained("flux")


def preset_sd15_sdxl() -> BridgeTrainConfig:
    """SD 1.5 ← SDXL (4-channel latents like SD 1.5's, other VAE scale, 2× the resolution)."""
    return _pretrained("sdxl")


def preset_tiny() -> BridgeTrainConfig:
    """Random tiny spaces (sd15 ← sd3): checks the whole path in seconds; what the tests run."""
    return BridgeTrainConfig(
        model=ModelConfig(source="tiny"),
        bridge=BridgeArchConfig(hidden_channels=16, num_blocks=1),
        data=DataConfig(num_emoji=4),
        train=TrainConfig(max_steps=4, batch_size=4),
        optim=OptimConfig(warmup_steps=0),
        checkpoint=CheckpointConfig(every=2),
    )


PRESETS = {
    "emoji": preset_emoji,
    "sd15_from_sd35_medium": preset_sd15_sd35,
    "sd15_from_sd35_large": preset_sd15_sd35,
    "sd15_from_flux_dev": preset_sd15_flux,
    "sd15_from_sdxl": preset_sd15_sdxl,
    "tiny": preset_tiny,
}

# --------------------------------------------------------------------------------------------------------------------
# Spaces and images


def load_spaces(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """``(student, teacher, emoji_world)``: both spaces frozen, in eval mode, on ``device``, at the configured
    resolutions; ``emoji_world`` is the shipped world's vocabulary for ``model.source=emoji``, else None."""
    world = None
    if cfg.source == "emoji":
        from crossdistill.toy.world import load_world

        toy = load_world(device)
        student, teacher, world = toy.student, toy.teacher, toy.world
    elif cfg.source == "tiny":
        # Different seeds: two tiny spaces of one family must not be the same random network.
        student = get_family(cfg.student_family).tiny(seed=0)
        teacher = get_family(cfg.teacher_family).tiny(seed=1)
    else:
        missing = [k for k in ("student_path", "teacher_path") if getattr(cfg, k) is None]
        if missing:
            raise ConfigError(
                f"model.source=pretrained needs {' and '.join('model.' + k for k in missing)}: "
                "pass --set model.student_path=DIR --set model.teacher_path=DIR (local diffusers folders)"
            )
        student = load_space(cfg.student_family, cfg.student_path)
        teacher = load_space(cfg.teacher_family, cfg.teacher_path)
    for space, res in ((student, cfg.student_resolution), (teacher, cfg.teacher_resolution)):
        if res is not None:
            space.resolution = int(res)
        space.latent_shape  # noqa: B018 - raises a clear error now if the resolution does not fit the VAE
        space.requires_grad_(False).eval().to(device)
    return student, teacher, world


def resize(pixels: Tensor, resolution: int) -> Tensor:
    """``[B, 3, H, W]`` → ``[B, 3, resolution, resolution]`` (antialiased; unchanged if already that size)."""
    if pixels.shape[-1] == resolution and pixels.shape[-2] == resolution:
        return pixels
    return F.interpolate(pixels.float(), size=(resolution, resolution), mode="bilinear", antialias=True)


def image_dataset(cfg: DataConfig, resolution: int, split: str, world=None):
    """Captioned images at ``resolution``: items ``{"pixels": [3, H, W] in [-1, 1], "caption": str}``.

    ``split`` is ``"train"`` or ``"held_out"`` (the emoji world's held-out prompts, or ``data.held_out_path``).
    ``world`` is the shipped emoji world (its vocabulary and split); without it one is built from ``data.num_emoji``.
    """
    if cfg.source == "emoji":
        from crossdistill.data.emoji import EmojiDataset, EmojiWorld

        if world is not None and cfg.num_emoji is not None:
            logger.warning("data.num_emoji is ignored: the shipped emoji world fixes its vocabulary")
        dataset = EmojiDataset(world or EmojiWorld(num_emoji=cfg.num_emoji), split, resolution)
    else:
        from crossdistill.data.images import ImageDataset

        path = cfg.path if split == "train" else cfg.held_out_path
        if path is None:
            key = "data.path" if split == "train" else "data.held_out_path"
            raise ConfigError(f"data.source=images needs {key}: an image folder or a .parquet of captioned images")
        dataset = ImageDataset(path, resolution=resolution)
    if cfg.max_images is not None and split == "train" and len(dataset) > cfg.max_images:
        dataset = evenly_spaced(dataset, cfg.max_images)
    return dataset


def evenly_spaced(dataset, n: int):
    """``n`` items spread over the whole set (image sets are often sorted, e.g. the emoji world by codepoint)."""
    return torch.utils.data.Subset(dataset, torch.linspace(0, len(dataset) - 1, n).round().long().tolist())


def collate(dataset, indices: list[int]) -> tuple[Tensor, list[str]]:
    items = [dataset[i] for i in indices]
    return torch.stack([it["pixels"] for it in items]), [it["caption"] for it in items]


@torch.no_grad()
def encode_pairs(
    student: Space, teacher: Space, pixels: Tensor, captions: list[str]
) -> tuple[Tensor, Tensor, PromptEmbeds]:
    """``(z_s, z_t*, c)``: the same images in both spaces (each at its own resolution) and the Teacher's prompts."""
    device = next(teacher.codec.parameters()).device
    pixels = pixels.to(device)
    z_s = student.codec.encode(resize(pixels, student.resolution)).float()
    z_t = teacher.codec.encode(resize(pixels, teacher.resolution)).float()
    return z_s, z_t, teacher.encode_prompts(captions)


class LatentSet:
    """Training pairs by index: from an in-memory cache of encoded latents, or encoded per batch from images.

    ``prior`` optionally holds the frozen decoder prior ``D_s(z_s)`` of every cached latent (``[N, C, H, W]``)."""

    def __init__(self, dataset, student: Space, teacher: Space, cached: dict[str, Tensor] | None = None):
        self.dataset, self.student, self.teacher, self.cached = dataset, student, teacher, cached
        self.prior: Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Tensor, device: torch.device) -> tuple[Tensor, Tensor, PromptEmbeds, Tensor | None]:
        """``(z_s, z_t*, c, D_s(z_s) or None)`` of the images at ``indices``, on ``device``."""
        if self.cached is None:
            z_s, z_t, cond = encode_pairs(self.student, self.teacher, *collate(self.dataset, indices.tolist()))
            return z_s.to(device), z_t.to(device), cond.to(device), None
        cond = PromptEmbeds({k[5:]: v[indices] for k, v in self.cached.items() if k.startswith("cond.")})
        prior = None if self.prior is None else self.prior[indices].to(device)
        z_s, z_t = self.cached["z_s"][indices].to(device), self.cached["z_t"][indices].to(device)
        return z_s, z_t, cond.to(device), prior

    @torch.no_grad()
    def cache_prior(self, bridge: Bridge, max_gb: float, batch_size: int, device: torch.device) -> bool:
        """Keep ``D_s(z_s)`` of every cached latent in memory if it fits ``max_gb`` (it never changes in stage 1)."""
        if self.cached is None or bridge.config.kind != "prior_projector":
            return False
        z_s = self.cached["z_s"]
        probe = bridge.decoder_prior(z_s[:1].to(device))
        if probe.numel() * probe.element_size() * len(z_s) > max_gb * 2**30:
            logger.info(
                "decoder prior of %d images exceeds data.cache_prior_gb=%g: decoding every step", len(z_s), max_gb
            )
            return False
        chunks = [
            bridge.decoder_prior(z_s[i : i + batch_size].to(device)).cpu() for i in range(0, len(z_s), batch_size)
        ]
        self.prior = torch.cat(chunks)
        return True


def build_cache(dataset, student: Space, teacher: Space, path: Path, key: str, batch_size: int, progress: bool):
    """Encode every image and prompt once; reuse ``path`` if it was written for the same data and models."""
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        logger.info("latent cache %s was made for other data or models: rebuilding it", path)
    chunks = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding latents", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        z_s, z_t, cond = encode_pairs(student, teacher, *collate(dataset, indices))
        chunks.append({"z_s": z_s.cpu(), "z_t": z_t.cpu(), **{f"cond.{k}": v.cpu() for k, v in cond.tensors.items()}})
    tensors = {k: torch.cat([c[k] for c in chunks]).contiguous() for k in chunks[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"key": key})
    tmp.replace(path)  # atomic: a killed run never leaves half a cache that a later one would trust
    return tensors


# --------------------------------------------------------------------------------------------------------------------
# Training


def enable_teacher_checkpointing(teacher: Space) -> bool:
    """Gradient checkpointing of the Teacher's backbone, where diffusers supports it for that model."""
    backbone = teacher.denoiser.backbone
    if getattr(backbone, "_supports_gradient_checkpointing", False):
        backbone.enable_gradient_checkpointing()
        return True
    logger.warning("train.gradient_checkpointing is ignored: %s does not support it", type(backbone).__name__)
    return False


def refuse_fsdp(accelerator) -> None:
    """The Bridge trains under DDP: its trained part (the projector) is small, and its frozen decoder prior and
    Teacher run outside the module accelerate would shard."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "`crossdistill bridge train` runs under DDP, not FSDP (the Bridge's projector is small; FSDP is for "
            "`crossdistill distill`): launch it with an accelerate config without FSDP, e.g. "
            "`accelerate launch --multi_gpu --num_processes N -m crossdistill.cli bridge train ...`"
        )


def train(cfg: BridgeTrainConfig, run_dir: str | Path) -> Path:
    """Train (or, for the kinds without weights, just write) a Bridge; returns ``<run_dir>/bridge``."""
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    out_dir = run_dir / "bridge"
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, **tracker_kwargs(run_dir, cfg.log.tensorboard)
    )
    refuse_fsdp(accelerator)
    device, rank, main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    seed_everything(cfg.train.seed)  # the projector's initial weights
    student, teacher, world = load_spaces(cfg.model, device)
    arch = cfg.bridge
    bridge = Bridge.build(
        arch.kind,
        student,
        teacher,
        hidden_channels=arch.hidden_channels,
        num_blocks=arch.num_blocks,
        prior_up_blocks=arch.prior_up_blocks,
    )
    if not bridge.trainable:
        for key in ("train.max_steps", "loss.attn", "optim.lr", "bridge.hidden_channels", "bridge.num_blocks"):
            warn_ignored(cfg, key, f"a {arch.kind} bridge has nothing to train")
        if main:
            bridge.save_pretrained(out_dir)
        return out_dir
    if cfg.loss.attn == 0 and cfg.loss.out == 0:
        warn_ignored(cfg, "loss.layers", "loss.attn and loss.out are 0 (no Teacher passes)")
    if cfg.train.gradient_checkpointing:
        enable_teacher_checkpointing(teacher)

    # ---- data: latents of both spaces (cached when small) ----------------------------------------------------------
    dataset = image_dataset(cfg.data, max(student.resolution, teacher.resolution), "train", world)
    cached = None
    if cfg.data.cache_latents and len(dataset) <= cfg.data.cache_max_images:
        cache_path = run_dir / "cache" / "latents.safetensors"
        key = hashlib.sha256(json.dumps([to_dict(cfg.model), to_dict(cfg.data)], sort_keys=True).encode()).hexdigest()
        if main:
            build_cache(dataset, student, teacher, cache_path, key, cfg.data.encode_batch_size, progress_enabled())
        accelerator.wait_for_everyone()
        cached = build_cache(dataset, student, teacher, cache_path, key, cfg.data.encode_batch_size, False)
    elif cfg.data.cache_latents:
        warn_ignored(cfg, "data.cache_latents", f"{len(dataset)} images > data.cache_max_images; encoding per batch")
    data = LatentSet(dataset, student, teacher, cached)
    data.cache_prior(bridge, cfg.data.cache_prior_gb, cfg.data.encode_batch_size, device)

    # ---- optimiser, accelerate, the shared loop (resume, stats, checkpoints, progress) -----------------------------
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    warmup = max(1, cfg.optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    bridge, optimizer = accelerator.prepare(bridge, optimizer)
    inner = accelerator.unwrap_model(bridge)
    guard = NonFiniteGuard(accelerator=accelerator)
    if accelerator.log_with:
        accelerator.init_trackers("bridge")

    def step_fn(step: int) -> dict[str, float]:
        # Two streams: batch indices on the CPU, noise/time on the device (so CUDA draws need no host sync).
        batch_gen = step_generator(cfg.train.seed, rank, step, stream="batch")
        indices = torch.randint(len(data), (cfg.train.batch_size,), generator=batch_gen)
        noise_gen = step_generator(cfg.train.seed, rank, step, device, stream="noise")
        z_s, z_t, cond, prior = data.batch(indices, device)
        bridge.train()
        # `hold` keeps the Teacher's attention capture installed through backward (checkpointed recomputation).
        with contextlib.ExitStack() as hold:
            with accelerator.autocast():
                z_hat = bridge(z_s, prior=prior)
                loss, logs = bridge_loss(
                    z_hat, z_t, teacher, cond, cfg.loss, generator=noise_gen, layers=cfg.loss.layers, hold=hold
                )
            if guard.check({"loss/bridge": loss}, step=step):
                accelerator.backward(loss)
                if cfg.optim.grad_clip > 0:
                    logs["grad/norm"] = float(accelerator.clip_grad_norm_(bridge.parameters(), cfg.optim.grad_clip))
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return {**logs, "lr": scheduler.get_last_lr()[0]}

    train_loop(
        run_dir,
        max_steps=cfg.train.max_steps,
        step_fn=step_fn,
        objects={"bridge": inner, "optimizer": optimizer, "scheduler": scheduler},
        checkpoint_every=cfg.checkpoint.every,
        keep=cfg.checkpoint.keep,
        config_hash=config_hash(cfg),
        guard=guard,
        accelerator=accelerator,
        desc=f"bridge {arch.kind}",
    )
    if main:
        inner.save_pretrained(out_dir)
    accelerator.end_training()
    return out_dir
