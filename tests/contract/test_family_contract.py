"""The denoiser contract (DESIGN.md §4), checked on a tiny random build of every registered family (CPU)."""

from __future__ import annotations

import shutil

import pytest
import torch

from crossdistill.errors import ModelLoadError
from crossdistill.models import family_names, get_family

FAMILIES = family_names()
PROMPTS = ["a red cat", "a blue dog"]
TIMES = [0.05, 0.5, 1.0]


@pytest.fixture(scope="module", params=FAMILIES)
def space(request):
    return get_family(request.param).tiny(0)


@pytest.fixture(scope="module")
def saved(space, tmp_path_factory):
    path = tmp_path_factory.mktemp(space.family)
    space.save_pretrained(path)
    return path


def _batch(space, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(PROMPTS), *space.latent_shape, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return x0, eps, space.encode_prompts(PROMPTS)


def test_registry_covers_the_four_families():
    assert {"sd15", "sdxl", "sd3", "flux"} <= set(FAMILIES)


def test_shapes(space):
    x0, eps, cond = _batch(space)
    assert len(cond) == len(PROMPTS)
    t = torch.full((len(PROMPTS),), 0.5)
    assert space.denoiser.denoise(space.denoiser.noise(x0, t, eps), t, cond).shape == x0.shape
    pixels = space.codec.decode(x0)
    assert pixels.shape == (len(PROMPTS), 3, space.resolution, space.resolution)
    assert space.codec.encode(pixels).shape == x0.shape
    assert space.describe()["family"] == space.family
    times = space.denoiser.sample_time(64, torch.Generator().manual_seed(0), t_min=0.2, t_max=0.8)
    assert times.shape == (64,) and times.min() >= 0.2 and times.max() <= 0.8


@pytest.mark.parametrize("t", TIMES)
def test_conversions_round_trip(space, t):
    d = space.denoiser
    x0, eps, _ = _batch(space)
    tt = torch.full((len(PROMPTS),), t)
    x_t = d.noise(x0, tt, eps)
    torch.testing.assert_close(d.to_x0(d.from_x0(x0, x_t, tt), x_t, tt), x0, rtol=1e-4, atol=1e-4)
    raw = torch.randn_like(x0)
    torch.testing.assert_close(d.from_x0(d.to_x0(raw, x_t, tt), x_t, tt), raw, rtol=1e-4, atol=1e-4)
    # The target of the family's own loss is what from_x0 gives for the true x0.
    torch.testing.assert_close(d.from_x0(x0, x_t, tt), d.target(x0, eps, tt), rtol=1e-4, atol=1e-4)


def test_time_maps_onto_a_noise_level(space):
    a, s = space.denoiser.alpha_sigma(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.all(s[1:] > s[:-1]) and torch.all(a[1:] < a[:-1]), "noise must grow with t"
    assert s[0] < 0.05 and a[-1] < 0.1


def test_exact_network_denoises_and_has_zero_loss(space, monkeypatch):
    d = space.denoiser
    x0, eps, cond = _batch(space)
    tt = torch.tensor([0.3, 0.9])

    def exact(x_t, t, cond, guidance=None):  # the network that knows x0 (CFG doubles the batch)
        return d.from_x0(x0.repeat(len(x_t) // len(x0), 1, 1, 1), x_t, t)

    monkeypatch.setattr(d, "raw", exact)
    x_t = d.noise(x0, tt, eps)
    torch.testing.assert_close(d.denoise(x_t, tt, cond), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.denoise(x_t, tt, cond, 4.0, space.null_prompt(2)), x0, rtol=1e-4, atol=1e-4)
    assert d.loss(x0, cond, tt, eps).item() < 1e-10


def test_cfg_scale_one_equals_no_cfg(space):
    x0, eps, cond = _batch(space)
    tt = torch.tensor([0.4, 0.7])
    x_t = space.denoiser.noise(x0, tt, eps)
    plain = space.denoiser.denoise(x_t, tt, cond)
    assert torch.equal(space.denoiser.denoise(x_t, tt, cond, 1.0, space.null_prompt(2)), plain)
    assert not torch.equal(space.denoiser.denoise(x_t, tt, cond, 3.0, space.null_prompt(2)), plain)


def test_attention_capture_is_exact_and_differentiable(space):
    d = space.denoiser
    layers = d.attention_layers()
    assert layers
    x0, eps, cond = _batch(space)
    tt = torch.tensor([0.5, 0.5])
    x_t = d.noise(x0, tt, eps).requires_grad_(True)
    plain = d.denoise(x_t, tt, cond)
    with d.capture_attention() as maps:
        captured = d.denoise(x_t, tt, cond)
    assert torch.equal(plain, captured)
    assert set(maps) == set(layers)
    n_text = cond.tensors["encoder_hidden_states"].shape[1]
    for m in maps.values():
        assert m.ndim == 4 and m.shape[0] == 2 and m.shape[-1] == n_text
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
    # Rows sum to one, so weight the maps to get a non-trivial gradient back to the latent.
    m = maps[layers[0]]
    (m * torch.randn(m.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    # Processors are restored and only requested layers are captured.
    assert torch.equal(d.denoise(x_t, tt, cond), plain)
    with d.capture_attention([layers[-1]]) as maps:
        d.denoise(x_t, tt, cond)
    assert list(maps) == [layers[-1]]
    with pytest.raises(KeyError, match="attention_layers"), d.capture_attention(["no.such.layer"]):
        pass


def test_sampler_is_deterministic_under_a_seed(space):
    cond = space.encode_prompts(PROMPTS)

    def run(seed, steps=2, scale=1.0):
        return space.sample(cond, steps, guidance_scale=scale, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.shape == (2, *space.latent_shape)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert torch.isfinite(run(0, steps=3, scale=2.5)).all()


def test_save_load_round_trip(space, saved):
    loaded = get_family(space.family).from_pretrained(saved)
    assert loaded.describe() == space.describe()
    x0, eps, cond = _batch(space)
    loaded_cond = loaded.encode_prompts(PROMPTS)
    for key, value in cond.tensors.items():
        assert torch.equal(loaded_cond.tensors[key], value), key
    tt = torch.tensor([0.2, 0.8])
    x_t = space.denoiser.noise(x0, tt, eps)
    assert torch.equal(loaded.denoiser.denoise(x_t, tt, cond), space.denoiser.denoise(x_t, tt, cond))
    assert torch.equal(loaded.codec.decode(x0), space.codec.decode(x0))


def test_missing_folder_is_a_clear_error(space, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        get_family(space.family).from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not a diffusers"):
        get_family(space.family).from_pretrained(tmp_path)


def test_offline_hub_id_is_a_clear_error(space, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub is unreachable: pass a local diffusers folder"):
        get_family(space.family).from_pretrained("someone/some-model")


def test_wrong_family_is_a_clear_error(space, saved):
    other = next(f for f in FAMILIES if f != space.family)
    with pytest.raises(ModelLoadError, match=f"family {space.family}\\), not {other}: pass --family {space.family}"):
        get_family(other).from_pretrained(saved)


def test_corrupt_safetensors_is_a_clear_error(space, saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    weights = next((broken / space.backbone_subfolder).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        get_family(space.family).from_pretrained(broken)
