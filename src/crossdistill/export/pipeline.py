"""Export a distilled run as a plain diffusers ``StableDiffusionPipeline`` folder that samples in one step.

The folder holds the Student's own VAE, text encoder and tokenizer, the distilled UNet and a ``DDIMScheduler`` set
up so that ``pipe(prompt, num_inference_steps=1, guidance_scale=1.0)`` reproduces the trainer's ``D_s(G_θ(z, c))``:

- ``timestep_spacing="trailing"`` makes the one inference timestep 999, the generator's ``conditioning_t = 1``;
- ``set_alpha_to_one=True`` makes the step's "previous" ᾱ equal 1, so the DDIM update returns exactly the
  x0-prediction ``(z − √(1−ᾱ₉₉₉) ε̂) / √ᾱ₉₉₉`` (no re-noising), and ``clip_sample=False`` leaves it unclipped;
- ``guidance_scale=1`` (no CFG: the generator was trained without it) and ``latents=z`` give the same noise.

Nothing of the Bridge or the Teacher is needed at inference. The run's config is written beside the pipeline
(``crossdistill_export.json``) and into the UNet's safetensors metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file

from crossdistill.config import atomic_write_text, load_config, to_dict
from crossdistill.errors import ConfigError, ModelLoadError
from crossdistill.models.base import Denoiser
from crossdistill.train.checkpoint import CheckpointManager, read_state
from crossdistill.train.distill import DistillConfig, load_space

EXPORT_INFO = "crossdistill_export.json"


def one_step_scheduler(scheduler) -> DDIMScheduler:
    """A DDIM scheduler on the same training schedule whose single step at t=999 returns the x0-prediction."""
    return DDIMScheduler.from_config(
        scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False
    )


def load_generator_weights(denoiser: Denoiser, state: dict[str, torch.Tensor]) -> None:
    """Put checkpointed generator (or EMA) weights into a Student denoiser; every parameter must be covered."""
    missing, unexpected = denoiser.load_state_dict(state, strict=False)
    params = {n for n, _ in denoiser.named_parameters()}
    if unexpected or params & set(missing):
        raise ModelLoadError(
            f"the checkpoint does not fit the Student model ({len(unexpected)} unexpected, "
            f"{len(params & set(missing))} missing weights): is model.student_path the one the run trained?"
        )


def export_pipeline(run_dir: str | Path, out: str | Path, *, ema: bool = False) -> Path:
    """Write ``out`` as a StableDiffusionPipeline folder from the latest checkpoint of ``run_dir``; return ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_config(DistillConfig, run_dir / "config.json")
    if cfg.model.student_family != "sd15":
        raise ConfigError(f"export writes SD 1.x pipelines; this run's Student is {cfg.model.student_family!r}")
    if cfg.train.conditioning_t != 1.0:
        raise ConfigError(
            f"the pipeline's one step runs at timestep 999 (conditioning_t=1), but the run used "
            f"conditioning_t={cfg.train.conditioning_t}"
        )
    checkpoint = CheckpointManager(run_dir, main_process=False).latest()
    if checkpoint is None:
        raise ModelLoadError(f"{run_dir} has no complete checkpoint to export (train first: crossdistill distill)")
    name = "ema" if ema else "generator"
    if not (checkpoint / f"{name}.safetensors").is_file():
        raise ConfigError(f"{checkpoint} holds no EMA weights (train.ema_decay was 0): export without --ema")

    student = load_space(cfg.model.student_family, cfg.model.student_path)
    load_generator_weights(student.denoiser, read_state(checkpoint, name))
    student.denoiser.scheduler = one_step_scheduler(student.denoiser.scheduler)
    encoder = student.prompt_encoder
    # The pipeline passes the attention mask only when the encoder config asks for it; ours uses it for BERT-like
    # encoders (the emoji world's MiniLM) and not for CLIP, so the flag makes both encode prompts identically.
    encoder.text_encoder.config.use_attention_mask = bool(getattr(encoder, "use_mask", False))
    student.save_pretrained(out)

    info = {
        "checkpoint": checkpoint.name,
        "step": CheckpointManager.step_of(checkpoint),
        "weights": name,
        "num_inference_steps": 1,
        "guidance_scale": 1.0,
        "config": to_dict(cfg),
    }
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    atomic_write_text(out / EXPORT_INFO, text)
    for weights in (out / "unet").glob("*.safetensors"):
        save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "crossdistill": text})
    return out
