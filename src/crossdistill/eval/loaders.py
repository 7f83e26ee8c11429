"""``KIND:PATH`` model specs of ``crossdistill evaluate`` → :class:`~crossdistill.eval.evaluate.ImageModel`.

Kinds: ``student:toy`` / ``teacher:toy`` (the emoji world's spaces sampled with N steps), ``run:DIR`` (a distill
run's one-step generator) and ``pipeline:FOLDER`` (an exported one-step diffusers pipeline). The emoji world is
loaded once per process and shared by every spec and by the metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch

from crossdistill.errors import ConfigError, ModelLoadError
from crossdistill.eval.evaluate import EmojiMetrics, ImageModel, SpaceModel

MODEL_KINDS = {
    "pipeline": "an exported one-step diffusers pipeline folder (pipeline:FOLDER)",
    "run": "a distill run folder, one step from its latest generator (run:DIR)",
    "student": "the Student base sampled with --steps (student:toy = the shipped emoji world's)",
    "teacher": "the Teacher sampled with --steps (teacher:toy = the shipped emoji world's)",
}

_WORLDS: dict[tuple[str, str | None], object] = {}


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def toy_world(device: str | None = None, weights_dir: str | Path | None = None):
    """The emoji world's :class:`~crossdistill.toy.world.ToyWorld`, loaded once per (device, weights folder)."""
    from crossdistill.toy.world import load_world

    key = (default_device(device), str(weights_dir) if weights_dir else None)
    if key not in _WORLDS:
        _WORLDS[key] = load_world(key[0], weights_dir=weights_dir)
    return _WORLDS[key]


def sampling_defaults(toy, role: str) -> tuple[int, float]:
    """(steps, CFG scale) the world's own quality table uses for the ``teacher`` or ``student`` multi-step rows."""
    recipe = toy.manifest.get("recipe", {}).get("eval", {})
    if role == "teacher":
        return int(recipe.get("teacher_steps", 20)), float(recipe.get("teacher_guidance", 4.0))
    return int(recipe.get("student_steps", 25)), float(recipe.get("student_guidance", 3.0))


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in MODEL_KINDS or not path:
        choices = "; ".join(f"{k}: {v}" for k, v in MODEL_KINDS.items())
        raise ConfigError(f"--model {spec!r} is not KIND:PATH with KIND one of: {choices}")
    return kind, path


def load_image_model(
    spec: str,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    device: str | None = None,
    name: str | None = None,
    toy_weights: str | Path | None = None,
) -> ImageModel:
    """The model a ``KIND:PATH`` spec names, ready to generate on ``device``.

    ``steps``/``guidance`` default to the world's multi-step settings for ``student``/``teacher``; one-step models
    (``run``, ``pipeline``) take one step and no CFG, and refuse other values rather than ignore them.
    """
    kind, path = parse_spec(spec)
    if kind in ("student", "teacher"):
        if path != "toy":
            raise ConfigError(f"--model {spec}: only '{kind}:toy' (the shipped emoji world) is known")
        toy = toy_world(device, toy_weights)
        default_steps, default_guidance = sampling_defaults(toy, kind)
        steps = steps or default_steps
        guidance = guidance if guidance is not None else (default_guidance if steps > 1 else 1.0)
        label = "Teacher" if kind == "teacher" else "Student base"
        return SpaceModel(
            getattr(toy, kind), steps, guidance, name=name or f"{label} ({steps} step{'s' * (steps > 1)})", spec=spec
        )
    if (steps or 1) != 1 or (guidance if guidance is not None else 1.0) != 1.0:
        raise ConfigError(f"--model {spec} is a one-step model: drop --steps/--guidance")
    if kind == "run":
        return _run_model(Path(path), device, name, spec)
    return PipelineModel(Path(path), device, name, spec)


def toy_metrics(device: str | None = None, resnet: bool = True, toy_weights: str | Path | None = None):
    """(:class:`EmojiMetrics`, the world) of the shipped emoji world."""
    toy = toy_world(device, toy_weights)
    return EmojiMetrics(toy.world, toy.judge, resnet=resnet), toy.world


def _run_model(run_dir: Path, device: str | None, name: str | None, spec: str) -> ImageModel:
    """The run's Student with its latest checkpointed generator (EMA weights when the run kept them), one step."""
    from crossdistill.config import load_config
    from crossdistill.export.pipeline import load_generator_weights
    from crossdistill.train.checkpoint import CheckpointManager, read_state
    from crossdistill.train.distill import DistillConfig, load_space

    cfg = load_config(DistillConfig, run_dir / "config.json")
    checkpoint = CheckpointManager(run_dir, main_process=False).latest()
    if checkpoint is None:
        raise ModelLoadError(f"{run_dir} has no complete checkpoint yet (train first: crossdistill distill)")
    weights = "ema" if (checkpoint / "ema.safetensors").is_file() else "generator"
    student = load_space(cfg.model.student_family, cfg.model.student_path)
    load_generator_weights(student.denoiser, read_state(checkpoint, weights))
    student.to(default_device(device)).eval()
    step = CheckpointManager.step_of(checkpoint)
    label = name or f"{run_dir.name} (one step, {cfg.model.bridge_kind}, step {step})"
    model = SpaceModel(student, 1, 1.0, name=label, spec=spec, step=step, weights=weights)
    model.run_dir = run_dir
    return model


class PipelineModel(ImageModel):
    """An exported one-step ``StableDiffusionPipeline``: one step at timestep 999, no CFG, our noise as latents."""

    def __init__(self, folder: Path, device: str | None, name: str | None, spec: str):
        from crossdistill.export.generate import load_pipeline

        self.device = default_device(device)
        self.pipe = load_pipeline(folder, self.device)
        self.name = name or f"{folder.name} (exported, one step)"
        self.spec = spec

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        config = self.pipe.unet.config
        return (config.in_channels, config.sample_size, config.sample_size)

    @torch.no_grad()
    def generate(self, prompts, noise: torch.Tensor) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        images = self.pipe(
            prompt_embeds=embeds,
            latents=noise.to(self.device, embeds.dtype),
            num_inference_steps=1,
            guidance_scale=1.0,
            output_type="pt",
        ).images
        return images.float() * 2.0 - 1.0  # the pipeline's [0, 1] → the project's [-1, 1]

    def describe(self) -> dict:
        return {"name": self.name, "spec": self.spec, "num_steps": 1, "guidance_scale": 1.0}
