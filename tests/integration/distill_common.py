"""Shared set-up of the distillation integration tests: tiny spaces on disk, a random Bridge, short configs."""

from __future__ import annotations

from pathlib import Path

from crossdistill.bridge.model import Bridge
from crossdistill.config import apply_overrides
from crossdistill.models.sd3 import SD3Space
from crossdistill.models.sd15 import SD15Space
from crossdistill.models.text import GenericTextEncoder
from crossdistill.train.distill import DistillConfig

PROMPTS = ["a red cat", "a blue dog on grass", "a green frog", "a yellow sun"]


def write_prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def tiny_minilm_student(folder: Path) -> Path:
    """A tiny SD1.5 space reading prompts with the emoji world's MiniLM (BERT) encoder, saved as a diffusers folder."""
    path = folder / "student"
    if not path.exists():
        SD15Space.tiny(seed=0, text_encoder=GenericTextEncoder.minilm(max_length=16)).save_pretrained(path)
    return path


def random_bridge(folder: Path) -> Path:
    """An untrained prior_projector Bridge sd15 tiny → sd3 tiny (its quality does not matter to these tests)."""
    path = folder / "bridge"
    Bridge.build("prior_projector", SD15Space.tiny(seed=0), SD3Space.tiny(seed=0), hidden_channels=16,
                 num_blocks=1).save_pretrained(path)  # fmt: skip
    return path


def tiny_config(folder: Path, *overrides: str, cross: bool = False) -> DistillConfig:
    """A few-step CPU config: shared-space on the tiny SD1.5, or cross-space sd15 tiny ← sd3 tiny."""
    base = [
        f"data.prompts={write_prompts(folder)}", "model.student_family=sd15", "model.student_path=tiny:0",
        "train.batch_size=2", "train.max_steps=4", "train.critic_steps_per_generator_step=2",
        "train.lr_generator=1e-3", "train.lr_critic=1e-3", "checkpoint.every=2", "log.sample_every=0",
    ]  # fmt: skip
    if cross:
        base += ["model.teacher_family=sd3", "model.teacher_path=tiny:0", "model.bridge_kind=prior_projector",
                 f"model.bridge_path={random_bridge(folder)}"]  # fmt: skip
    else:
        base += ["model.teacher_family=sd15", "model.teacher_path=tiny:0", "model.bridge_kind=identity"]
    return apply_overrides(DistillConfig(), base + list(overrides))
