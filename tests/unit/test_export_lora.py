"""``export --lora``: a rank-r change of the UNet is written as a LoRA that unmodified diffusers loads exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from crossdistill.cli import main
from crossdistill.export.pipeline import LORA_FOLDER, export_lora, lora_factors
from crossdistill.models.sd15 import SD15Space

RANK = 2


def perturb(unet: nn.Module, rank: int, seed: int = 1) -> tuple[nn.Module, list[str]]:
    """A copy of ``unet`` whose Linear, 1×1 and 3×3 conv weights each got a random change of rank ``rank``."""
    g = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(unet)
    changed = []
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            w = module.weight
            out_dim, fan_in = w.shape[0], w[0].numel()
            delta = torch.randn(out_dim, rank, generator=g) @ torch.randn(rank, fan_in, generator=g)
            w += 0.05 * delta.reshape(w.shape)
            changed.append(name)
    return tuned, changed


def test_low_rank_change_is_recovered_by_load_lora_weights(tmp_path):
    SD15Space.tiny(seed=0).save_pretrained(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", use_safetensors=True)
    base = pipe.unet
    tuned, changed = perturb(base, RANK)
    kinds = {type(m).__name__ + str(getattr(m, "kernel_size", "")) for n, m in base.named_modules() if n in changed}
    assert {"Linear", "Conv2d(1, 1)", "Conv2d(3, 3)"} <= kinds

    report = export_lora(base, tuned, tmp_path / LORA_FOLDER, RANK)
    assert (tmp_path / LORA_FOLDER / "pytorch_lora_weights.safetensors").is_file()
    assert report.layers == len(changed)
    assert report.fraction() == pytest.approx(1.0, abs=1e-9)
    assert set(report.energy) == {"linear", "conv1x1", "conv_kxk"}
    print(report.summary())

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 10])
    ctx = torch.randn(2, 5, base.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        before = base(x, t, ctx).sample
        want = tuned(x, t, ctx).sample
        pipe.load_lora_weights(tmp_path / LORA_FOLDER)
        got = pipe.unet(x, t, ctx).sample
    print("max abs diff LoRA vs tuned:", (got - want).abs().max().item())
    assert (before - want).abs().max().item() > 1e-2
    assert (got - want).abs().max().item() < 1e-4


def test_higher_rank_change_reports_partial_capture():
    base = nn.Sequential(nn.Linear(8, 6))
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned[0].weight += torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    a, b, kept = lora_factors(tuned[0].weight - base[0].weight, 2)
    assert a.shape == (2, 8) and b.shape == (6, 2)
    total = float(((tuned[0].weight - base[0].weight) ** 2).sum())
    assert 0 < kept < total
    # A rank above min(out, in) is padded with zeros and captures everything.
    a, b, kept = lora_factors(tuned[0].weight - base[0].weight, 7)
    assert a.shape == (7, 8) and kept == pytest.approx(total)
    assert torch.allclose((b @ a).float(), tuned[0].weight - base[0].weight, atol=1e-5)


def test_cli_has_lora_flag(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--lora RANK" in capsys.readouterr().out


def test_export_cli_writes_lora_of_a_distill_run(tmp_path, capsys):
    """End to end on a 2-step tiny run: ``--lora`` writes the folder and the LoRA moves the base toward the export."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from distill_common import tiny_config

    from crossdistill.train.distill import DistillTrainer

    DistillTrainer(tiny_config(tmp_path, "train.max_steps=2"), tmp_path / "run").train()
    out = tmp_path / "export"
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--lora", "4"]) == 0
    assert "captures" in capsys.readouterr().out
    assert (out / LORA_FOLDER / "pytorch_lora_weights.safetensors").is_file()

    SD15Space.tiny(seed=0).save_pretrained(tmp_path / "base")  # the run's Student base, model.student_path=tiny:0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", use_safetensors=True)
    distilled = type(pipe.unet).from_pretrained(out / "unet")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 999])
    ctx = torch.randn(2, 5, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = distilled(x, t, ctx).sample
        before = (pipe.unet(x, t, ctx).sample - want).abs().max().item()
        pipe.load_lora_weights(out / LORA_FOLDER)
        after = (pipe.unet(x, t, ctx).sample - want).abs().max().item()
    print(f"max abs diff to the distilled UNet: base {before:.4g}, base+LoRA {after:.4g}")
    assert after < before
