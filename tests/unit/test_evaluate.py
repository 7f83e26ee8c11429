"""``evaluate``: fixed start noise per (prompt, seed), the result's keys, determinism, written files, comparisons."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from crossdistill.data.emoji import EmojiWorld
from crossdistill.errors import ConfigError, DataError
from crossdistill.eval.evaluate import (
    EmojiMetrics,
    ImageModel,
    compare_evaluations,
    evaluate,
    load_evaluation,
    start_noise,
    write_evaluation,
)
from crossdistill.eval.judge import Judge
from crossdistill.eval.metrics import JudgeFeatures, frechet_distance, judge_accuracy
from crossdistill.eval.report import to_uint8

PROMPTS = ["a red square", "a blue circle", "a green cat"]


class NoiseImages(ImageModel):
    """A fake model whose image is a deterministic function of its start noise and prompt (8 px)."""

    def __init__(self, name: str, gain: float = 1.0):
        self.name = name
        self.gain = gain
        self.calls: list[torch.Tensor] = []

    @property
    def noise_shape(self):
        return (3, 4, 4)

    def generate(self, prompts, noise):
        self.calls.append(noise.clone())
        shift = torch.tensor([len(p) / 20.0 for p in prompts]).view(-1, 1, 1, 1)
        pixels = torch.tanh(self.gain * noise + shift)
        return torch.nn.functional.interpolate(pixels, scale_factor=2, mode="nearest")


class Brightness:
    """A per-image scorer (the ``Scorer`` protocol of eval.metrics): mean brightness."""

    name, kind = "mean brightness", "scores"

    def __call__(self, pixels, prompts):
        return pixels.mean(dim=(1, 2, 3)).numpy()


brightness = Brightness()


def test_start_noise_depends_only_on_prompt_seed_and_shape():
    a = start_noise("a cat", 3, (4, 8, 8))
    assert torch.equal(a, start_noise("a cat", 3, (4, 8, 8)))
    assert not torch.equal(a, start_noise("a cat", 4, (4, 8, 8)))
    assert not torch.equal(a, start_noise("a dog", 3, (4, 8, 8)))


def test_evaluate_keys_and_determinism():
    model = NoiseImages("fake")
    result, images = evaluate(model, PROMPTS, [0, 1], scorers={"bright": brightness}, batch_size=2)
    assert set(result) == {"model", "num_prompts", "seeds", "emoji_metrics", "metric_names", "per_seed", "summary"}
    assert result["num_prompts"] == 3 and result["seeds"] == [0, 1] and result["emoji_metrics"] is False
    assert set(result["per_seed"]) == {"0", "1"}
    assert set(result["summary"]) == {"bright", "latency_ms"}
    assert set(result["summary"]["bright"]) == {"mean", "std", "n"} and result["summary"]["bright"]["n"] == 2
    assert images[0].shape == (3, 3, 8, 8)
    # The scorer sees exactly the generated images; mean ± spread is over the seeds.
    per_seed = [brightness(images[s], PROMPTS).mean().item() for s in (0, 1)]
    assert result["per_seed"]["1"]["bright"] == pytest.approx(per_seed[1])
    assert result["summary"]["bright"]["mean"] == pytest.approx(sum(per_seed) / 2)
    again, images_again = evaluate(
        NoiseImages("fake"), PROMPTS, [0, 1], scorers={"bright": brightness}, progress=False
    )
    assert again["summary"]["bright"] == result["summary"]["bright"]
    assert all(torch.equal(images[s], images_again[s]) for s in (0, 1))
    json.dumps(result)  # JSON-able as is


def test_same_noise_for_every_model_and_batch_size():
    a, b = NoiseImages("a"), NoiseImages("b", gain=2.0)
    evaluate(a, PROMPTS, [5], batch_size=3, progress=False)
    evaluate(b, PROMPTS, [5], batch_size=1, progress=False)
    # calls[0] is the warm-up; the rest cover every prompt once, in order, whatever the batching.
    assert torch.equal(torch.cat(a.calls[1:]), torch.cat(b.calls[1:]))
    assert torch.equal(a.calls[1][1], start_noise(PROMPTS[1], 5, (3, 4, 4)))


def test_evaluate_refuses_an_empty_prompt_set():
    with pytest.raises(DataError):
        evaluate(NoiseImages("x"), [], [0], progress=False)


def test_written_files_and_comparison(tmp_path):
    folders = []
    for name, gain in (("one", 1.0), ("two", 3.0)):
        result, images = evaluate(
            NoiseImages(name, gain), PROMPTS, [0, 1], scorers={"bright": brightness}, progress=False
        )
        run_dir = tmp_path / f"run_{name}"
        run_dir.mkdir()
        (run_dir / "stats.jsonl").write_text(
            "".join(json.dumps({"step": i, "loss/dm": 1 / (i + 1)}) + "\n" for i in range(5))
        )
        folders.append(write_evaluation(tmp_path / name, result, images, PROMPTS, run_dir=run_dir))
    first = folders[0]
    written = ("metrics.json", "report.md", "report.html", "grid.png", "loss.png", "prompts.txt")
    for f in (*written, "samples/p0002_s1.png"):
        assert (first / f).is_file(), f
    loaded = load_evaluation(folders[1])
    assert loaded["summary"] == result["summary"] and loaded["run_dir"] == str(tmp_path / "run_two")
    assert (first / "prompts.txt").read_text().splitlines() == PROMPTS
    # The saved sample is the generated image, rounded to uint8.
    saved = np.asarray(Image.open(folders[1] / "samples" / "p0001_s1.png"))
    assert np.array_equal(saved, to_uint8(images[1][1:2])[0])

    out = compare_evaluations(folders, tmp_path / "cmp")
    for f in (
        "comparison.json",
        "comparison.md",
        "comparison.html",
        "comparison_table.md",
        "bars.png",
        "grid.png",
        "loss.png",
    ):
        assert (out / f).is_file(), f
    table = (out / "comparison_table.md").read_text().splitlines()
    assert table[0].startswith("| model | bright ↑ | latency_ms ↓")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| one", "| two"]
    assert Image.open(out / "grid.png").size[0] > 2 * 8  # one column per model


def test_compare_refuses_a_folder_without_metrics(tmp_path):
    with pytest.raises(DataError, match="not an evaluation folder"):
        compare_evaluations([tmp_path], tmp_path / "out")


@pytest.fixture(scope="module")
def tiny_metrics():
    world = EmojiWorld(num_emoji=3, styles=["twemoji"])
    torch.manual_seed(0)
    judge = Judge.for_world(world, input_size=16, channels=(8, 16)).eval()
    return EmojiMetrics(world, judge, resnet=False)


def test_emoji_reference_metrics(tiny_metrics):
    prompts = tiny_metrics.world.prompts("all")[:6]
    scorers = {"bright": brightness}
    result, images = evaluate(NoiseImages("fake"), prompts, [0, 1], metrics=tiny_metrics, scorers=scorers)
    assert result["emoji_metrics"] is True
    keys = {"acc/emoji", "acc/style", "acc/background", "acc/joint", "fd/judge_features", "bright", "latency_ms"}
    assert set(result["summary"]) == keys
    assert result["metric_names"]["fd/judge_features"] == "Fréchet distance on judge features"
    # Values are those of the metric functions on exactly these images and the world's real renders.
    items = [tiny_metrics.world.parse_caption(p) for p in prompts]
    expected_acc = judge_accuracy(tiny_metrics.judge, images[1], items)
    assert result["per_seed"]["1"]["acc/joint"] == expected_acc["joint"]
    real = tiny_metrics.real_pixels(prompts)
    features = JudgeFeatures(tiny_metrics.judge)
    fd = frechet_distance(features(images[0], prompts), features(real, prompts))
    assert result["per_seed"]["0"]["fd/judge_features"] == pytest.approx(fd)
    again, _ = evaluate(NoiseImages("fake"), prompts, [0, 1], metrics=tiny_metrics, scorers=scorers)
    assert {k: v for k, v in again["summary"].items() if k != "latency_ms"} == {
        k: v for k, v in result["summary"].items() if k != "latency_ms"
    }
    # Real images score a Fréchet distance of ~0 against themselves: the reference is what the model is measured on.
    real_model = RealImages(tiny_metrics)
    perfect, _ = evaluate(real_model, prompts, [0], metrics=tiny_metrics, scorers=scorers)
    assert abs(perfect["summary"]["fd/judge_features"]["mean"]) < 1e-6


class RealImages(ImageModel):
    """A 'model' that returns the world's real render of each prompt (whatever the noise)."""

    name = "real"

    def __init__(self, reference):
        self.reference = reference

    @property
    def noise_shape(self):
        return (1, 1, 1)

    def generate(self, prompts, noise):
        return self.reference.real_pixels(prompts)


def test_feature_scorers_are_skipped_without_a_reference(tiny_metrics):
    scorers = {"judge_features": JudgeFeatures(tiny_metrics.judge), "bright": brightness}
    result, _ = evaluate(NoiseImages("fake"), PROMPTS, [0], metrics=tiny_metrics, scorers=scorers)
    assert result["emoji_metrics"] is False
    assert set(result["summary"]) == {"bright", "latency_ms"}


def test_scorer_module_plugs_in_a_scorer_without_editing_the_package(tmp_path, monkeypatch):
    from crossdistill.eval.cli import resolve_scorers

    (tmp_path / "user_scorers_for_test.py").write_text(
        "from crossdistill.eval.metrics import register_scorer\n"
        "@register_scorer('user_gain_score')\n"
        "class Gain:\n"
        "    name, kind = 'mean pixel × gain', 'scores'\n"
        "    def __init__(self, gain='1'):\n"
        "        self.gain = float(gain)\n"
        "    def __call__(self, images, prompts):\n"
        "        return images.mean(dim=(1, 2, 3)).numpy() * self.gain\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scorers = resolve_scorers(["user_gain_score:gain=2"], ["user_scorers_for_test"])
    result, images = evaluate(NoiseImages("fake"), PROMPTS, [0], scorers=scorers, progress=False)
    assert result["summary"]["user_gain_score"]["mean"] == pytest.approx(2 * images[0].mean().item(), rel=1e-5)
    assert result["metric_names"]["user_gain_score"] == "mean pixel × gain"
    with pytest.raises(ConfigError, match="unknown scorer"):
        resolve_scorers(["no_such_scorer"], [])
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_scorers([], ["no_such_module_for_test"])


def test_prompt_selection(tmp_path):
    from crossdistill.eval.cli import select_prompts
    from crossdistill.eval.loaders import parse_spec

    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\none\n\ntwo\nthree\nfour\n")
    assert select_prompts(str(path)) == ["one", "two", "three", "four"]
    assert select_prompts(str(path), num_prompts=2) == ["one", "three"]  # spread over the set
    with pytest.raises(DataError):
        select_prompts(str(tmp_path / "missing.txt"))
    assert parse_spec("run:runs/a:b") == ("run", "runs/a:b")
    for bad in ("runs/a", "model:x", "teacher:"):
        with pytest.raises(ConfigError, match="KIND:PATH"):
            parse_spec(bad)
