"""Distillation presets: functions returning a whole :class:`DistillConfig` (torchtitan style).

``crossdistill distill --preset NAME --run-dir DIR --set key=value ...`` starts from one of :data:`PRESETS`.
Hub ids are the usual public repositories; pass local folders with ``--set model.teacher_path=...``.
Real-model presets need a prompt file (``--set data.prompts=prompts.txt``) and, except the shared-space one, a
trained Bridge (``--set model.bridge_path=...`` from ``crossdistill bridge train``). Optimiser values follow DMD2's
SD 1.5 recipe (lr 1e-5, 10 critic steps per generator step); CFG scales are each Teacher's usual sampling scale.
"""

from __future__ import annotations

from collections.abc import Callable

from crossdistill.train.distill import DistillConfig

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def emoji() -> DistillConfig:
    """Cross-space on the shipped emoji world: 32 px SD1.5-family Student ← 64 px SD3-family Teacher. CPU-sized."""
    cfg = DistillConfig()
    cfg.model.student_family, cfg.model.student_path = "sd15", "emoji:student"
    cfg.model.teacher_family, cfg.model.teacher_path = "sd3", "emoji:teacher"
    cfg.model.bridge_kind = "prior_projector"  # bridge_path: the folder `crossdistill bridge train` wrote
    t = cfg.train
    t.max_steps, t.batch_size = 400, 16
    t.lr_generator, t.lr_critic = 1e-4, 1e-4  # small models, few steps: 10x DMD2's SD 1.5 rate
    t.critic_steps_per_generator_step = 5
    t.guidance_scale = 3.0
    cfg.checkpoint.every, cfg.log.sample_every = 100, 100
    cfg.data.prompts = "emoji:train"
    return cfg


def emoji_shared() -> DistillConfig:
    """The shared-space baseline on the emoji world: plain DMD2 with the Student base as its own Teacher."""
    cfg = emoji()
    cfg.model.teacher_family, cfg.model.teacher_path = "sd15", "emoji:student"
    cfg.model.bridge_kind, cfg.model.bridge_path = "identity", None
    return cfg


def _real(teacher_family: str, teacher_path: str, guidance_scale: float, fake_score: str = "copy") -> DistillConfig:
    """SD 1.5 Student ← a real Teacher on GPUs: bf16, gradient checkpointing, DMD2's SD 1.5 optimiser settings."""
    cfg = DistillConfig()
    cfg.model.student_family, cfg.model.student_path = "sd15", SD15
    cfg.model.teacher_family, cfg.model.teacher_path = teacher_family, teacher_path
    cfg.model.bridge_kind = "prior_projector"
    cfg.model.fake_score = fake_score
    t = cfg.train
    t.max_steps, t.batch_size = 20000, 4
    t.lr_generator = t.lr_critic = 1e-5
    t.critic_steps_per_generator_step = 10
    t.guidance_scale = guidance_scale
    t.ema_decay = 0.999
    t.mixed_precision, t.gradient_checkpointing = "bf16", True
    cfg.checkpoint.every, cfg.log.sample_every = 500, 500
    cfg.data.prompts = ""  # required: a text file of prompts
    return cfg


def sd15_from_sd35_medium() -> DistillConfig:
    return _real("sd3", "stabilityai/stable-diffusion-3.5-medium", guidance_scale=4.5)


def sd15_from_sd35_large() -> DistillConfig:
    # 8 B Teacher: the fake score is a LoRA on the shared Teacher base (one copy in memory).
    return _real("sd3", "stabilityai/stable-diffusion-3.5-large", guidance_scale=3.5, fake_score="lora")


def sd15_from_flux_dev() -> DistillConfig:
    # FLUX.1-dev is guidance-distilled: guidance_scale feeds its guidance embedding (one pass, no CFG); 12 B → LoRA.
    return _real("flux", "black-forest-labs/FLUX.1-dev", guidance_scale=3.5, fake_score="lora")


def sd15_from_sdxl() -> DistillConfig:
    return _real("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", guidance_scale=8.0)  # DMD2's SDXL scale


def sd15_from_sd15() -> DistillConfig:
    """Shared-space DMD2 on SD 1.5 (the baseline of the real-model results): DMD2's own SD 1.5 setting."""
    cfg = _real("sd15", SD15, guidance_scale=1.75)
    cfg.model.bridge_kind = "identity"
    return cfg


PRESETS: dict[str, Callable[[], DistillConfig]] = {
    "emoji": emoji,
    "emoji_shared": emoji_shared,
    "sd15_from_sd35_medium": sd15_from_sd35_medium,
    "sd15_from_sd35_large": sd15_from_sd35_large,
    "sd15_from_flux_dev": sd15_from_flux_dev,
    "sd15_from_sdxl": sd15_from_sdxl,
    "sd15_from_sd15": sd15_from_sd15,
}
