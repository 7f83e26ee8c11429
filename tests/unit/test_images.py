"""Captioned image sets (sidecar captions, metadata.jsonl, parquet), prompt files, the resolution check."""

from __future__ import annotations

import importlib.util
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from crossdistill.data import images as images_mod
from crossdistill.data.images import ImageDataset, check_resolution, load_captioned_images, load_image, read_prompts
from crossdistill.errors import ConfigError, DataError


def write_png(path, size=(40, 20), color=(255, 0, 0, 255)):
    Image.new("RGBA", size, color).save(path)


def png_bytes(color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_with_sidecar_captions_counts_corrupt_and_uncaptioned(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "red.png")
    (tmp_path / "red.txt").write_text("a red square\n")
    write_png(tmp_path / "sub" / "clear.png", color=(0, 0, 0, 0))
    (tmp_path / "sub" / "clear.txt").write_text("nothing")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken.txt").write_text("broken")
    truncated = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(truncated, format="PNG")
    (tmp_path / "cut.png").write_bytes(truncated.getvalue()[:-30])
    (tmp_path / "cut.txt").write_text("cut")
    write_png(tmp_path / "nocap.png")
    with caplog.at_level(logging.WARNING, logger="crossdistill.data.images"):
        ds = load_captioned_images(tmp_path, resolution=8)
    assert len(ds) == 2 and ds.captions == ["a red square", "nothing"]
    assert ds.skipped == ["broken.png", "cut.png"] and ds.num_uncaptioned == 1
    assert "skipped 2 unreadable images of 4" in caplog.text and "broken.png" in caplog.text
    item = ds[0]
    assert item["pixels"].shape == (3, 8, 8) and item["caption"] == "a red square"
    assert torch.allclose(item["pixels"][:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    # A fully transparent image is composited onto white, not black.
    assert torch.allclose(ds[1]["pixels"], torch.ones(3, 8, 8))


def test_resize_shorter_side_and_center_crop(tmp_path):
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, :20] = 255  # left third white: cropped away by a centre crop of the 20 px tall image
    array[:, 20:40] = (0, 255, 0)
    Image.fromarray(array).save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", 10)
    assert pixels.shape == (3, 10, 10)
    assert torch.allclose(pixels[:, :, 2:8], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1), atol=0.02)


def test_metadata_jsonl(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "b.png", "caption": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert ImageDataset(tmp_path, resolution=8).captions == ["first", "second"]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n\n{"file_name": "b.png"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:3: expected keys 'file_name'"):
        ImageDataset(tmp_path, resolution=8)
    (tmp_path / "metadata.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:1: not valid JSON"):
        ImageDataset(tmp_path, resolution=8)


def test_empty_sets_say_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="no captioned images.*cat.png \\+ cat.txt"):
        ImageDataset(tmp_path, resolution=8)
    write_png(tmp_path / "a.png")
    with pytest.raises(DataError, match="no captioned images"):
        ImageDataset(tmp_path, resolution=8)
    (tmp_path / "x.png").write_bytes(b"garbage")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="none of the 1 images .* could be read"):
        ImageDataset(tmp_path, resolution=8)
    with pytest.raises(DataError, match="neither a folder nor a .parquet"):
        ImageDataset(tmp_path / "missing", resolution=8)


def test_parquet_needs_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "set.parquet").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(images_mod.importlib.util, "find_spec", lambda n: None if n == "pyarrow" else real(n))
    with pytest.raises(DataError, match="needs pyarrow: pip install pyarrow"):
        ImageDataset(tmp_path / "set.parquet", resolution=8)


def test_parquet_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "image": [{"bytes": png_bytes(), "path": None}, {"bytes": b"junk", "path": None}, {"bytes": png_bytes()}],
            "text": ["blue", "junk", ""],
        }
    )
    pq.write_table(table, tmp_path / "set.parquet")
    ds = ImageDataset(tmp_path / "set.parquet", resolution=8)
    assert ds.captions == ["blue"] and ds.skipped == ["set.parquet[1]"] and ds.num_uncaptioned == 1
    assert torch.allclose(ds[0]["pixels"][:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    pq.write_table(pa.table({"pixels": [png_bytes()], "text": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match="expected an image column"):
        ImageDataset(tmp_path / "cols.parquet", resolution=8)
    assert len(ImageDataset(tmp_path / "cols.parquet", resolution=8, image_column="pixels")) == 1


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n# a comment\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"text": "one"}\n{"prompt": "two"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"label": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a 'text' or 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(DataError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_prompts(tmp_path / "binary.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_check_resolution():
    assert check_resolution(512, 8) == 512
    with pytest.raises(ConfigError, match="resolution 500 is not a multiple of 8 .*use 496 or 504"):
        check_resolution(500, 8)
    with pytest.raises(ConfigError, match="use 16$"):
        check_resolution(5, 16)
