"""The Bridge (DESIGN.md §2) on tiny spaces of every family: shapes, the frozen prior, the losses, persistence."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from crossdistill.bridge.model import Bridge
from crossdistill.bridge.train import enable_teacher_checkpointing
from crossdistill.errors import SpaceMismatchError
from crossdistill.losses.bridge import BridgeLossWeights, attention_kl, bridge_loss, teacher_agreement
from crossdistill.models.registry import family_names, get_family

TEACHERS = family_names()
TRAINED_KINDS = ("prior_projector", "projector_only")
SMALL = {"hidden_channels": 8, "num_blocks": 1}


@functools.cache
def _space(family: str, seed: int, scale: int = 1):
    """A tiny space (cached: building them dominates the test time); ``scale`` multiplies its resolution."""
    space = get_family(family).tiny(seed=seed)
    space.resolution *= scale
    return space.requires_grad_(False).eval()


def _student():
    return _space("sd15", 0)


def _latents(space, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *space.latent_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [1, 2], ids=["same-res", "2x-res"])
@pytest.mark.parametrize("kind", ["prior_projector", "projector_only", "decode_encode"])
@pytest.mark.parametrize("teacher_family", TEACHERS)
def test_bridge_maps_student_latents_onto_teacher_grid(teacher_family, kind, scale):
    teacher = _space(teacher_family, 1, scale)
    bridge = Bridge.build(kind, _student(), teacher, **SMALL)
    with torch.no_grad():
        out = bridge(_latents(_student()))
    assert out.shape == (2, *teacher.latent_shape)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("prior_up_blocks", [1, 2])
def test_prior_projector_from_decoder_features(prior_up_blocks):
    teacher = _space("sd3", 1, 2)
    bridge = Bridge.build("prior_projector", _student(), teacher, prior_up_blocks=prior_up_blocks, **SMALL)
    z = _latents(_student())
    with torch.no_grad():
        out = bridge(z)
        assert out.shape == (2, *teacher.latent_shape)
        # A cached prior (what stage-1 training keeps in memory) gives the same result without the decoder.
        torch.testing.assert_close(bridge(None, prior=bridge.decoder_prior(z)), out, rtol=0, atol=0)


def test_identity_is_the_shared_space_and_refuses_two_spaces():
    z = _latents(_student())
    assert torch.equal(Bridge.build("identity", _student(), _student())(z), z)
    with pytest.raises(SpaceMismatchError, match="identity bridge needs one shared latent space"):
        Bridge.build("identity", _student(), _space("sd3", 1))
    with pytest.raises(SpaceMismatchError, match="latent_size"):  # one family, other resolution
        Bridge.build("identity", _student(), _space("sd15", 0, 2))


def test_decoder_prior_is_frozen_but_passes_gradients_to_the_student_latent():
    student, teacher = _student(), _space("sd3", 1, 2)
    bridge = Bridge.build("prior_projector", student, teacher, **SMALL)
    vae_before = {k: v.clone() for k, v in student.codec.state_dict().items()}
    proj_before = [p.detach().clone() for p in bridge.parameters()]
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=1e-2)
    target = _latents(teacher, seed=1)
    for step in range(3):
        z_s = _latents(student, seed=10 + step).requires_grad_(True)
        loss = (bridge(z_s) - target).pow(2).mean()
        loss.backward()
        assert all(p.grad is None for p in student.codec.parameters()), "the decoder prior must get no gradient"
        assert z_s.grad is not None and z_s.grad.abs().sum() > 0, "gradients must reach z_s through D_s"
        optimizer.step()
        optimizer.zero_grad()
    # Only the projector is a parameter of the Bridge, and it did learn.
    assert not any(p.data_ptr() in {q.data_ptr() for q in student.codec.parameters()} for p in bridge.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(proj_before, bridge.parameters()))
    for k, v in student.codec.state_dict().items():
        assert torch.equal(v, vae_before[k]), f"decoder weight {k} changed"


@pytest.mark.parametrize("teacher_family", TEACHERS)
def test_attention_fidelity_is_zero_for_identical_latents(teacher_family):
    teacher = _space(teacher_family, 1)
    z = _latents(teacher)
    cond = teacher.encode_prompts(["a red apple", "a blue cat"])
    t = torch.tensor([0.3, 0.7])
    attn, out = teacher_agreement(z, z.clone(), teacher, cond, t, torch.randn_like(z))
    assert attn.item() == pytest.approx(0.0, abs=1e-6)
    assert out.item() == pytest.approx(0.0, abs=1e-10)
    # ... and positive once the latents differ.
    attn, out = teacher_agreement(z, z + 0.5 * torch.randn_like(z), teacher, cond, t, torch.randn_like(z))
    assert attn.item() > 1e-6 and out.item() > 0


def test_attention_kl_is_exact_on_known_maps():
    p = torch.tensor([[[[0.5, 0.5]]]])
    q = torch.tensor([[[[0.25, 0.75]]]])
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    torch.testing.assert_close(attention_kl({"l": p}, {"l": q}), expected, atol=1e-6, rtol=0)
    assert attention_kl({"l": p}, {"l": p}).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="different layers"):
        attention_kl({"a": p}, {"b": p})


@pytest.mark.parametrize("kind", TRAINED_KINDS)
def test_attention_fidelity_gradient_reaches_the_projector(kind):
    student, teacher = _student(), _space("sd3", 1, 2)
    bridge = Bridge.build(kind, student, teacher, **SMALL)
    z_star = _latents(teacher, seed=3)
    cond = teacher.encode_prompts(["a red apple", "a blue cat"])
    weights = BridgeLossWeights(rec=0.0, attn=1.0)  # the attention term alone
    loss, logs = bridge_loss(
        bridge(_latents(student)), z_star, teacher, cond, weights, torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert logs["loss/attn"] > 0
    grads = [p.grad for p in bridge.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters()), "the Teacher stays frozen"


@pytest.mark.parametrize("kind", [*TRAINED_KINDS, "decode_encode"])
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path):
    student, teacher = _student(), _space("sd3", 1, 2)
    bridge = Bridge.build(kind, student, teacher, **SMALL).eval()
    for p in bridge.parameters():  # move off the init so a reload from defaults could not pass by chance
        p.data.add_(0.01 * torch.randn_like(p))
    bridge.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")), "safetensors only"
    loaded = Bridge.load(tmp_path, student, teacher).eval()
    z = _latents(student)
    with torch.no_grad():
        assert torch.equal(loaded(z), bridge(z))
    assert loaded.config.kind == kind


def test_loading_against_other_spaces_is_a_clear_error(tmp_path):
    student, teacher = _student(), _space("sd3", 1, 2)
    Bridge.build("prior_projector", student, teacher, **SMALL).save_pretrained(tmp_path)
    with pytest.raises(SpaceMismatchError, match="another Teacher space.*resolution"):
        Bridge.load(tmp_path, student, _space("sd3", 1))
    with pytest.raises(SpaceMismatchError, match="another Teacher space.*family"):
        Bridge.load(tmp_path, student, _space("sd15", 1, 2))
    with pytest.raises(SpaceMismatchError, match="another Student space"):
        Bridge.load(tmp_path, _space("sd15", 0, 2), teacher)


def test_gradient_checkpointed_teacher_gives_the_same_gradients():
    """The captured attention must survive the recomputation in backward (``hold`` keeps the capture installed)."""
    student, teacher = _student(), _space("sd3", 1)
    bridge = Bridge.build("projector_only", student, teacher, **SMALL)
    z_s, z_star = _latents(student), _latents(teacher, seed=3)
    cond = teacher.encode_prompts(["a red apple", "a blue cat"])
    weights = BridgeLossWeights(rec=0.0, attn=1.0, out=1.0)

    def grads() -> list[torch.Tensor]:
        bridge.zero_grad()
        with contextlib.ExitStack() as hold:
            gen = torch.Generator().manual_seed(0)
            loss, _ = bridge_loss(bridge(z_s), z_star, teacher, cond, weights, gen, hold=hold)
            loss.backward()
        return [p.grad.clone() for p in bridge.parameters()]

    plain = grads()
    assert enable_teacher_checkpointing(teacher)
    try:
        checkpointed = grads()
    finally:
        teacher.denoiser.backbone.disable_gradient_checkpointing()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
