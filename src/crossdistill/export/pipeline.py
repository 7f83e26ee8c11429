"""Export a distilled run as a plain diffusers ``StableDiffusionPipeline`` folder that samples in one step.

The folder holds the Student's own VAE, text encoder and tokenizer, the distilled UNet and a ``DDIMScheduler`` set
up so that ``pipe(prompt, num_inference_steps=1, guidance_scale=1.0)`` reproduces the trainer's ``D_s(G_θ(z, c))``:

- ``timestep_spacing="trailing"`` makes the one inference timestep 999, the generator's ``conditioning_t = 1``;
- ``set_alpha_to_one=True`` makes the step's "previous" ᾱ equal 1, so the DDIM update returns exactly the
  x0-prediction ``(z − √(1−ᾱ₉₉₉) ε̂) / √ᾱ₉₉₉`` (no re-noising), and ``clip_sample=False`` leaves it unclipped;
- ``guidance_scale=1`` (no CFG: the generator was trained without it) and ``latents=z`` give the same noise.

Nothing of the Bridge or the Teacher is needed at inference. The run's config is written beside the pipeline
(``crossdistill_export.json``) and into the UNet's safetensors metadata.

With ``lora=RANK`` the change of the UNet is also written as a LoRA on the Student base (``<out>/lora/``,
``pytorch_lora_weights.safetensors``) that ``StableDiffusionPipeline.load_lora_weights`` loads: for every Linear
and Conv2d weight that changed, the best rank-``r`` approximation of ``ΔW`` (truncated SVD; conv kernels as
``[out, in·k·k]``, down = conv with the layer's kernel/stride/padding, up = 1×1 conv, as peft builds them). Bias
and normalisation changes are not representable and are reported as left out.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

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


LORA_FOLDER = "lora"


@dataclass
class LoraReport:
    """How much of the UNet's change a rank-``r`` LoRA holds: squared Frobenius norms, total and per layer kind."""

    rank: int
    layers: int = 0
    energy: dict[str, float] = field(default_factory=dict)  # kind -> ‖ΔW‖²
    captured: dict[str, float] = field(default_factory=dict)  # kind -> ‖ΔW_r‖²
    other_change: float = 0.0  # ‖Δ‖² of parameters a LoRA cannot hold (biases, norms, embeddings)

    def fraction(self, kind: str | None = None) -> float:
        total = sum(self.energy.values()) if kind is None else self.energy[kind]
        kept = sum(self.captured.values()) if kind is None else self.captured[kind]
        return kept / total if total > 0 else 1.0

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {self.fraction(k):.4f}" for k in sorted(self.energy))
        return (
            f"LoRA rank {self.rank} on {self.layers} layers captures {self.fraction():.4f} of ‖ΔW‖² ({kinds}); "
            f"not representable (bias/norm/other) ‖Δ‖² = {self.other_change:.3g}"
        )


def _layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    k = module.kernel_size
    return "conv1x1" if tuple(k) == (1, 1) else "conv_kxk"


@torch.no_grad()
def lora_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(A [r, in, *k], B [out, r, 1...], ‖B·A‖²)`` with ``B·A`` the best rank-``r`` approximation of ``delta``.
    Ranks above ``min(out, in·k·k)`` are padded with zero factors so that every layer has rank ``r``."""
    out_dim = delta.shape[0]
    flat = delta.reshape(out_dim, -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(out_dim, rank, dtype=torch.float64)
    a = torch.zeros(rank, flat.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    extra = (1,) * (delta.dim() - 2)
    return a.reshape(rank, *delta.shape[1:]), b.reshape(out_dim, rank, *extra), float((s[:k] ** 2).sum())


@torch.no_grad()
def export_lora(base: nn.Module, tuned: nn.Module, out: str | Path, rank: int) -> LoraReport:
    """Write the change ``tuned − base`` of a diffusers UNet as a rank-``rank`` LoRA folder for
    ``StableDiffusionPipeline.load_lora_weights``; return how much of ``‖ΔW‖`` it holds."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if rank < 1:
        raise ConfigError(f"--lora RANK must be >= 1, got {rank}")
    report = LoraReport(rank=rank)
    tuned_params = dict(tuned.named_parameters())
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    covered: set[str] = set()
    for name, module in base.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        covered.add(f"{name}.weight")
        delta = tuned_params[f"{name}.weight"].detach().double() - module.weight.detach().double()
        energy = float((delta**2).sum())
        if energy == 0.0:
            continue
        kind = _layer_kind(module)
        a, b, kept = lora_factors(delta, rank)
        factors[name] = (a, b)
        report.energy[kind] = report.energy.get(kind, 0.0) + energy
        report.captured[kind] = report.captured.get(kind, 0.0) + kept
    for name, param in base.named_parameters():
        if name not in covered:
            report.other_change += float(((tuned_params[name].double() - param.double()) ** 2).sum())
    if not factors:
        raise ConfigError("the distilled UNet's Linear/Conv weights equal the base's: there is no change to export")
    report.layers = len(factors)

    carrier = copy.deepcopy(base).float()
    carrier.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=sorted(factors)))
    modules = dict(carrier.named_modules())
    for name, (a, b) in factors.items():
        layer = modules[name]
        layer.lora_A["default"].weight.copy_(a.to(layer.lora_A["default"].weight))
        layer.lora_B["default"].weight.copy_(b.to(layer.lora_B["default"].weight))
    # peft key names (``…to_q.lora_A.weight``), which diffusers loads as they are; its old ``lora.down`` names
    # (``convert_state_dict_to_diffusers``) are read back as attention-processor LoRAs and lose the attention layers.
    state = get_peft_model_state_dict(carrier)
    StableDiffusionPipeline.save_lora_weights(Path(out), unet_lora_layers=state, safe_serialization=True)
    return report


def export_pipeline(run_dir: str | Path, out: str | Path, *, ema: bool = False, lora: int | None = None) -> Path:
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
    if lora is not None and lora < 1:
        raise ConfigError(f"--lora RANK must be >= 1, got {lora}")
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
    if lora is not None:
        base = load_space(cfg.model.student_family, cfg.model.student_path)
        report = export_lora(base.denoiser.backbone, student.denoiser.backbone, out / LORA_FOLDER, lora)
        print(report.summary())
    return out
