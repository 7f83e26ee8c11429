"""The distillation trainer on two processes through ``accelerate launch``: DDP, and FSDP2 sharding every model.

Two gloo processes on CPU. accelerate sets up FSDP only on accelerators, so the FSDP launches switch its state to
FSDP2 first (distributed_distill.py --cpu-fsdp); the sharding itself is accelerate's FSDP2 preparation and torch's
DTensors. Under both, the cross-space run with a LoRA fake score, GAN and EMA must follow the same trajectory: the
same per-process batches, and gradients averaged over the processes either way.

The DDP options (``train.ddp_*``) ride along in that DDP launch (``--ddp-runs``: no launch of their own, ~2 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
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


def launch(config: Path, run_dir: Path, *, fsdp: bool, ddp_runs: Sequence[Path] = (), gpu: bool = False,
           eager_compile: bool = False) -> dict:  # fmt: skip
    """DDP through --multi_gpu; FSDP2 through the shipped accelerate config (fp32 here, to compare the runs).
    ``ddp_runs``: more DDP configs trained in the same launch (distributed_distill.py --ddp-runs);
    ``eager_compile``: train.compile with dynamo's eager backend (distributed_distill.py --eager-compile)."""
    mode = ["--config_file", str(FSDP2_CONFIG)] if fsdp else ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(HERE / "distributed_distill.py"), str(config), str(run_dir)]  # fmt: skip
    cmd += ["--cpu-fsdp"] if fsdp else []
    cmd += ["--eager-compile"] if eager_compile else []
    cmd += ["--ddp-runs", *map(str, ddp_runs)] if ddp_runs else []
    env = {**os.environ, "CROSSDISTILL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env |= {} if gpu else {"CUDA_VISIBLE_DEVICES": ""}
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


def write_config(folder: Path, fake_score: str, ema: float, *extra: str) -> Path:
    reals = "data.real_images=emoji:train"
    cfg = tiny_config(folder, "train.cpu=true", f"model.fake_score={fake_score}", "model.lora_rank=4",
                      "train.gan_weight=0.1", reals, "data.max_real_images=8", f"train.ema_decay={ema}", *extra,
                      cross=True)  # fmt: skip
    config = folder / "distill.json"
    save_config(cfg, config)
    return config


# The DDP options: every DDP module of a run (generator, critic, co-trained Bridge; the real score through the LoRA
# critic's module), with gradient checkpointing as the real presets have it. No GAN: static_graph refuses it.
DDP_BASE = ("model.fake_score=lora", "model.lora_rank=4", "train.gradient_checkpointing=true")
DDP_COTRAIN = ("train.cotrain_bridge=true", "data.real_images=emoji:train", "data.max_real_images=8")
DDP_EXACT = ("train.ddp_bucket_mb=1", "train.ddp_static_graph=true", "train.ddp_grad_as_bucket_view=true",
             "train.ddp_broadcast_buffers=false")  # fmt: skip
DDP_DEFAULTS = {"comm_hook": None, "bucket_cap_bytes": 25 * 2**20, "static_graph": False,
                "gradient_as_bucket_view": False, "broadcast_buffers": True}  # fmt: skip
DDP_EXACT_BUILT = {"comm_hook": None, "bucket_cap_bytes": 2**20, "static_graph": True, "gradient_as_bucket_view": True,
                   "broadcast_buffers": False}  # fmt: skip


def write_ddp_configs(folder: Path, hook: str, *base: str) -> list[Path]:
    """plain DDP; ``exact``: the options that must not change a bit; ``hooked``: those and the compression hook."""
    runs = {"plain": (), "exact": DDP_EXACT, "hooked": (*DDP_EXACT, f"train.ddp_comm_hook={hook}")}
    paths = []
    for name, options in runs.items():
        paths.append(folder / f"{name}.json")
        save_config(tiny_config(folder, *DDP_BASE, *base, *options, cross=True), paths[-1])
    return paths


def check_ddp_runs(run_dir: Path, hook: str, rel: float, *, bitwise: bool = True) -> dict[str, dict[str, float]]:
    """Both ranks' runs: the options reached torch's DDP; ``exact`` is plain DDP bit for bit (``bitwise``, on CPU;
    else within ``rel``); ``hooked`` is plain DDP within ``rel``. Returns the largest relative difference to plain DDP
    of each logged value, for ``exact`` and ``hooked``."""
    worst: dict[str, dict[str, float]] = {"exact": {}, "hooked": {}}
    for rank in (0, 1):
        runs = json.loads((run_dir / f"rank_{rank}.json").read_text())["ddp_runs"]
        roles = [role for role, options in runs["plain"]["ddp"].items() if options is not None]
        assert {"generator", "critic"} <= set(roles), roles
        for role in roles:
            assert runs["plain"]["ddp"][role] == DDP_DEFAULTS, role
            assert runs["exact"]["ddp"][role] == DDP_EXACT_BUILT, role
            assert runs["hooked"]["ddp"][role] == DDP_EXACT_BUILT | {"comm_hook": f"{hook}_compress_hook"}, role
        plain = runs["plain"]["logs"]
        assert len(plain) == 4 and all(all(np.isfinite(v) for v in step.values()) for step in plain)
        if bitwise:  # two processes sum two numbers per gradient element, whatever the buckets or graph: same bits
            assert runs["exact"]["logs"] == plain
        assert runs["hooked"]["logs"] != plain  # the hook rounded something
        for name in ("exact", "hooked"):
            for step, (got, want) in enumerate(zip(runs[name]["logs"], plain, strict=True), 1):
                assert got.keys() == want.keys()
                for k in want:
                    diff = abs(got[k] - want[k]) / abs(want[k])
                    worst[name][k] = max(worst[name].get(k, 0.0), diff)
                    assert got[k] == pytest.approx(want[k], rel=rel), (name, rank, step, k, got[k], want[k])
    return worst


@pytest.fixture(scope="module")
def lora_ddp_run(tmp_path_factory):
    """The DDP launch of the LoRA comparison below, with the DDP-option runs trained in it before the main run."""
    folder = tmp_path_factory.mktemp("lora_ddp")
    config = write_config(folder, "lora", 0.9)
    ddp_runs = write_ddp_configs(folder, "fp16", "train.cpu=true", *DDP_COTRAIN)
    ddp_runs.append(folder / "accum.json")  # gradient accumulation, with the GAN's own no_sync pass inside
    save_config(tiny_config(folder, *DDP_BASE, "train.cpu=true", *DDP_COTRAIN, "train.gan_weight=0.1",
                            "train.gradient_accumulation_steps=2", cross=True), ddp_runs[-1])  # fmt: skip
    for name, split in (("compiled", "true"), ("compiled_whole", "false")):  # plain's config, compiled
        ddp_runs.append(folder / f"{name}.json")
        save_config(tiny_config(folder, *DDP_BASE, "train.cpu=true", *DDP_COTRAIN, "train.compile=true",
                                f"train.ddp_split_graphs={split}", cross=True), ddp_runs[-1])  # fmt: skip
    info = launch(config, folder / "ddp", fsdp=False, ddp_runs=ddp_runs, eager_compile=True)
    return config, folder / "ddp", info


# LoRA fake score with EMA (samples from the EMA on the main process); a full copy without EMA (samples from the
# sharded generator, run on every process).
@pytest.mark.parametrize(("fake_score", "ema"), [("lora", 0.9), pytest.param("copy", 0.0, marks=pytest.mark.slow)])
def test_fsdp_follows_ddp_and_resumes_exactly(tmp_path, request, fake_score, ema):
    if fake_score == "lora":  # shared with the DDP options' test
        config, ddp_dir, ddp = request.getfixturevalue("lora_ddp_run")
    else:
        config, ddp_dir = write_config(tmp_path, fake_score, ema), tmp_path / "ddp"
        ddp = launch(config, ddp_dir, fsdp=False)
    fsdp = launch(config, tmp_path / "fsdp", fsdp=True)
    assert ddp["num_processes"] == fsdp["num_processes"] == 2
    assert not ddp["sharded"] and ddp["dtensor_params"] == {"generator": 0, "critic": 0, "real": 0}
    # every model sharded: the generator, the critic (fake score + GAN head) and the real score (the Teacher)
    assert fsdp["sharded"] and fsdp["dtensor_params"] == {"generator": 1, "critic": 1, "real": 1}
    assert_close(losses(ddp_dir), losses(tmp_path / "fsdp"))

    # The same sample grid, and the FSDP checkpoint holds whole tensors under the names a one-process checkpoint has
    # (export reads either).
    grids = [np.asarray(Image.open(run / "samples" / "step_000004.png"), dtype=np.int16)
             for run in (ddp_dir, tmp_path / "fsdp")]  # fmt: skip
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 2
    for name in ("generator", "fake_score", "gan_head") + (("ema",) if ema else ()):
        a = read_state(ddp_dir / "checkpoints" / "step_000004", name)
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


# Compression rounds each all-reduced gradient element to fp16 (11 significant bits) or bf16 (8), and Adam's update
# divides most of that back out. Measured on these 4 steps (largest relative difference to plain DDP, both ranks):
# fp16 on gloo (CPU) 8.9e-5 in grad_norm/critic, 2.3e-5 in the losses; bf16 (gloo, with torch's CUDA-only check of
# the hook bypassed for the measurement) 6.3e-4 in grad_norm/critic, 2.0e-5 in the losses. 5e-3 leaves 8x over bf16
# and still catches a hook that does not average (2x) or gradients left unsynchronised (tens of %).
COMPRESSED_REL = 5e-3


def test_ddp_options_reach_torch_and_keep_the_trajectory(lora_ddp_run):
    """bucket size, static graph and gradients as bucket views: bit for bit plain DDP. With the fp16 hook too: plain
    DDP within the rounding of the compression. (bf16: torch's DDP takes that hook in CUDA builds only, see
    distill.bf16_comm_hook_supported; test_bf16_comm_hook_on_two_gpus runs it.)"""
    _, ddp_dir, _ = lora_ddp_run
    check_ddp_runs(ddp_dir, "fp16", COMPRESSED_REL)


def test_gradient_accumulation_under_ddp_keeps_the_ranks_in_step(lora_ddp_run):
    """Two micro-batches per update, the first in no_sync: the last backward's all-reduce still gives both ranks the
    same averaged gradients (equal norms, bit for bit), while each rank trained on its own micro-batches."""
    _, ddp_dir, _ = lora_ddp_run
    ranks = [json.loads((ddp_dir / f"rank_{r}.json").read_text())["ddp_runs"]["accum"]["logs"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    for step, (a, b) in enumerate(zip(*ranks), 1):
        norms = [k for k in a if k.startswith("grad_norm/")]
        assert "grad_norm/critic" in norms and all(a[k] == b[k] for k in norms), (step, a, b)
        assert a["loss/fake"] != b["loss/fake"]
    assert sum("grad_norm/generator" in logs for logs in ranks[0]) == 2 and "loss/gan_g" in ranks[0][0]


def test_compiled_ddp_trains_as_eager_ddp_with_its_graphs_split_or_whole(lora_ddp_run):
    """train.compile under DDP (dynamo's eager backend: the same kernels as eager): plain DDP's losses and gradient
    norms bit for bit, with dynamo's DDP graph split on (torch's default, train.ddp_split_graphs=true) or off (our
    default), and every graph captured under the setting the run asked for. (The tiny models' blocks are far smaller
    than DDP's smallest bucket, so nothing is split here; bench/ddp_graph_split.py counts real backbones' graphs.)"""
    _, ddp_dir, _ = lora_ddp_run
    for rank in (0, 1):
        runs = json.loads((ddp_dir / f"rank_{rank}.json").read_text())["ddp_runs"]
        assert runs["plain"]["graphs"] == 0 and runs["plain"]["captured_under"] == []
        for name, under in (("compiled", "True"), ("compiled_whole", "False")):
            assert runs[name]["graphs"] > 0 and runs[name]["captured_under"] == [under], (name, runs[name])
            assert runs[name]["logs"] == runs["plain"]["logs"], name


def test_fsdp_accumulates_gradients_as_ddp(tmp_path):
    """train.gradient_accumulation_steps=2 under FSDP2 (every micro-batch's backward reduce-scatters into the sharded
    gradients) follows DDP (the first micro-batch in no_sync), with the GAN and EMA on."""
    config = write_config(tmp_path, "lora", 0.9, "train.gradient_accumulation_steps=2")
    launch(config, tmp_path / "ddp", fsdp=False)
    launch(config, tmp_path / "fsdp", fsdp=True)
    assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "fsdp"))
    assert len(losses(tmp_path / "ddp")) == 4


@pytest.mark.multi_gpu
def test_bf16_comm_hook_on_two_gpus(tmp_path):
    """The bf16 hook where torch takes it: NCCL on two GPUs (the same runs as above, plain DDP as the main run). GPU
    kernels need not be bitwise reproducible, so ``exact`` is held to the tolerance too."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    ddp_runs = write_ddp_configs(tmp_path, "bf16")
    info = launch(ddp_runs[0], tmp_path / "main", fsdp=False, ddp_runs=ddp_runs, gpu=True)
    assert info["distributed_type"] == "DistributedType.MULTI_GPU"
    worst = check_ddp_runs(tmp_path / "main", "bf16", COMPRESSED_REL, bitwise=False)
    print("largest relative difference to plain DDP:", json.dumps(worst))


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
