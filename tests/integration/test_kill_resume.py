"""kill -9 mid-run, relaunch: the resumed run ends bitwise equal to an uninterrupted one, with one curve.

This file is also the training script the test launches (``python test_kill_resume.py RUN_DIR [SLEEP_S]``): a tiny
MLP trained through ``crossdistill.train.runner.train_loop`` with per-step seeding, as the real trainers do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MAX_STEPS = 40
CHECKPOINT_EVERY = 10


def main(run_dir: str, sleep_s: float) -> None:
    import torch
    from safetensors.torch import save_file

    from crossdistill.train.guard import NonFiniteGuard
    from crossdistill.train.runner import train_loop
    from crossdistill.train.seeding import seed_everything, step_generator

    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=MAX_STEPS)
    guard = NonFiniteGuard()

    def step(step: int) -> dict[str, float]:
        x = torch.randn(32, 4, generator=step_generator(0, 0, step))
        loss = (model(x) - torch.sin(x).sum(1, keepdim=True)).pow(2).mean()  # dropout: global RNG, restored too
        if guard.check({"loss/mse": loss}, step):
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        time.sleep(sleep_s)  # leaves time to kill the process between checkpoints
        return {"loss/mse": loss.item(), "lr": sched.get_last_lr()[0]}

    objects = {"model": model, "opt": opt, "sched": sched}
    train_loop(run_dir, max_steps=MAX_STEPS, step_fn=step, objects=objects, checkpoint_every=CHECKPOINT_EVERY, keep=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(run_dir, "final.safetensors"))


def _launch(run_dir: Path, sleep_s: float) -> subprocess.Popen:
    env = {**os.environ, "CROSSDISTILL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, str(run_dir), str(sleep_s)], env=env, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    import torch
    from safetensors.torch import load_file

    from crossdistill.train.stats import read_stats

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _launch(killed, 0.05)
    first = killed / "checkpoints" / f"step_{CHECKPOINT_EVERY:06d}" / "COMPLETE"
    deadline = time.monotonic() + 90
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final.safetensors").exists(), "the kill must land mid-run"
    steps_before = [r["step"] for r in read_stats(killed)]
    assert steps_before and max(steps_before) < MAX_STEPS

    _finish(_launch(killed, 0.0))
    # The uninterrupted reference runs in this process (a third launch would double the test's time), on one
    # thread like the launched runs, so that float reductions happen in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(str(straight), 0.0)
    finally:
        torch.set_num_threads(threads)

    a, b = load_file(str(straight / "final.safetensors")), load_file(str(killed / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = lambda d: [(r["step"], r["loss/mse"], r["lr"]) for r in read_stats(d)]  # noqa: E731
    assert [s for s, _, _ in curve(killed)] == list(range(1, MAX_STEPS + 1)), "each step logged exactly once"
    assert curve(killed) == curve(straight)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000030", "step_000040"]


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
