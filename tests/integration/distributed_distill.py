"""The distillation trainer under ``accelerate launch``: the script test_distributed_distill.py launches.

    accelerate launch --multi_gpu --num_processes 2 distributed_distill.py CONFIG RUN_DIR
    accelerate launch --config_file configs/accelerate_fsdp2.yaml distributed_distill.py CONFIG RUN_DIR [--cpu-fsdp]

It trains (or resumes) ``RUN_DIR`` with the config file and writes ``RUN_DIR/rank_N.json``: the distributed type the
run saw, the world size and the parameter types of the sharded modules.

``--cpu-fsdp``: accelerate sets up FSDP only on accelerators, so on CPU processes (gloo) this switches the run's
accelerate state to FSDP2, with the plugin the launch configured, before the trainer prepares its models.
Everything after that is accelerate's own FSDP2 preparation (``fully_shard`` per block) and torch's DTensors, on CPU.
On GPUs, leave it out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from crossdistill.config import load_config
from crossdistill.train.distill import DistillConfig, DistillTrainer, make_accelerator


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


def main(argv: list[str]) -> int:
    config, run_dir = Path(argv[0]), Path(argv[1])
    cfg = load_config(DistillConfig, config)
    accelerator = make_accelerator(cfg, run_dir)
    if "--cpu-fsdp" in argv:
        cpu_fsdp2_state()
    trainer = DistillTrainer(cfg, run_dir, accelerator=accelerator)
    info = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "sharded": trainer.sharded,
        # parameters held as DTensor shards, per role, once prepared (a frozen root's own few stay gathered after
        # a forward: FSDP2 reshards a root's parameters in backward only)
        "dtensor_params": {role: sharded_fraction(m) for role, m in
                           (("generator", trainer.generator), ("critic", trainer.fake), ("real", trainer.real))},
    }
    trainer.train()
    (run_dir / f"rank_{accelerator.process_index}.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
