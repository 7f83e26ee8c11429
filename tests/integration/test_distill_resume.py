"""Kill ``crossdistill distill`` with SIGKILL after its first checkpoint, rerun it, and get the losses of an
uninterrupted run: resumable state + per-step seeding make the trajectory independent of restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from distill_common import tiny_config

from crossdistill.config import save_config
from crossdistill.train.distill import DistillTrainer
from crossdistill.train.stats import read_stats


def _command(config, run_dir):
    return [sys.executable, "-m", "crossdistill.cli", "distill", "--config", str(config), "--run-dir", str(run_dir)]


@pytest.mark.parametrize("cross", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["shared", "cross"])
def test_killed_run_resumes_onto_the_uninterrupted_trajectory(tmp_path, cross):
    cfg = tiny_config(tmp_path, "train.max_steps=6", cross=cross)
    config = tmp_path / "distill.json"
    save_config(cfg, config)
    run = tmp_path / "killed"
    env = {**os.environ, "CROSSDISTILL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(_command(config, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = run / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timed out"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before_kill = len(read_stats(run))
    assert done_before_kill < 6

    resumed = subprocess.run(_command(config, run), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' arithmetic, so losses can be compared bit for bit
    try:
        DistillTrainer(cfg, tmp_path / "straight").train()
    finally:
        torch.set_num_threads(threads)
    straight, killed = read_stats(tmp_path / "straight"), read_stats(run)
    assert [r["step"] for r in killed] == list(range(1, 7))
    for a, b in zip(straight, killed):
        assert {k: v for k, v in a.items() if k.startswith("loss/")} == {
            k: v for k, v in b.items() if k.startswith("loss/")
        }, a["step"]
