"""The emoji world: vocabulary, captions, prompt split, rendering, dataset and degradation without a source."""

import numpy as np
import pytest
import torch

from crossdistill.data import emoji
from crossdistill.data.emoji import BACKGROUNDS, STYLES, EmojiDataset, EmojiWorld
from crossdistill.errors import DataError


@pytest.fixture(scope="module")
def world():
    return EmojiWorld(num_emoji=40)


def test_vocabulary_is_large_and_captions_round_trip():
    full = EmojiWorld()
    assert len(full.emoji) >= 300  # hundreds of concepts: a real text-to-image task
    assert len(set(full.names)) == len(full.names)
    assert all(len(c) == 1 for c in full.emoji)  # single codepoints only, no ZWJ / skin-tone sequences
    for item in full.items("all")[::97]:
        assert full.parse_caption(item.caption) == item
    item = full.parse_caption("grinning face, openmoji style, on a light blue background")
    assert (item.char, item.style, item.background) == ("\U0001f600", "openmoji", "light blue")
    per_emoji, per_style = len(full.styles) * len(BACKGROUNDS), len(BACKGROUNDS)
    assert full.items("all")[item.emoji_id * per_emoji + item.style_id * per_style + item.background_id] == item


@pytest.mark.parametrize(
    "caption",
    [
        "grinning face, watercolour style, on a white background",
        "no such emoji, noto style, on a white background",
        "grinning face, noto style, on a plaid background",
        "just some words",
    ],
)
def test_parse_caption_rejects_unknown(caption):
    with pytest.raises(DataError):
        EmojiWorld().parse_caption(caption)


def test_split_is_deterministic_disjoint_and_covers_all(world):
    train, held = world.prompts("train"), world.prompts("held_out")
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(world.items("all")) == 40 * len(world.styles) * len(BACKGROUNDS)
    assert 0.05 < len(held) / len(world.items("all")) < 0.16
    assert EmojiWorld(num_emoji=40).prompts("held_out") == held
    assert EmojiWorld(num_emoji=40, seed=1).prompts("held_out") != held
    # Held-out prompts are new combinations, not new concepts: each emoji also appears in training.
    assert {i.char for i in world.items("held_out")} <= {i.char for i in world.items("train")}


def test_label_sizes_and_describe(world):
    assert world.label_sizes() == {"emoji": 40, "style": len(world.styles), "background": len(BACKGROUNDS)}
    summary = world.describe()
    assert summary["num_emoji"] == 40 and summary["styles"] == world.styles
    assert all(n >= 40 for n in summary["emoji_found_per_style"].values())


@pytest.mark.parametrize("size", [32, 64])
def test_render_size_background_and_ink(world, size):
    for style in world.styles:
        item = next(i for i in world.items("all") if i.style == style and i.background == "light blue")
        image = np.asarray(world.render(item, size))
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert tuple(image[0, 0]) == tuple(image[-1, -1]) == BACKGROUNDS["light blue"]  # the margin is background
        assert (np.abs(image.astype(int) - BACKGROUNDS["light blue"]).sum(-1) > 60).mean() > 0.1  # the emoji is drawn


def test_tensor_cache_matches_render_and_dataset(world, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pixels, labels = world.tensor_cache("held_out", 32, cache=True)
    items = world.items("held_out")
    assert pixels.shape == (len(items), 3, 32, 32) and pixels.dtype == torch.uint8
    assert np.array_equal(pixels[3].permute(1, 2, 0).numpy(), np.asarray(world.render(items[3], 32)))
    assert labels["emoji"][3] == items[3].emoji_id and labels["background"][3] == items[3].background_id
    assert len(list((tmp_path / "crossdistill").glob("*.safetensors"))) == 1
    again, _ = world.tensor_cache("held_out", 32, cache=True)  # read back from the file
    assert torch.equal(again, pixels)

    example = EmojiDataset(world, "held_out", 32)[3]
    assert example["caption"] == items[3].caption and example["style"] == items[3].style_id
    assert example["pixels"].shape == (3, 32, 32) and -1.0 <= example["pixels"].min() <= example["pixels"].max() <= 1.0
    torch.manual_seed(0)
    shifted = EmojiDataset(world, "held_out", 32, augment=True)[3]["pixels"]
    assert shifted.shape == (3, 32, 32) and not torch.equal(shifted, example["pixels"])


def test_missing_source_drops_its_style_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji, "NOTO_FONT_PATH", tmp_path / "absent.ttf")
    monkeypatch.setattr(emoji, "_sources", {})
    with pytest.warns(UserWarning, match="noto.*dropped.*fonts-noto-color-emoji"):
        world = EmojiWorld(num_emoji=10)
    assert world.styles == [s for s in STYLES if s != "noto"] and world.missing_styles == ["noto"]
    assert world.render(world.items("train")[0], 16).size == (16, 16)
    with pytest.raises(DataError, match="noto"):
        world.parse_caption("grinning face, noto style, on a white background")


def test_no_source_at_all_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(emoji, "_sources", dict.fromkeys(STYLES))
    with pytest.raises(DataError, match="no emoji source"):
        EmojiWorld()
