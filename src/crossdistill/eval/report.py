"""Reusable report writers: image grids, metric tables, loss-curve and metric-bar plots, markdown + HTML reports.

``crossdistill evaluate`` and ``crossdistill demo`` both build their outputs from these pieces, so a table or a
grid looks the same wherever it appears. Plots use matplotlib's Agg backend (no display needed).

A :class:`Report` is a list of blocks (headings, paragraphs, tables, images) written twice: ``report.md`` links
the images by relative path (readable on GitHub and beside the files), ``report.html`` embeds them as data URIs so
the one file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from crossdistill.config import atomic_write_text

# --------------------------------------------------------------------------------------------------------------------
# Images


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [-1, 1] (the project's convention) or uint8 → ``[B, H, W, 3]`` uint8."""
    if pixels.dtype != torch.uint8:
        pixels = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.cpu().permute(0, 2, 3, 1).contiguous().numpy()


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    cell: int | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 2,
) -> Image.Image:
    """Paste images into a grid, each resized to ``cell`` px (nearest, so small samples stay crisp).

    ``cell`` defaults to the largest image, so models of different resolutions (a 64 px Teacher beside a 32 px
    Student) share one grid. Optional labels go above the columns and left of the rows.
    """
    cells = [im for row in rows for im in row]
    if not cells:
        raise ValueError("image_grid needs at least one image")
    cell = cell or max(max(im.size) for im in cells)
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(s: str) -> int:
        return int(draw_probe.textlength(s))

    left = max((text_width(s) for s in row_labels), default=0) + 2 * pad if row_labels else 0
    top = 14 + pad if col_labels else 0
    ncol = max(len(row) for row in rows)
    width = left + ncol * (cell + pad) + pad
    height = top + len(rows) * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels or ()):
        draw.text((left + pad + c * (cell + pad), pad), label[: max(1, cell // 6)], fill=(0, 0, 0))
    for r, row in enumerate(rows):
        y = top + pad + r * (cell + pad)
        if row_labels:
            draw.text((pad, y + cell // 2 - 5), row_labels[r], fill=(0, 0, 0))
        for c, im in enumerate(row):
            resized = im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(resized, (left + pad + c * (cell + pad), y))
    return grid


def tensor_grid(pixels: torch.Tensor, ncol: int, **kwargs) -> Image.Image:
    """A grid of ``[B, 3, H, W]`` images (see :func:`to_uint8`), ``ncol`` per row."""
    images = [Image.fromarray(a) for a in to_uint8(pixels)]
    return image_grid([images[i : i + ncol] for i in range(0, len(images), ncol)], **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Numbers and tables


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` over seeds; ``std`` is the sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": int(arr.size)}


def format_mean_spread(stat: Mapping[str, float], digits: int = 3) -> str:
    """``0.812 ± 0.011`` (just the mean when there is one value)."""
    if stat.get("n", 1) > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (``|`` inside cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


# --------------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    # Agg before pyplot is imported anywhere: reports are written on headless machines.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, prefix: str = "loss/", smooth: int = 1
) -> Path | None:
    """One panel per ``prefix*`` key, one line per run, against ``step``; ``None`` if no record has such a key.

    ``runs`` maps a run name to its stats records (``read_stats`` of its ``stats.jsonl``). ``smooth`` is a moving
    average window, so short noisy runs stay readable.
    """
    keys = sorted({k for records in runs.values() for r in records for k in r if k.startswith(prefix)})
    if not keys:
        return None
    plt = _pyplot()
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, records in runs.items():
            pts = [(r["step"], r[key]) for r in records if key in r and "step" in r and _finite(r[key])]
            if not pts:
                continue
            steps, values = map(np.asarray, zip(*pts))
            if smooth > 1 and len(values) >= smooth:
                values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
                steps = steps[smooth - 1 :]
            ax.plot(steps, values, label=name, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    return _save(fig, plt, path)


def plot_metric_bars(
    summaries: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, metrics: Sequence[str] | None = None
) -> Path:
    """One panel per metric, one bar per model with its spread over seeds as an error bar.

    ``summaries`` maps a model name to ``{metric: {"mean", "std"}}`` (the ``summary`` of an evaluation).
    """
    names = list(summaries)
    metrics = list(metrics or sorted({m for s in summaries.values() for m in s}))
    plt = _pyplot()
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(4.2, 0.9 * len(names) + 1.5) * ncol, 3.2 * nrow), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        means = [summaries[n].get(metric, {}).get("mean", np.nan) for n in names]
        stds = [summaries[n].get(metric, {}).get("std", 0.0) for n in names]
        bar_colours = [colours[i % len(colours)] for i in range(len(names))]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=bar_colours)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    return _save(fig, plt, path)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Reports


@dataclass
class Report:
    """A document of headings, paragraphs, tables and images, written as ``NAME.md`` and ``NAME.html``.

    Image paths are stored relative to the report's folder (``write`` resolves them), so the markdown stays valid
    when the folder is moved.
    """

    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> Report:
        self.blocks.append(("heading", (level, text)))
        return self

    def text(self, text: str) -> Report:
        """A paragraph (plain text; ``**bold**`` and ``code`` are kept as written in the markdown)."""
        self.blocks.append(("text", text))
        return self

    def code(self, text: str) -> Report:
        self.blocks.append(("code", text))
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Report:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))
        return self

    def image(self, path: str | Path, caption: str = "") -> Report:
        self.blocks.append(("image", (Path(path), caption)))
        return self

    def write(self, folder: str | Path, name: str = "report") -> tuple[Path, Path]:
        """Write ``folder/NAME.md`` and ``folder/NAME.html`` (atomically); returns both paths."""
        folder = Path(folder)
        md_path, html_path = folder / f"{name}.md", folder / f"{name}.html"
        atomic_write_text(md_path, self.markdown(folder))
        atomic_write_text(html_path, self.html(folder))
        return md_path, html_path

    def markdown(self, folder: Path) -> str:
        out = [f"# {self.title}"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out.append(f"{'#' * level} {text}")
            elif kind == "text":
                out.append(value)
            elif kind == "code":
                out.append(f"```\n{value}\n```")
            elif kind == "table":
                out.append(markdown_table(*value))
            elif kind == "image":
                path, caption = value
                out.append(f"![{caption}]({_relative(path, folder)})" + (f"\n\n*{caption}*" if caption else ""))
        return "\n\n".join(out) + "\n"

    def html(self, folder: Path) -> str:
        esc = html.escape
        out = [
            "<!doctype html>",
            f"<html><head><meta charset='utf-8'><title>{esc(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}"
            "img{max-width:100%;image-rendering:pixelated}pre{background:#f4f4f4;padding:8px;overflow-x:auto}"
            "figcaption{font-style:italic;font-size:90%}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out.append(f"<h{level}>{esc(text)}</h{level}>")
            elif kind == "text":
                out.append(f"<p>{esc(value)}</p>")
            elif kind == "code":
                out.append(f"<pre>{esc(value)}</pre>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                out.append(f"<table><tr>{head}</tr>{body}</table>")
            elif kind == "image":
                path, caption = value
                out.append(f"<figure><img src='{_data_uri(path, folder)}' alt='{esc(caption)}'>")
                out.append(f"<figcaption>{esc(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _resolve(path: Path, folder: Path) -> Path:
    return path if path.is_absolute() else folder / path


def _relative(path: Path, folder: Path) -> str:
    full = _resolve(path, folder).resolve()
    try:
        return full.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return full.as_posix()


def _data_uri(path: Path, folder: Path) -> str:
    # Embedded, so the HTML is one self-contained file; a missing image is a bug in the caller, not skipped.
    data = _resolve(path, folder).read_bytes()
    mime = "image/svg+xml" if path.suffix == ".svg" else f"image/{path.suffix.lstrip('.').lower() or 'png'}"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
