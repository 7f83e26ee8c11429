"""A few distillation steps on tiny spaces, cross-space and shared-space: losses, updates, files."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from distill_common import tiny_config

from crossdistill.config import apply_overrides
from crossdistill.train import distill
from crossdistill.train.distill import DistillTrainer
from crossdistill.train.stats import read_stats


@pytest.mark.parametrize(
    "cross, extra",
    [
        (True, ["model.fake_score=lora", "model.lora_rank=4", "train.ema_decay=0.9"]),
        (False, []),
    ],
    ids=["cross_space_lora_ema", "shared_space_copy"],
)
def test_distill_steps_update_the_generator_and_write_the_run(tmp_path, cross, extra):
    cfg = tiny_config(tmp_path, *extra, "log.sample_every=4", cross=cross)
    trainer = DistillTrainer(cfg, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.generator_denoiser.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in trainer.teacher.denoiser.backbone.named_parameters()
                      if "lora" not in n}  # fmt: skip
    assert trainer.train() == 4

    rows = read_stats(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    gen_rows = [r for r in rows if "loss/dm" in r]
    assert [r["step"] for r in gen_rows] == [1, 3]  # one generator update per two critic updates
    assert all(math.isfinite(r["loss/fake"]) and r["grad_norm/critic"] > 0 for r in rows)
    assert all(math.isfinite(r["loss/dm"]) and r["grad_norm/generator"] > 0 for r in gen_rows)

    moved = [n for n, p in trainer.generator_denoiser.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2
    # The Teacher (real score) never changes, also when the fake score is a LoRA on it.
    for n, p in trainer.teacher.denoiser.backbone.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, teacher_before[n]), n
    if trainer.ema is not None:
        ema = dict(trainer.ema.named_parameters())
        assert any(not torch.equal(ema[n], p) for n, p in trainer.generator_denoiser.named_parameters())
    run = tmp_path / "run"
    assert (run / "config.json").is_file()
    assert (run / "samples" / "step_000004.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def _real_images(tmp_path):
    from PIL import Image

    reals = tmp_path / "reals"
    reals.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (20, 20), colour).save(reals / f"{i}.png")
        (reals / f"{i}.txt").write_text(f"a {colour} square")
    (reals / "broken.png").write_bytes(b"not a png")  # skipped and counted, not fatal
    return reals


def test_gan_and_bridge_cotraining_run(tmp_path):
    """The optional GAN head (reals = Teacher latents of real images) and the co-trained Bridge both train."""
    reals = _real_images(tmp_path)
    cfg = tiny_config(tmp_path, f"data.real_images={reals}", "train.gan_weight=0.1", "train.cotrain_bridge=true",
                      "train.max_steps=2", cross=True)  # fmt: skip
    trainer = DistillTrainer(cfg, tmp_path / "run")
    bridge_before = [p.detach().clone() for p in trainer.bridge.parameters()]
    trainer.train()
    rows = read_stats(tmp_path / "run")
    assert all(math.isfinite(rows[0][k]) for k in ("loss/gan_g", "loss/gan_d", "loss/bridge_rec", "loss/dm"))
    assert any(not torch.equal(a, b) for a, b in zip(trainer.bridge.parameters(), bridge_before))


def test_generator_gan_pass_computes_no_critic_weight_gradient(tmp_path, monkeypatch):
    """The generator update's GAN pass freezes the critic's weights: the generator's gradients are those of the pass
    with the critic trainable, bit for bit, the critic's weights get none (before, they got gradients the critic
    update zeroed), and their requires_grad flags come back."""
    cfg = tiny_config(tmp_path, f"data.real_images={_real_images(tmp_path)}", "train.gan_weight=0.1", cross=True)
    trainer = DistillTrainer(cfg, tmp_path / "run")
    device = trainer.accelerator.device
    flags = [p.requires_grad for p in trainer.critic_params]
    assert any(flags)

    def generator_grads():
        gen = distill.step_generator(cfg.train.seed, 0, 1, device, "generator")
        trainer.opt_g.zero_grad(set_to_none=True)
        trainer.opt_c.zero_grad(set_to_none=True)
        with trainer.accelerator.autocast():
            loss, logs = trainer.generator_loss(trainer.batch(gen), gen)
        assert "loss/gan_g" in logs
        trainer.accelerator.backward(loss)
        critic = [p.grad is not None for p in trainer.critic_params]
        return [p.grad.clone() for p in trainer.gen_params if p.grad is not None], critic

    frozen, critic_frozen = generator_grads()
    assert [p.requires_grad for p in trainer.critic_params] == flags
    monkeypatch.setattr(distill, "weights_frozen", lambda params: contextlib.nullcontext())
    trainable, critic_trainable = generator_grads()
    assert not any(critic_frozen) and any(critic_trainable)
    assert len(frozen) == len(trainable) > 0 and all(torch.equal(a, b) for a, b in zip(frozen, trainable))


def test_gan_with_gradient_checkpointing_trains_as_without(tmp_path):
    """The real presets checkpoint the fake score. The generator's GAN pass then keeps the critic's weights
    trainable (a frozen forward and its recompute in the backward would save different tensors: torch raised a
    CheckpointError in the first generator update), and the run follows the one without checkpointing."""
    cfg = tiny_config(tmp_path, f"data.real_images={_real_images(tmp_path)}", "train.gan_weight=0.1",
                      "model.fake_score=lora", "model.lora_rank=4", cross=True)  # fmt: skip
    runs = []
    for checkpointing in (False, True):
        trainer = DistillTrainer(apply_overrides(cfg, [f"train.gradient_checkpointing={checkpointing}"]),
                                 tmp_path / f"run_{checkpointing}")  # fmt: skip
        runs.append([trainer.train_step(step) for step in range(1, 5)])
    assert "loss/gan_g" in runs[1][0] and "grad_norm/generator" in runs[1][0]
    for plain, checkpointed in zip(*runs):
        assert checkpointed.keys() == plain.keys()
        for key in plain:
            assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5), key


def test_gan_passes_under_compile_keep_the_eager_losses(tmp_path, monkeypatch):
    """With train.compile the GAN passes' stop at the feature block and the frozen critic weights run through the
    compiled blocks (dynamo's eager backend: graph capture and guards, no C++ build; the frozen pass is one more
    graph per block kind): the losses are the eager run's."""
    from crossdistill.train.perf import compile_blocks

    reals = _real_images(tmp_path)
    monkeypatch.setattr(distill, "compile_blocks", lambda m, **kw: compile_blocks(m, backend="eager", **kw))
    losses = {}
    for compiled in (False, True):
        cfg = tiny_config(tmp_path, f"data.real_images={reals}", "train.gan_weight=0.1", "train.max_steps=3",
                          f"train.compile={str(compiled).lower()}", cross=True)  # fmt: skip
        run = tmp_path / f"run_{compiled}"
        DistillTrainer(cfg, run).train()
        losses[compiled] = [{k: v for k, v in r.items() if k.startswith("loss/")} for r in read_stats(run)]
    assert any("loss/gan_g" in r for r in losses[True]) and any("loss/gan_d" in r for r in losses[True])
    for eager, comp in zip(losses[False], losses[True], strict=True):
        assert eager.keys() == comp.keys()
        for k in eager:
            assert comp[k] == pytest.approx(eager[k], rel=1e-5, abs=1e-7), k


def record_grads_at_step(monkeypatch, optimizer, params: list[torch.Tensor]) -> dict:
    """Patch ``optimizer.step`` to copy the gradients of ``params`` into the returned dict (key "grads") first."""
    seen: dict = {}
    step = optimizer.step

    def recording_step(*args, **kwargs):
        seen["grads"] = [None if p.grad is None else p.grad.clone() for p in params]
        return step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", recording_step)
    return seen


def test_gradient_accumulation_averages_the_micro_batches_and_syncs_once(tmp_path, monkeypatch):
    """train.gradient_accumulation_steps=2: the optimiser steps on the mean of the two micro-batches' gradients (each
    drawn from the update's generator in turn), the logs are their means, and every micro-batch but the last runs
    in no_sync of the modules that update trains (so DDP all-reduces once per update)."""
    common = ("model.fake_score=lora", "model.lora_rank=4", "train.max_grad_norm=0", "train.cotrain_bridge=true",
              "data.real_images=emoji:train", "data.max_real_images=8")  # fmt: skip
    cfg = tiny_config(tmp_path, *common, cross=True)  # one random Bridge on disk for every trainer
    entered = []

    @contextlib.contextmanager
    def recording_no_sync(module):
        entered.append(module)
        yield

    for name, params, opt, loss_fn, step_fn, loss_key, synced in [
        ("critic", "critic_params", "opt_c", "critic_loss", "critic_step", "loss/fake", lambda t: [t.fake]),
        ("generator", "gen_params", "opt_g", "generator_loss", "generator_step", "loss/dm",
         lambda t: [t.generator, t.bridge]),
    ]:  # fmt: skip
        # fresh trainers for each update (one update changes what the other computes); the same seeds: same weights
        acc = DistillTrainer(apply_overrides(cfg, ["train.gradient_accumulation_steps=2"]), tmp_path / f"a_{name}")
        ref = DistillTrainer(cfg, tmp_path / f"b_{name}")
        monkeypatch.setattr(acc.accelerator, "no_sync", recording_no_sync)
        seen = record_grads_at_step(monkeypatch, getattr(acc, opt), getattr(acc, params))
        entered.clear()
        logs = getattr(acc, step_fn)(1)
        assert entered == synced(acc)  # the first micro-batch only, each module that gets gradients

        # the same two draws on a trainer without accumulation (same weights: same seeds), each backward alone
        gen = distill.step_generator(0, 0, 1, ref.accelerator.device, name)
        expected = [torch.zeros_like(p) for p in getattr(ref, params)]
        micro_logs = []
        for _ in range(2):
            loss, micro = getattr(ref, loss_fn)(ref.batch(gen), gen)
            micro_logs.append(micro)
            grads = torch.autograd.grad(loss, getattr(ref, params), allow_unused=True)
            expected = [e + (0 if g is None else g / 2) for e, g in zip(expected, grads)]
        assert len(seen["grads"]) == len(expected) > 0
        for got, want in zip(seen["grads"], expected):
            torch.testing.assert_close(torch.zeros_like(want) if got is None else got, want, rtol=1e-5, atol=1e-7)
        for key in micro_logs[0]:
            assert logs[key] == pytest.approx((micro_logs[0][key] + micro_logs[1][key]) / 2, rel=1e-6), key
        assert micro_logs[0][loss_key] != micro_logs[1][loss_key]  # two different micro-batches
        assert logs[f"grad_norm/{name}"] > 0
