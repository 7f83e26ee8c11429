"""Checkpoints: exact resume of model + AdamW + scheduler + RNG, atomicity under crashes and full disks, pruning."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch

from crossdistill.train import checkpoint as ckpt_mod
from crossdistill.train.checkpoint import CheckpointError, CheckpointManager, flatten_state, unflatten_state
from crossdistill.train.seeding import step_generator


def make_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train(model, opt, sched, steps: range):
    for step in steps:
        gen = step_generator(0, 0, step)
        x = torch.randn(8, 4, generator=gen)
        y = x.sum(1, keepdim=True)
        # Dropout draws from the global torch RNG, so this also checks the RNG is restored.
        loss = (model(x) - y).pow(2).mean() + 1e-3 * random.random() + 1e-3 * float(np.random.rand())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_exact_resume_model_adamw_scheduler_rng(tmp_path):
    model, opt, sched = make_state()
    train(model, opt, sched, range(1, 11))
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = make_state()
    train(model, opt, sched, range(1, 6))
    CheckpointManager(tmp_path).save(5, {"model": model, "opt": opt, "sched": sched}, {"loss_history": [1.0, 0.5]})
    # Scramble the global RNGs: a resumed process starts from different ones.
    torch.manual_seed(123), random.seed(123), np.random.seed(123)

    model2, opt2, sched2 = make_state(seed=99)  # "new process": other init, fresh optimizer
    manager = CheckpointManager(tmp_path)
    meta = manager.load(manager.latest(), {"model": model2, "opt": opt2, "sched": sched2})
    assert meta == {"loss_history": [1.0, 0.5], "step": 5}
    train(model2, opt2, sched2, range(6, 11))
    for a, b in zip(straight, model2.parameters()):
        assert torch.equal(a, b), "resumed training must match the uninterrupted run bitwise"


def test_flatten_round_trip_of_optimizer_state():
    model, opt, sched = make_state()
    train(model, opt, sched, range(1, 3))
    state = opt.state_dict()
    tensors, structure = flatten_state(state)
    back = unflatten_state(tensors, json.loads(json.dumps(structure)))
    assert set(back["state"]) == {0, 1, 2, 3}, "int keys survive JSON"
    assert back["param_groups"][0]["betas"] == (0.9, 0.999), "tuples survive JSON"
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store"):
        flatten_state({"fn": print})


def test_tied_weights_are_saved(tmp_path):
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied: safetensors refuses shared storage unless cloned
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {"model": model})
    other = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 3), "head": torch.nn.Linear(3, 5, bias=False)})
    manager.load(path, {"model": other})
    assert torch.equal(other["head"].weight, emb.weight)


def test_keep_n_pruning_and_plain_tensor_dicts(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        manager.save(step, {"ema": {"w": torch.full((2,), float(step))}})
    assert [p.name for p in manager.list()] == ["step_000030", "step_000040"]
    ema: dict = {}
    assert manager.load(manager.latest(), {"ema": ema})["step"] == 40
    assert torch.equal(ema["w"], torch.full((2,), 40.0))
    with pytest.raises(CheckpointError, match="not ghost"):
        manager.load(manager.latest(), {"ghost": {}})


def test_crash_mid_save_is_never_loaded(tmp_path):
    manager = CheckpointManager(tmp_path)
    model = torch.nn.Linear(2, 2)
    manager.save(5, {"model": model})
    # A process killed mid-save leaves a tmp dir (and maybe a dir without COMPLETE): neither is a checkpoint.
    torn = tmp_path / "checkpoints" / "step_000010.tmp"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half a file")
    (torn / "COMPLETE").write_text("{}")
    no_marker = tmp_path / "checkpoints" / "step_000011"
    no_marker.mkdir()
    assert manager.latest().name == "step_000005"
    assert not torn.exists(), "stale tmp dirs are removed"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.load(no_marker, {"model": model})
    with pytest.raises(CheckpointError, match="not a checkpoint dir"):
        manager.load(torn, {"model": model})


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager.save(5, {"model": model, "opt": opt})
    saved = model.weight.detach().clone()

    real_write = ckpt_mod._write_safetensors
    calls = []

    def write_then_fill_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the first file is written, the second hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(tensors, path)

    monkeypatch.setattr(ckpt_mod, "_write_safetensors", write_then_fill_disk)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint step_000005 is intact"):
        manager.save(6, {"model": model, "opt": opt})
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"], "partial dir removed"
    fresh = torch.nn.Linear(2, 2)
    assert manager.load(manager.latest(), {"model": fresh}, rng=False)["step"] == 5
    assert torch.equal(fresh.weight, saved)


def test_resave_same_step_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    model = torch.nn.Linear(2, 2)
    manager.save(3, {"model": model})
    with torch.no_grad():
        model.weight.zero_()
    manager.save(3, {"model": model})
    fresh = torch.nn.Linear(2, 2)
    manager.load(manager.latest(), {"model": fresh})
    assert torch.equal(fresh.weight, torch.zeros(2, 2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]


def test_read_only_manager_does_not_write(tmp_path):
    with pytest.raises(RuntimeError, match="only the main process"):
        CheckpointManager(tmp_path, main_process=False).save(1, {})
    with pytest.raises(ValueError, match="must match"):
        CheckpointManager(tmp_path).save(1, {"rng": {}})
