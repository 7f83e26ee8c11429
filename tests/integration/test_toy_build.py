"""``toy build`` end to end on a tiny world: every stage runs, the files match the manifest and load back."""

from __future__ import annotations

import json

import pytest
import torch

from crossdistill.toy import world as toy
from crossdistill.toy.build import STAGES, Builder, DenoiserRecipe, EvalRecipe, JudgeRecipe, ToyRecipe, VAERecipe


def smoke_recipe() -> ToyRecipe:
    """A few steps of every stage on 4 emoji (72 prompts) with small batches: minutes of GPU become seconds of CPU."""
    vae = VAERecipe(steps=2, batch_size=4)
    return ToyRecipe(
        num_emoji=4,
        vae_teacher=vae,
        vae_student=vae,
        teacher=DenoiserRecipe(steps=3, batch_size=4, warmup_steps=1),
        student=DenoiserRecipe(steps=3, batch_size=4, warmup_steps=1),
        judge=JudgeRecipe(steps=2, batch_size=4),
        eval=EvalRecipe(num_prompts=4, teacher_steps=2, student_steps=2, batch_size=4, grid_prompts=2),
    )


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)  # later tests get the thread count they started with


@pytest.mark.slow
def test_smoke_build_writes_loadable_world(tmp_path, two_threads):
    manifest = Builder(smoke_recipe(), tmp_path, "cpu", progress=False).run(STAGES)
    assert set(manifest["files"]) == set(toy.FILES)
    assert json.loads((tmp_path / toy.MANIFEST).read_text())["metrics"]["num_prompts"] == 4
    loaded = toy.load_world(weights_dir=tmp_path)  # verifies every sha256
    assert loaded.teacher.latent_shape == (16, 16, 16) and loaded.student.latent_shape == (4, 8, 8)
    # The measured latent statistics went into the VAE configs: normalised latents are unit-variance-ish.
    assert loaded.teacher.codec.scale != 1.0 and loaded.student.codec.shift == 0.0
    assert (tmp_path / "samples_grid.png").is_file()
