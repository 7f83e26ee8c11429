"""The distillation trainer on two processes through ``accelerate launch``: DDP, and FSDP2 sharding every model.

Two gloo processes on CPU. accelerate sets up FSDP only on accelerators, so the FSDP launches switch its state to
FSDP2 first (distributed_distill.py --cpu-fsdp); the sharding itself is accelerate's FSDP2 preparation and torch's
DTensors. Under both, the cross-space run with a LoRA fake score, GAN and EMA must follow the same trajectory: the
same per-process batches, and gradients averaged over the processes either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from distill_common import tiny_config
from PIL import Image

from crossdistill.bridge.train import refuse_fsdp
from crossdistill.config import save_config
from crossdistill.errors import ConfigError
from crossdistill.train.checkpoint import read_state
from crossdistill.train.distill import DistillTrainer
from crossdistill.train.sharded import is_fsdp
from crossdistill.train.stats import read_stats

HERE = Path(__file__).parent
FSDP2_CONFIG = HERE.parents[1] / "configs" / "accelerate_fsdp2.yaml"


def launch(config: Path, run_dir: Path, *, fsdp: bool) -> dict:
    """DDP through --multi_gpu; FSDP2 through the shipped accelerate config (fp32 here, to compare the runs)."""
    mode = ["--config_file", str(FSDP2_CONFIG)] if fsdp else ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(HERE / "distributed_distill.py"), str(config), str(run_dir)]  # fmt: skip
    cmd += ["--cpu-fsdp"] if fsdp else []
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CROSSDISTILL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((run_dir / "rank_0.json").read_text())


def losses(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith(("loss/", "grad_norm/"))} for r in read_stats(run_dir)]


def assert_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and all(x.keys() == y.keys() for x, y in zip(a, b))
    for step, (x, y) in enumerate(zip(a, b), 1):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-7), (step, k, x[k], y[k])


# LoRA fake score with EMA (samples from the EMA on the main process); a full copy without EMA (samples from the
# sharded generator, run on every process).
@pytest.mark.parametrize(("fake_score", "ema"), [("lora", 0.9), pytest.param("copy", 0.0, marks=pytest.mark.slow)])
def test_fsdp_follows_ddp_and_resumes_exactly(tmp_path, fake_score, ema):
    reals = "data.real_images=emoji:train"
    cfg = tiny_config(tmp_path, "train.cpu=true", f"model.fake_score={fake_score}", "model.lora_rank=4",
                      "train.gan_weight=0.1", reals, "data.max_real_images=8", f"train.ema_decay={ema}",
                      cross=True)  # fmt: skip
    config = tmp_path / "distill.json"
    save_config(cfg, config)

    ddp = launch(config, tmp_path / "ddp", fsdp=False)
    fsdp = launch(config, tmp_path / "fsdp", fsdp=True)
    assert ddp["num_processes"] == fsdp["num_processes"] == 2
    assert not ddp["sharded"] and ddp["dtensor_params"] == {"generator": 0, "critic": 0, "real": 0}
    # every model sharded: the generator, the critic (fake score + GAN head) and the real score (the Teacher)
    assert fsdp["sharded"] and fsdp["dtensor_params"] == {"generator": 1, "critic": 1, "real": 1}
    assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "fsdp"))

    # The same sample grid, and the FSDP checkpoint holds whole tensors under the names a one-process checkpoint has
    # (export reads either).
    grids = [np.asarray(Image.open(tmp_path / run / "samples" / "step_000004.png"), dtype=np.int16)
             for run in ("ddp", "fsdp")]  # fmt: skip
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 2
    for name in ("generator", "fake_score", "gan_head") + (("ema",) if ema else ()):
        a = read_state(tmp_path / "ddp" / "checkpoints" / "step_000004", name)
        b = read_state(tmp_path / "fsdp" / "checkpoints" / "step_000004", name)
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    if fake_score != "lora":
        return
    # Resume under FSDP from step 2 (the step-4 checkpoint gone): the same losses, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    step2 = resumed / "checkpoints" / "step_000002" / "COMPLETE"
    written = step2.stat().st_mtime_ns
    launch(config, resumed, fsdp=True)
    assert step2.stat().st_mtime_ns == written  # resumed from it, not rerun from the start
    assert losses(resumed) == losses(tmp_path / "fsdp")


def test_fsdp1_and_the_bridge_under_fsdp_are_refused_with_the_fix(tmp_path):
    from accelerate.utils import DistributedType

    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        is_fsdp(fsdp1)
    assert is_fsdp(fsdp2)
    assert not is_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False))
    cfg = tiny_config(tmp_path, "train.cotrain_bridge=true", "data.real_images=emoji:train", cross=True)
    with pytest.raises(ConfigError, match="cotrain_bridge is not supported under FSDP"):
        DistillTrainer(cfg, tmp_path / "run", accelerator=fsdp2)
    with pytest.raises(ConfigError, match="runs under DDP, not FSDP"):  # the Bridge's own training
        refuse_fsdp(fsdp2)
    refuse_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
