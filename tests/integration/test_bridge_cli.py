"""``crossdistill bridge train|report`` end to end on tiny random spaces: train, resume exactly, export, report."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from crossdistill.cli import main
from crossdistill.train.stats import read_stats

# Small enough that one run takes a second or two: 16 images of a 4-emoji world, latents cached once.
TINY = ["--preset", "tiny", "--set", "data.num_emoji=4", "--set", "data.max_images=16"]


def _train(run_dir, *extra: str) -> None:
    assert main(["bridge", "train", "--run-dir", str(run_dir), *TINY, *extra]) == 0


def _weights(run_dir):
    return load_file(str(run_dir / "bridge" / "diffusion_pytorch_model.safetensors"))


def test_train_writes_everything_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight)  # 4 steps, checkpoints every 2
    assert json.loads((straight / "bridge" / "bridge_config.json").read_text())["kind"] == "prior_projector"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    rows = read_stats(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss/rec"] > 0 and r["loss/attn"] >= 0 for r in rows)
    cache = load_file(str(straight / "cache" / "latents.safetensors"))
    assert cache["z_s"].shape == (16, 4, 8, 8) and cache["z_t"].shape[0] == 16
    assert any(k.startswith("cond.") for k in cache)

    _train(resumed, "--set", "train.max_steps=2")  # stops at 2 ...
    _train(resumed)  # ... then resumes from its step-2 checkpoint (and its latent cache) up to 4
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [r["step"] for r in read_stats(resumed)] == [1, 2, 3, 4]


def test_weightless_kind_is_written_without_training(tmp_path):
    run = tmp_path / "de"
    _train(run, "--kind", "decode_encode")
    assert json.loads((run / "bridge" / "bridge_config.json").read_text())["kind"] == "decode_encode"
    assert not (run / "checkpoints").exists()


def test_identity_across_spaces_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["bridge", "train", "--run-dir", str(tmp_path / "id"), *TINY, "--kind", "identity"]) == 2
    assert "identity bridge needs one shared latent space" in capsys.readouterr().err


def test_report_compares_bridges_marks_identity_na_and_refuses_other_spaces(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "--set", "train.max_steps=2")
    out = tmp_path / "report"
    argv = ["bridge", "report", "--bridge", f"pp={run / 'bridge'}", "--kinds", "decode_encode", "identity"]
    assert main([*argv, "--out", str(out), "--num-images", "4", "--taus", "0.5"]) == 0
    results = json.loads((out / "bridge_report.json").read_text())
    assert set(results["bridges"]) == {"pp", "decode_encode", "identity"}
    assert "unavailable" in results["bridges"]["identity"]
    for name in ("pp", "decode_encode"):
        m = results["bridges"][name]
        for key in ("latent_mse", "psnr_db", "attention_kl", "x0_mse", "gflops", "ms"):
            assert m[key] == pytest.approx(m[key]) and m[key] >= 0, (name, key)  # finite, non-negative
    assert results["bridges"]["decode_encode"]["trainable_params"] == 0
    assert results["bridges"]["pp"]["trainable_params"] > 0
    text = (out / "report.md").read_text()
    assert "| pp | prior_projector |" in text and "identity: n/a" in text
    assert (out / "bridge_grid.png").stat().st_size > 0

    other_teacher = [
        "--bridge",
        str(run / "bridge"),
        "--out",
        str(tmp_path / "r"),
        *TINY,
        "--set",
        "model.teacher_family=sd15",
    ]
    assert main(["bridge", "report", *other_teacher]) == 2
    assert "built for another Teacher space" in capsys.readouterr().err


def test_train_and_report_on_an_image_folder_skipping_a_corrupt_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(24, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"random picture number {i}")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a broken file")
    data = ["--set", "data.source=images", "--set", f"data.path={folder}", "--set", f"data.held_out_path={folder}"]
    run = tmp_path / "run"
    _train(run, *data, "--set", "train.max_steps=1")
    assert load_file(str(run / "cache" / "latents.safetensors"))["z_s"].shape[0] == 6  # the corrupt file skipped
    out = tmp_path / "report"
    # No --preset/--set: the report reads the spaces and data from the run's config.json.
    assert main(["bridge", "report", "--bridge", str(run / "bridge"), "--out", str(out), "--taus", "0.5"]) == 0
    assert json.loads((out / "bridge_report.json").read_text())["num_images"] == 6
