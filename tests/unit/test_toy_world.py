"""The shipped emoji-world weights: hashes match the manifest and each model still meets a floor on held-out data.

Floors sit well below the values measured at build time (``manifest.json`` → ``metrics``), so they catch a broken
file, loader or family adapter, not run-to-run noise. Everything runs on the CPU on a small held-out batch.
"""

from __future__ import annotations

import json

import pytest
import torch

from crossdistill.errors import ModelLoadError
from crossdistill.eval.metrics import judge_accuracy
from crossdistill.toy import world as toy
from crossdistill.toy.evaluation import held_out_subset, reconstruction_psnr

# Floors (measured values are in the manifest and docs/emoji_world.md).
TEACHER_VAE_PSNR = 22.0
STUDENT_VAE_PSNR = 19.0
JUDGE_REAL_JOINT = 0.85
TEACHER_FEW_STEP_BACKGROUND = 0.8  # 8 Euler steps with CFG: colours and layout already right
TEACHER_FEW_STEP_EMOJI = 0.4


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return toy.load_world("cpu")


@pytest.fixture(scope="module")
def batch(loaded):
    """32 held-out prompts spread over the split."""
    index = held_out_subset(loaded.world, 32)
    return index, [loaded.world.items("held_out")[i] for i in index]


def test_manifest_lists_every_file_with_matching_hash():
    manifest = toy.verify_weights()
    assert set(manifest["files"]) == set(toy.FILES)
    assert sum(e["bytes"] for e in manifest["files"].values()) < 30 * 2**20
    for name in toy.FILES:
        assert manifest["stages"][name]["wall_s"] > 0 and manifest["stages"][name]["device"]


def test_corrupt_file_is_refused(tmp_path):
    for name in toy.FILES.values():
        (tmp_path / name).write_bytes((toy.WEIGHTS_DIR / name).read_bytes())
    manifest = toy.read_manifest()
    (tmp_path / toy.MANIFEST).write_text(json.dumps(manifest))
    data = bytearray((tmp_path / toy.FILES["judge"]).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / toy.FILES["judge"]).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        toy.verify_weights(tmp_path)


def test_spaces_have_the_designed_geometry(loaded):
    assert loaded.teacher.family == "sd3" and loaded.student.family == "sd15"
    assert loaded.teacher.latent_shape == (16, 16, 16)
    assert loaded.student.latent_shape == (4, 8, 8)
    assert loaded.student.codec.shift == 0.0  # SD1.5-style VAE: exports to a plain StableDiffusionPipeline


@pytest.mark.parametrize("space_name, floor", [("teacher", TEACHER_VAE_PSNR), ("student", STUDENT_VAE_PSNR)])
def test_vae_reconstruction_floor(loaded, batch, space_name, floor):
    space = getattr(loaded, space_name)
    pixels, _ = loaded.world.tensor_cache("held_out", space.resolution)
    assert reconstruction_psnr(space, pixels[batch[0]]) > floor


def test_normalised_latents_have_unit_scale(loaded, batch):
    for space in (loaded.teacher, loaded.student):
        pixels, _ = loaded.world.tensor_cache("held_out", space.resolution)
        with torch.no_grad():
            z = space.codec.encode(pixels[batch[0]].float() / 127.5 - 1)
        assert 0.6 < float(z.std()) < 1.5


def test_judge_floor_on_real_held_out_images(loaded, batch):
    pixels, _ = loaded.world.tensor_cache("held_out", loaded.judge.config.input_size)
    assert judge_accuracy(loaded.judge, pixels[batch[0]], batch[1])["joint"] > JUDGE_REAL_JOINT


def test_teacher_samples_are_judged_right(loaded, batch):
    _, items = batch
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = loaded.teacher.encode_prompts([it.caption for it in items])
        latents = loaded.teacher.sample(cond, num_steps=8, guidance_scale=4.0, generator=gen)
        pixels = loaded.teacher.codec.decode(latents)
    acc = judge_accuracy(loaded.judge, pixels, items)
    assert acc["background"] > TEACHER_FEW_STEP_BACKGROUND and acc["emoji"] > TEACHER_FEW_STEP_EMOJI
