"""Captioned image sets from disk (folders, parquet), prompt files, and the resolution check against a VAE factor.

Supported layouts, checked in this order:

- a folder with ``metadata.jsonl`` (the diffusers ImageFolder convention): one ``{"file_name": ..., "text": ...}``
  per line (``caption`` or ``prompt`` also name the text), file names relative to the folder;
- a folder of images, each with a same-named caption file beside it (``cat.png`` + ``cat.txt``), searched
  recursively;
- a ``.parquet`` file with an image column (bytes, or a ``{"bytes": ...}`` struct as written by HF datasets) and a
  text column (needs ``pyarrow``).

Unreadable images are skipped and counted (one warning with the count and the first few names), never fatal; an
empty set is a :class:`~crossdistill.errors.DataError` that says what was expected.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from crossdistill.data.emoji import uint8_to_unit
from crossdistill.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TEXT_KEYS = ("text", "caption", "prompt")  # accepted names of the caption field / column, in order of preference
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "bytes")  # parquet image column names tried when none is given
_SHOW = 5  # how many skipped names a warning lists


def check_resolution(resolution: int, factor: int, what: str = "resolution") -> int:
    """Return ``resolution`` if it is a positive multiple of ``factor`` (the VAE's downsampling), else ConfigError.

    The error names the nearest valid values, e.g. ``resolution 500 is not a multiple of 8; use 496 or 504``.
    """
    if resolution > 0 and resolution % factor == 0:
        return resolution
    below, above = (resolution // factor) * factor, (resolution // factor + 1) * factor
    nearest = f"{below} or {above}" if below > 0 else f"{above}"
    raise ConfigError(f"{what} {resolution} is not a multiple of {factor} (the VAE factor); use {nearest}")


def load_image(source: str | os.PathLike | bytes, resolution: int) -> torch.Tensor:
    """An image file (or its bytes) → ``[3, R, R]`` float in [-1, 1]: shorter side resized to R, center crop.

    Transparent pixels are composited onto white (emoji and icons are RGBA; black would change their colours).
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
        image = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return uint8_to_unit(pixels)


@dataclass(frozen=True)
class _Item:
    name: str  # shown in warnings: a path, or "file.parquet[row]"
    caption: str
    source: str | bytes  # a file path, or the image bytes of a parquet row


class ImageDataset(torch.utils.data.Dataset):
    """Captioned images as ``{"pixels": [3, R, R] float in [-1, 1], "caption": str}`` (see the module docstring).

    Attributes after construction: ``skipped`` (names of unreadable images), ``num_uncaptioned`` (images without a
    caption, also skipped).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resolution: int,
        image_column: str | None = None,
        text_column: str | None = None,
    ):
        self.path = Path(path)
        self.resolution = resolution
        self.num_uncaptioned = 0
        if self.path.is_dir():
            items = self._folder_items()
        elif self.path.suffix == ".parquet" and self.path.is_file():
            items = self._parquet_items(image_column, text_column)
        else:
            raise DataError(
                f"image set {self.path} is neither a folder nor a .parquet file "
                "(a folder of images with same-named .txt captions, or with a metadata.jsonl)"
            )
        if self.num_uncaptioned:
            logger.warning("skipped %d images without a caption in %s", self.num_uncaptioned, self.path)
        if not items:
            raise DataError(
                f"no captioned images in {self.path}: put a caption beside each image (cat.png + cat.txt), or a "
                'metadata.jsonl with one {"file_name": ..., "text": ...} per line'
            )
        self.items: list[_Item] = []
        self.skipped: list[str] = []  # names of unreadable images
        for item in items:
            if _readable(item.source):
                self.items.append(item)
            else:
                self.skipped.append(item.name)
        if self.skipped:
            logger.warning(
                "skipped %d unreadable images of %d in %s (first: %s)",
                len(self.skipped),
                len(items),
                self.path,
                ", ".join(self.skipped[:_SHOW]),
            )
        if not self.items:
            raise DataError(f"none of the {len(items)} images in {self.path} could be read (corrupt or not images)")

    def _folder_items(self) -> list[_Item]:
        metadata = self.path / "metadata.jsonl"
        if metadata.is_file():
            items = []
            for number, row in _jsonl_rows(metadata):
                caption = _text_of(row)
                if "file_name" not in row or caption is None:
                    raise DataError(f"{metadata}:{number}: expected keys 'file_name' and one of {TEXT_KEYS}")
                items.append(_Item(str(row["file_name"]), caption, str(self.path / row["file_name"])))
            return items
        items = []
        for image in sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            caption_file = image.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            if caption:
                items.append(_Item(str(image.relative_to(self.path)), caption, str(image)))
            else:
                self.num_uncaptioned += 1
        return items

    def _parquet_items(self, image_column: str | None, text_column: str | None) -> list[_Item]:
        if importlib.util.find_spec("pyarrow") is None:
            raise DataError(f"reading {self.path} needs pyarrow: pip install pyarrow (or use an image folder)")
        import pyarrow.parquet as pq

        names = pq.read_schema(self.path).names
        image_column = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        text_column = text_column or next((c for c in TEXT_KEYS if c in names), None)
        if image_column not in names or text_column not in names:
            raise DataError(
                f"{self.path} has columns {names}; expected an image column ({'/'.join(IMAGE_COLUMNS)}) and a text "
                f"column ({'/'.join(TEXT_KEYS)})"
            )
        table = pq.read_table(self.path, columns=[image_column, text_column]).to_pydict()
        items = []
        for row, (image, caption) in enumerate(zip(table[image_column], table[text_column])):
            if isinstance(image, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
                image = image.get("bytes")
            if not caption or not str(caption).strip():
                self.num_uncaptioned += 1
                continue
            items.append(_Item(f"{self.path.name}[{row}]", str(caption).strip(), image if image else b""))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"pixels": load_image(item.source, self.resolution), "caption": item.caption}

    @property
    def captions(self) -> list[str]:
        """Every caption, in dataset order (for prompt sets and metrics that need no pixels)."""
        return [item.caption for item in self.items]


def load_captioned_images(path: str | os.PathLike, resolution: int, **kwargs) -> ImageDataset:
    """The captioned image set at ``path`` (folder or parquet) at ``resolution``; see :class:`ImageDataset`."""
    return ImageDataset(path, resolution=resolution, **kwargs)


def _readable(source: str | bytes) -> bool:
    # verify() checks the header and (for PNG) every chunk's CRC without decoding: cheap enough for a whole set.
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        return False


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _text_of(row: dict) -> str | None:
    for key in TEXT_KEYS:
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    return None


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a ``.txt`` (one per line; blank lines and ``#`` comments skipped) or a ``.jsonl`` file (one
    object per line with ``text``, ``prompt`` or ``caption``). A missing, empty or malformed file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist (a .txt with one prompt per line, or a .jsonl)")
    if path.suffix == ".jsonl":
        prompts: list[str] = []
        for number, row in _jsonl_rows(path):
            text = _text_of(row)
            if text is None:
                raise DataError(f"{path}:{number}: expected a 'text' or 'prompt' field holding the prompt")
            prompts.append(text)
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise DataError(f"prompt file {path} is not UTF-8 text") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts (one per line)")
    return prompts
