"""Loading and saving diffusers-layout model folders, shared by every family, with errors a user can act on.

Before diffusers or transformers see a folder we check what they would otherwise fail on deep inside: that the
folder exists (or the hub id is reachable), that the needed subfolders are there, that the backbone belongs to the
family asked for, and that every weight file is readable safetensors. Only safetensors are ever loaded (no pickle)
and no remote code runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, ModelMixin
from safetensors import SafetensorError, safe_open

from crossdistill.errors import ModelLoadError
from crossdistill.models.base import Denoiser, LatentCodec, PromptEncoder, Space

# Backbone subfolder and class → family. UNets of SDXL differ from SD 1.x/2.x by their added time/text embedding.
BACKBONE_SUBFOLDERS = ("unet", "transformer")
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# Our own file beside model_index.json (family, resolution, prompt encoder options); diffusers never reads it.
SPACE_FILE = "crossdistill_space.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(
            f"cannot read {path}: {e}; the diffusers folder looks damaged, re-download or re-save it"
        ) from e


def resolve_folder(path_or_id: str | Path) -> Path:
    """A local diffusers folder, or a hub id downloaded to the local cache (safetensors and configs only)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_hub_id:
        raise ModelLoadError(f"model folder {text!r} does not exist: pass a local diffusers folder or a hub id")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        raise ModelLoadError(
            f"{text!r} is not a local folder and the hub is unreachable: pass a local diffusers folder "
            "(HF_HUB_OFFLINE is set)"
        )
    from huggingface_hub import snapshot_download

    try:
        # Only the diffusers layout (configs, tokenizer files, safetensors of each component): never the
        # single-file checkpoints at a repo's root nor the half-precision duplicates.
        patterns = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]
        return Path(snapshot_download(text, allow_patterns=patterns, ignore_patterns=["*.fp16.*", "*.bf16.*"]))
    except Exception as e:  # any hub failure (network, auth, missing repo) is the same fix for the user
        raise ModelLoadError(
            f"{text!r} is not a local folder and the hub is unreachable: pass a local diffusers folder "
            f"({type(e).__name__}: {e})"
        ) from e


def detect_family(folder: Path) -> tuple[str, str] | None:
    """``(family, backbone class)`` of a diffusers folder from its backbone config, or None if it has none."""
    for sub in BACKBONE_SUBFOLDERS:
        cfg_path = folder / sub / "config.json"
        if cfg_path.is_file():
            cfg = read_json(cfg_path)
            name = cfg.get("_class_name", "?")
            if name == "UNet2DConditionModel":
                return ("sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd15"), name
            return TRANSFORMER_FAMILIES.get(name, "unknown"), name
    return None


def check_safetensors(subdir: Path) -> None:
    """Every weight file of a component is safetensors with a readable header covering the whole file."""
    files = sorted(subdir.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in subdir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (
            f" (found only pickle weights {pickled}, which are never loaded: convert them to safetensors)"
            if pickled
            else ""
        )
        raise ModelLoadError(f"no .safetensors weights in {subdir}{hint}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(
                f"weight file {f} is corrupt or truncated ({e}): re-download or re-save the model folder"
            ) from e


def check_folder(
    folder: Path, family: str, required: Iterable[str], weights: Iterable[str], backbone_required: bool = True
) -> None:
    """Refuse a folder that is not a diffusers folder of ``family`` before any heavy loading happens."""
    found = detect_family(folder)
    if found is not None and found[0] != family:
        other, cls = found
        hint = f"pass --family {other}" if other != "unknown" else "pass a folder of a supported family"
        raise ModelLoadError(f"this folder ({folder}) holds an {cls} (family {other}), not {family}: {hint}")
    missing = [s for s in required if not (folder / s).is_dir()]
    if missing or (found is None and backbone_required):
        need = ", ".join(f"{s}/" for s in required)
        raise ModelLoadError(
            f"{folder} is not a diffusers {family} folder: missing {', '.join(f'{m}/' for m in missing)} "
            f"(expected subfolders {need}); pass the folder written by save_pretrained or a diffusers pipeline"
        )
    for sub in weights:
        if (folder / sub).is_dir():
            check_safetensors(folder / sub)


def check_text_width(folder: Path, width: int, expected: int, what: str) -> None:
    """A text encoder whose hidden size the backbone cannot take fails here, not inside the first forward."""
    if width != expected:
        raise ModelLoadError(
            f"{folder}: the text encoder is {width} wide but {what} is {expected}: "
            "pass a folder whose text_encoder/ matches its backbone"
        )


def load_diffusers_model(cls, folder: Path, sub: str, torch_dtype: torch.dtype | None):
    """A diffusers model (VAE, UNet, transformer) of class ``cls`` from ``folder/sub``."""
    cfg = read_json(folder / sub / "config.json")
    if cfg.get("_class_name") not in (None, cls.__name__):
        raise ModelLoadError(f"{folder / sub} holds a {cfg.get('_class_name')}, expected {cls.__name__}")
    try:
        return cls.from_pretrained(folder, subfolder=sub, torch_dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"could not load {cls.__name__} from {folder / sub}: {e}") from e


def load_text_encoder(folder: Path, sub: str, torch_dtype: torch.dtype | None):
    """A transformers text model from ``folder/sub``; its class comes from the config (never remote code)."""
    cfg = read_json(folder / sub / "config.json")
    name = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ModelLoadError(f"{folder / sub}/config.json names no known transformers class ({name!r})")
    try:
        model = cls.from_pretrained(folder / sub, dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"could not load {name} from {folder / sub}: {e}") from e
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: Path, sub: str):
    try:
        return transformers.AutoTokenizer.from_pretrained(folder / sub)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load a tokenizer from {folder / sub}: {e}") from e


def load_scheduler(folder: Path):
    """The folder's scheduler (its config defines the noise schedule / time shift and the prediction type)."""
    cfg = read_json(folder / "scheduler" / "scheduler_config.json")
    cls = getattr(diffusers, cfg.get("_class_name", ""), None)
    if cls is None:
        raise ModelLoadError(f"{folder}/scheduler names an unknown scheduler class {cfg.get('_class_name')!r}")
    return cls.from_config(cfg)


def save_folder(
    path: str | Path, pipeline_class: str, components: dict[str, object], extra: dict | None = None
) -> None:
    """Write a diffusers folder: ``model_index.json`` plus each component's ``save_pretrained`` in safetensors.

    ``None`` components are recorded as absent (``[null, null]``), as diffusers does for optional parts;
    ``extra`` adds pipeline-level entries (e.g. ``requires_safety_checker``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    for name, obj in components.items():
        if obj is None:
            index[name] = [None, None]
            continue
        library = "diffusers" if type(obj).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(obj).__name__]
        # diffusers models are told to write safetensors; transformers 5 writes nothing else; schedulers and
        # tokenizers only write configs and vocabularies.
        kwargs = {"safe_serialization": True} if library == "diffusers" and isinstance(obj, torch.nn.Module) else {}
        obj.save_pretrained(path / name, **kwargs)
    index.update(extra or {})
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# The codec and the load / save path every family shares


def codec_from_vae(vae: AutoencoderKL) -> LatentCodec:
    """The VAE's own ``scaling_factor`` / ``shift_factor`` (SD 0.18215, SDXL 0.13025, SD3 1.5305/0.0609, ...)."""
    return LatentCodec(vae.eval().requires_grad_(False), vae.config.scaling_factor, vae.config.shift_factor or 0.0)


def tiny_vae(seed: int, latent_channels: int, scale: float, shift: float | None = None) -> AutoencoderKL:
    """A 2-level ``AutoencoderKL`` (downsampling 2) with the family's constants, for tests and toy builds.

    Shifted (SD3 / FLUX style) VAEs have no quant convs, like the real ones."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
        sample_size=16, scaling_factor=scale, shift_factor=shift,
        use_quant_conv=shift is None, use_post_quant_conv=shift is None,
    )  # fmt: skip


class DiffusersSpace(Space):
    """A :class:`Space` stored as a diffusers pipeline folder: one load and one save path for every family.

    A family sets the class attributes and the two builders :meth:`build_prompt_encoder` and
    :meth:`build_denoiser`; the rest (checks, VAE, backbone, scheduler, model_index) is shared here."""

    pipeline_class: str = "DiffusionPipeline"
    backbone_subfolder: str = "unet"
    backbone_class: type = ModelMixin
    # Keyword options of from_pretrained that configure the prompt encoder rather than the denoiser.
    prompt_encoder_options: tuple[str, ...] = ("max_sequence_length",)

    @classmethod
    def required_subfolders(cls) -> tuple[str, ...]:
        return ("vae", cls.backbone_subfolder, "scheduler", "text_encoder", "tokenizer")

    @classmethod
    def build_prompt_encoder(cls, folder: Path, backbone, torch_dtype, **options) -> PromptEncoder:
        raise NotImplementedError

    @classmethod
    def build_denoiser(cls, backbone, scheduler, codec: LatentCodec, resolution: int, **options) -> Denoiser:
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls, path: str | Path, torch_dtype: torch.dtype | None = None, resolution: int | None = None, **options
    ) -> DiffusersSpace:
        """Load from a local diffusers folder or hub id; ``resolution`` defaults to the saved one,
        else the pipeline default (backbone sample size × VAE factor).

        ``options`` go to the family's builders (e.g. ``max_sequence_length``, ``time_sampler``)."""
        folder = resolve_folder(path)
        weights = ["vae", cls.backbone_subfolder] + [p.name for p in folder.glob("text_encoder*") if p.is_dir()]
        check_folder(folder, cls.family, cls.required_subfolders(), weights)
        vae = load_diffusers_model(AutoencoderKL, folder, "vae", torch_dtype)
        backbone = load_diffusers_model(cls.backbone_class, folder, cls.backbone_subfolder, torch_dtype)
        backbone.eval()
        scheduler = load_scheduler(folder)
        codec = codec_from_vae(vae)
        saved = read_json(folder / SPACE_FILE) if (folder / SPACE_FILE).is_file() else {}
        resolution = int(resolution or saved.get("resolution") or cls.native_resolution(backbone, codec))
        encoder_options = {k: options.pop(k) for k in list(options) if k in cls.prompt_encoder_options}
        encoder_options = {**saved.get("prompt_encoder", {}), **encoder_options}
        encoder = cls.build_prompt_encoder(folder, backbone, torch_dtype, **encoder_options)
        denoiser = cls.build_denoiser(backbone, scheduler, codec, resolution, **options)
        return cls(codec, denoiser, encoder, resolution)

    @classmethod
    def native_resolution(cls, backbone, codec: LatentCodec) -> int:
        """The pipeline's default: backbone ``sample_size`` × VAE factor (FLUX has none: 128 latent cells)."""
        return int(getattr(backbone.config, "sample_size", None) or 128) * codec.downsample

    def save_pretrained(self, path: str | Path) -> None:
        """Write the same diffusers layout :meth:`from_pretrained` reads (safetensors only)."""
        components = {
            "vae": self.codec.vae,
            self.backbone_subfolder: self.denoiser.model,
            "scheduler": self.denoiser.scheduler,
            **self.prompt_encoder.components(),
        }
        save_folder(path, self.pipeline_class, components, extra=self.index_extra())
        # What a diffusers folder cannot say: the space's resolution and the prompt encoder's lengths.
        info = {"family": self.family, "resolution": self.resolution, "prompt_encoder": self.prompt_encoder.options()}
        (Path(path) / SPACE_FILE).write_text(json.dumps(info, indent=2) + "\n")

    def index_extra(self) -> dict:
        """Pipeline-level model_index entries a family's diffusers pipeline expects."""
        return {}
