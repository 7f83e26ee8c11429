"""The report writers: grids keep pixels and geometry, tables and plots are written, reports link/embed images."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from crossdistill.eval.report import (
    Report,
    format_mean_spread,
    markdown_table,
    mean_spread,
    plot_loss_curves,
    plot_metric_bars,
    tensor_grid,
    to_uint8,
)


def test_to_uint8_maps_the_pixel_range_and_layout():
    pixels = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    out = to_uint8(pixels)
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 255]]  # 2.0 is clamped


def test_tensor_grid_geometry_and_content():
    # 5 solid-colour images of 4 px, 3 per row, upscaled to 8 px cells with 2 px padding.
    colours = torch.linspace(-1, 1, 5)
    pixels = colours.view(5, 1, 1, 1).expand(5, 3, 4, 4)
    grid = tensor_grid(pixels, ncol=3, cell=8, pad=2)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    arr = np.asarray(grid)
    assert arr[2 + 4, 2 + 4, 0] == 0  # first cell: -1 → 0
    assert arr[12 + 4, 12 + 4, 0] == to_uint8(pixels[4:5])[0, 0, 0, 0]  # fifth cell: row 2, column 2
    assert arr[12 + 4, 22 + 4].tolist() == [255, 255, 255]  # the missing sixth cell stays background


def test_mean_spread_and_format():
    stat = mean_spread([1.0, 2.0, 3.0])
    assert stat == {"mean": 2.0, "std": 1.0, "n": 3}
    assert format_mean_spread(stat, digits=2) == "2.00 ± 1.00"
    assert format_mean_spread(mean_spread([0.5]), digits=1) == "0.5"


def test_markdown_table_escapes_pipes():
    table = markdown_table(["a", "b"], [["1", "x|y"]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | x\\|y |"]


def test_plots_are_written(tmp_path):
    runs = {
        "cross": [{"step": i, "loss/dm": 1.0 / (i + 1), "loss/critic": 0.5, "time/step_s": 0.1} for i in range(10)],
        "shared": [{"step": i, "loss/dm": 2.0 / (i + 1)} for i in range(10)],
    }
    path = plot_loss_curves(runs, tmp_path / "loss.png", smooth=3)
    assert path is not None and Image.open(path).size[0] > 100
    assert plot_loss_curves({"x": [{"step": 0, "time/step_s": 1.0}]}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    summaries = {"a": {"acc": {"mean": 0.5, "std": 0.1}}, "b": {"acc": {"mean": 0.7, "std": 0.0}, "fd": {"mean": 3}}}
    bars = plot_metric_bars(summaries, tmp_path / "bars.png")
    assert Image.open(bars).size[0] > 100


def test_report_markdown_links_and_html_embeds(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "grid.png")
    report = Report("Demo").heading("Results").text("a < b").table(["m"], [["1"]]).image("grid.png", "the grid")
    md_path, html_path = report.write(tmp_path)
    md = md_path.read_text()
    assert md.startswith("# Demo\n") and "![the grid](grid.png)" in md and "| m |" in md
    page = html_path.read_text()
    assert "a &lt; b" in page
    assert base64.b64encode((tmp_path / "grid.png").read_bytes()).decode() in page


def test_report_html_refuses_a_missing_image(tmp_path):
    with pytest.raises(FileNotFoundError):
        Report("x").image("missing.png").write(tmp_path)
