"""The distillation trainer under ``accelerate launch``: the script test_distributed_distill.py launches.

    accelerate launch --multi_gpu --num_processes 2 distributed_distill.py CONFIG RUN_DIR
    accelerate launch --config_file configs/accelerate_fsdp2.yaml distributed_distill.py CONFIG RUN_DIR [--cpu-fsdp]
    accelerate launch --multi_gpu --num_processes 2 distributed_distill.py CONFIG RUN_DIR --ddp-runs A.json B.json

It trains (or resumes) ``RUN_DIR`` with the config file and writes ``RUN_DIR/rank_N.json``: the distributed type the
run saw, the world size and the parameter types of the sharded modules.

``--cpu-fsdp``: accelerate sets up FSDP only on accelerators, so on CPU processes (gloo) this switches the run's
accelerate state to FSDP2, with the plugin the launch configured, before the trainer prepares its models.
Everything after that is accelerate's own FSDP2 preparation (``fully_shard`` per block) and torch's DTensors, on CPU.
On GPUs, leave it out.

``--eager-compile``: ``train.compile`` traces with dynamo's eager backend (graph capture and DDP's graph split, no
C++ build on CPU runners), and each ``--ddp-runs`` entry records the ``torch._dynamo.config.optimize_ddp`` its graphs
were captured under (what ``train.ddp_split_graphs`` sets).

``--ddp-runs A.json B.json ...`` (DDP only, last): before the main run, train these configs too, in the same
processes, each in the folder beside its file (``A/``), step by step without the loop (whose ``end_training`` would
end the process group), and add to ``rank_N.json`` under ``ddp_runs``, by file stem, each one's logs per step and what
torch's DDP wrappers were built with. Runs that differ in ``train.ddp_*`` only are compared without launches of their
own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from crossdistill.config import load_config
from crossdistill.train import distill
from crossdistill.train.distill import DistillConfig, DistillTrainer, make_accelerator
from crossdistill.train.perf import compile_blocks

CAPTURED: list = []  # --eager-compile: torch._dynamo.config.optimize_ddp at each graph capture of the current run


def eager_compile() -> None:
    def backend(gm, example_inputs):
        CAPTURED.append(torch._dynamo.config.optimize_ddp)
        return gm.forward

    distill.compile_blocks = lambda module, **kw: compile_blocks(module, backend=backend, **kw)


def cpu_fsdp2_state() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # configured by accelerate launch (FSDP_* variables)
    if state.fsdp_plugin.fsdp_version != 2:
        raise SystemExit("--cpu-fsdp: launch with an FSDP2 config (configs/accelerate_fsdp2.yaml)")
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # each AcceleratorState() copies it back


def sharded_fraction(module) -> float:
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    return sum(isinstance(p, DTensor) for p in params) / len(params)


def ddp_options(module) -> dict | None:
    """What a DDP wrapper was built with (torch's own record of it), or None for a module DDP does not wrap."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(module, DistributedDataParallel):
        return None
    data = module._get_ddp_logging_data()
    return {
        "comm_hook": data.get("comm_hook"),
        "bucket_cap_bytes": data["bucket_cap_bytes"],
        "static_graph": module.static_graph,
        "gradient_as_bucket_view": module.gradient_as_bucket_view,
        "broadcast_buffers": module.broadcast_buffers,
    }


def step_through(config: Path) -> dict:
    """Train ``config`` in ``<config without .json>/`` step by step: its logs per step and its DDP wrappers."""
    cfg = load_config(DistillConfig, config)
    run_dir = config.with_suffix("")
    torch._dynamo.reset()  # each run captures its own graphs (an earlier run's would be reused)
    CAPTURED.clear()
    trainer = DistillTrainer(cfg, run_dir, accelerator=make_accelerator(cfg, run_dir))
    logs = []
    for step in range(1, cfg.train.max_steps + 1):
        trainer.step = step
        logs.append(trainer.train_step(step))
    modules = {"generator": trainer.generator, "critic": trainer.fake, "bridge": trainer.bridge}
    return {"logs": logs, "ddp": {role: ddp_options(m) for role, m in modules.items()},
            "captured_under": sorted({str(v) for v in CAPTURED}), "graphs": len(CAPTURED)}  # fmt: skip


def main(argv: list[str]) -> int:
    config, run_dir = Path(argv[0]), Path(argv[1])
    cfg = load_config(DistillConfig, config)
    accelerator = make_accelerator(cfg, run_dir)
    if "--cpu-fsdp" in argv:
        cpu_fsdp2_state()
    if "--eager-compile" in argv:
        eager_compile()
    runs = argv[argv.index("--ddp-runs") + 1 :] if "--ddp-runs" in argv else []
    ddp_runs = {Path(path).stem: step_through(Path(path)) for path in runs}
    trainer = DistillTrainer(cfg, run_dir, accelerator=accelerator)
    info = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "sharded": trainer.sharded,
        # parameters held as DTensor shards, per role, once prepared (a frozen root's own few stay gathered after
        # a forward: FSDP2 reshards a root's parameters in backward only)
        "dtensor_params": {
            role: sharded_fraction(m)
            for role, m in (("generator", trainer.generator), ("critic", trainer.fake), ("real", trainer.real))
        },
    }
    if ddp_runs:
        info["ddp_runs"] = ddp_runs
    trainer.train()
    (run_dir / f"rank_{accelerator.process_index}.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
