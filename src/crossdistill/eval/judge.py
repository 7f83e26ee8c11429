"""The judge: a small CNN that reads an emoji-world image and names its emoji, style and background.

It is trained on *real* rendered images of the train split only (never on model outputs), and scores a
generator's prompt adherence: a sample of "grinning face, noto style, on a pink background" is right when the
judge reads back exactly those three attributes. Its penultimate features also serve for a Fréchet distance.

Any input resolution works: images are resized to ``input_size`` inside ``forward``, so one judge scores the
Teacher's 64 px and the Student's 32 px samples alike (training augments with down-and-up resizing for that).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn
from tqdm.auto import tqdm

from crossdistill.data.emoji import HEADS, EmojiWorld, random_shift, uint8_to_unit


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # conv-BN-SiLU twice. BatchNorm, not GroupNorm: per-sample normalisation would subtract the flat background's
    # response from every feature map and hide the very colour the background head must read.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.SiLU(),
    )


class Judge(ModelMixin, ConfigMixin):
    """Three-headed image classifier for the emoji world.

    Args:
        num_emoji, num_styles, num_backgrounds: classes per head (``EmojiWorld.label_sizes()``).
        emoji, styles, backgrounds: the world's vocabularies (chars and names), saved with the weights so a loaded
            judge knows which id is which and can refuse a world it was not trained for.
        input_size: images are resized to this square before the first conv.
        channels: widths of the stages; each stage halves the resolution (64 px input: 32, 16, 8, 4).

    Score in eval mode (``from_pretrained`` and ``train_judge`` return it so): BatchNorm then uses its running
    statistics, and a batch of generated images cannot shift the judge's reading of itself.
    """

    @register_to_config
    def __init__(
        self,
        num_emoji: int,
        num_styles: int,
        num_backgrounds: int,
        emoji: list[str] | None = None,
        styles: list[str] | None = None,
        backgrounds: list[str] | None = None,
        input_size: int = 64,
        channels: tuple[int, ...] = (32, 64, 128, 256),
    ):
        super().__init__()
        stages, c_prev = [], 3
        for c in channels:
            stages.append(_block(c_prev, c, stride=2))
            c_prev = c
        self.body = nn.Sequential(*stages)
        self.heads = nn.ModuleDict(
            {
                "emoji": nn.Linear(c_prev, num_emoji),
                "style": nn.Linear(c_prev, num_styles),
                "background": nn.Linear(c_prev, num_backgrounds),
            }
        )

    @classmethod
    def for_world(cls, world: EmojiWorld, **kwargs) -> Judge:
        """A fresh judge sized and labelled for ``world``."""
        sizes = world.label_sizes()
        return cls(
            num_emoji=sizes["emoji"],
            num_styles=sizes["style"],
            num_backgrounds=sizes["background"],
            emoji=list(world.emoji),
            styles=list(world.styles),
            backgrounds=list(world.backgrounds),
            **kwargs,
        )

    @property
    def feature_dim(self) -> int:
        return self.config.channels[-1]

    def features(self, pixels: Tensor) -> Tensor:
        """Penultimate features ``[B, D]`` (global average of the last stage) of ``[B, 3, H, W]`` pixels in [-1, 1]."""
        size = self.config.input_size
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.body(pixels).mean(dim=(2, 3))

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        """Logits per head: ``{"emoji": [B, num_emoji], "style": [B, num_styles], "background": [B, ...]}``."""
        feats = self.features(pixels)
        return {head: layer(feats) for head, layer in self.heads.items()}

    @torch.no_grad()
    def predict(self, pixels: Tensor) -> dict[str, Tensor]:
        """Predicted class ids per head, ``{head: [B] int64}``."""
        return {head: logits.argmax(dim=1) for head, logits in self(pixels).items()}


def resize_augment(pixels: Tensor, min_size: int, generator: torch.Generator) -> Tensor:
    """Down-sample the batch to a random size in ``[min_size, H]`` and back (how a low-resolution sample looks)."""
    full = pixels.shape[-1]
    size = int(torch.randint(min_size, full + 1, (1,), generator=generator))
    if size == full:
        return pixels
    small = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(full, full), mode="bilinear", align_corners=False)


def train_judge(
    world: EmojiWorld,
    steps: int,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    lr: float = 2e-3,
    **judge_kwargs,
) -> Judge:
    """Train a judge on real rendered images of ``world``'s train split; returns it in eval mode.

    AdamW with a short warm-up and cosine decay; each batch is augmented with a random down-and-up resize
    (``input_size / 2`` to ``input_size``: the Student's resolution and the Teacher's) and a shift of up to
    ``input_size / 16`` px. Seeded: the same arguments give the same judge on the same device.
    """
    torch.manual_seed(seed)
    judge = Judge.for_world(world, **judge_kwargs).to(device)
    size = judge.config.input_size
    pixels, labels = world.tensor_cache("train", size)
    pixels = pixels.to(device)
    labels = {head: ids.to(device) for head, ids in labels.items()}

    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)  # on CPU: the same batches and augmentations on any device
    judge.train()
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for _step in bar:
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator).to(device)
        batch = uint8_to_unit(pixels[index])
        batch = random_shift(resize_augment(batch, size // 2, generator), max(1, size // 16), generator)
        logits = judge(batch)
        losses = {head: F.cross_entropy(logits[head], labels[head][index]) for head in HEADS}
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix({f"loss/{head}": f"{v.item():.3f}" for head, v in losses.items()}, refresh=False)
    return judge.eval()
