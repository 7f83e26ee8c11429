"""Seeding, stats.jsonl, the NaN/inf guard and the shared training loop (resume, interrupt, sampling)."""

from __future__ import annotations

import errno
import logging
import math

import pytest
import torch

from crossdistill.train import checkpoint as ckpt_mod
from crossdistill.train.guard import NonFiniteGuard, TrainingDivergedError
from crossdistill.train.runner import train_loop
from crossdistill.train.seeding import derive_seed, seed_everything, step_generator
from crossdistill.train.stats import StatsLogger, read_stats


def test_step_generator_is_a_function_of_seed_rank_step_stream():
    draw = lambda *a, **k: torch.randn(4, generator=step_generator(*a, **k))  # noqa: E731
    assert torch.equal(draw(1, 0, 7), draw(1, 0, 7))
    for other in [(2, 0, 7), (1, 1, 7), (1, 0, 8)]:
        assert not torch.equal(draw(1, 0, 7), draw(*other))
    assert not torch.equal(draw(1, 0, 7, stream="noise"), draw(1, 0, 7, stream="timesteps"))
    assert 0 <= derive_seed(1, 0, 7) < 2**63
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_stats_truncated_on_resume(tmp_path):
    with StatsLogger(tmp_path) as stats:
        for step in range(1, 8):
            stats.log(step, {"loss/dm": torch.tensor(step * 0.5), "time/step_s": 0.1})
        stats.log(8, {"loss/dm": math.nan})
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write('{"step": 9, "loss/d')  # a line torn by kill -9
    rows = read_stats(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["loss/dm"] == 0.5 and rows[7]["loss/dm"] is None, "NaN is stored as null (valid JSON)"

    with StatsLogger(tmp_path, resume_step=5) as stats:  # resumed from checkpoint step 5
        stats.log(6, {"loss/dm": 9.0})
    rows = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["loss/dm"] == 9.0
    StatsLogger(tmp_path).close()  # a fresh run (step 0) in the same dir starts the curves over
    assert read_stats(tmp_path) == []


def test_guard_skips_then_stops(caplog):
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check({"loss/dm": torch.tensor(1.0), "loss/gan": 0.5})
    with caplog.at_level(logging.WARNING, logger="crossdistill.train.guard"):
        assert not guard.check({"loss/dm": torch.tensor(float("nan")), "loss/gan": 0.5}, step=4)
    assert "step 4: non-finite loss in loss/dm" in caplog.text
    assert not guard.check({"loss/dm": torch.tensor([1.0, float("inf")])})
    assert guard.check({"loss/dm": 1.0}) and guard.consecutive == 0, "a finite step resets the count"
    assert not guard.check({"x": float("inf")}) and not guard.check({"x": float("inf")})
    with pytest.raises(TrainingDivergedError, match="3 steps in a row.*lower the learning rate"):
        guard.check({"x": float("nan")})
    assert guard.num_skipped == 5


class MLPJob:
    """A tiny trainer: per-step seeded batches, AdamW, guard inside the step as the docs prescribe."""

    def __init__(self, interrupt_at: int | None = None, nan_at: frozenset[int] = frozenset()):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.guard = NonFiniteGuard(max_consecutive=2)
        self.interrupt_at, self.nan_at = interrupt_at, nan_at
        self.samples: list[int] = []

    def step(self, step: int) -> dict[str, float]:
        if step == self.interrupt_at:
            raise KeyboardInterrupt
        x = torch.randn(16, 3, generator=step_generator(0, 0, step))
        loss = (self.model(x) - x.prod(1, keepdim=True)).pow(2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        if self.guard.check({"loss/mse": loss}, step):
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss/mse": loss.item()}

    def run(self, run_dir, max_steps=10, **kw):
        return train_loop(
            run_dir,
            max_steps=max_steps,
            step_fn=self.step,
            objects={"model": self.model, "opt": self.opt},
            checkpoint_every=4,
            keep=2,
            sample_every=3,
            sample_fn=self.samples.append,
            config_hash="abc",
            guard=self.guard,
            **kw,
        )


def test_loop_interrupt_and_resume_equals_straight_run(tmp_path):
    straight = MLPJob()
    result = straight.run(tmp_path / "a")
    assert (result.step, result.resumed_from, result.last_checkpoint.name) == (10, 0, "step_000010")
    assert straight.samples == [3, 6, 9, 10]

    first = MLPJob(interrupt_at=7)
    with pytest.raises(KeyboardInterrupt):
        first.run(tmp_path / "b")
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step_000004", "step_000006"], "Ctrl-C saves the finished steps"
    second = MLPJob()
    result = second.run(tmp_path / "b")
    assert (result.step, result.resumed_from) == (10, 6)
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    loss = lambda d: [(r["step"], r["loss/mse"]) for r in read_stats(d)]  # noqa: E731
    assert loss(tmp_path / "a") == loss(tmp_path / "b")
    assert "time/step_s" in read_stats(tmp_path / "a")[0]

    with pytest.raises(ckpt_mod.CheckpointError, match="another config"):
        train_loop(
            tmp_path / "b", max_steps=11, step_fn=second.step, objects={"model": second.model},
            checkpoint_every=4, config_hash="different",
        )  # fmt: skip


def test_loop_skips_nan_steps_and_stops_when_diverged(tmp_path):
    job = MLPJob(nan_at=frozenset({2}))
    job.run(tmp_path / "ok", max_steps=4)
    rows = read_stats(tmp_path / "ok")
    assert rows[1]["loss/mse"] is None and rows[1]["guard/skipped"] == 1 and rows[3]["guard/skipped"] == 1

    job = MLPJob(nan_at=frozenset({3, 4}))
    with pytest.raises(TrainingDivergedError):
        job.run(tmp_path / "bad", max_steps=6)


def test_loop_survives_a_failed_periodic_checkpoint(tmp_path, monkeypatch, caplog):
    real_write = ckpt_mod._write_safetensors

    def full_disk_at_step_4(tensors, path):
        if path.parent.name.startswith("step_000004"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(tensors, path)

    class OneProcessAccelerator:  # what train_loop uses of accelerate.Accelerator
        is_main_process, num_processes, device, trackers = True, 1, torch.device("cpu"), []
        barriers = 0

        def wait_for_everyone(self):
            self.barriers += 1

    monkeypatch.setattr(ckpt_mod, "_write_safetensors", full_disk_at_step_4)
    accelerator = OneProcessAccelerator()
    with caplog.at_level(logging.ERROR, logger="crossdistill.train.runner"):
        result = MLPJob().run(tmp_path, max_steps=9, accelerator=accelerator)
    assert "No space left on device" in caplog.text and "training continues" in caplog.text
    assert accelerator.barriers == 3, "the failed save at step 4 still reaches the barrier the other ranks wait at"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000008", "step_000009"]
    assert result.step == 9


def test_tracker_kwargs_turn_tensorboard_on_only_when_installed(tmp_path, monkeypatch, caplog):
    from crossdistill.train import stats as stats_mod

    assert stats_mod.tracker_kwargs(tmp_path, tensorboard=False) == {}
    monkeypatch.setattr(stats_mod.importlib.util, "find_spec", lambda name: object())
    on = stats_mod.tracker_kwargs(tmp_path, tensorboard=True)
    assert on == {"log_with": "tensorboard", "project_dir": str(tmp_path)}
    monkeypatch.setattr(stats_mod.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="crossdistill.train.stats"):
        assert stats_mod.tracker_kwargs(tmp_path, tensorboard=True) == {}
    assert "pip install tensorboard" in caplog.text
