"""``crossdistill distill``: one-step Student by cross-space (or shared-space) DMD2, from a preset plus overrides.

    crossdistill distill --preset emoji --run-dir runs/emoji --set model.bridge_path=runs/bridge/bridge
    accelerate launch -m crossdistill.cli distill --preset sd15_from_sd35_medium --run-dir runs/sd35m \\
        --set data.prompts=prompts.txt --set model.bridge_path=runs/bridge_sd35m/bridge

Re-running the same command resumes from the run dir's latest checkpoint.
"""

from __future__ import annotations

import argparse

from crossdistill.config import add_config_args, config_from_args, dumps_config
from crossdistill.errors import ConfigError
from crossdistill.train.distill import DistillTrainer, check_config, make_accelerator
from crossdistill.train.presets import PRESETS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="run folder: config.json, checkpoints/, samples/, stats (required to train)")
    add_config_args(parser, PRESETS)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, PRESETS)
    if args.print_config:
        print(dumps_config(cfg), end="")
        return 0
    if not args.run_dir:
        raise ConfigError("pass --run-dir DIR (a new folder, or an existing run to resume)")
    check_config(cfg)
    accelerator = make_accelerator(cfg, args.run_dir)
    step = DistillTrainer(cfg, args.run_dir, accelerator).train()
    if accelerator.is_main_process:
        print(f"distilled {step} steps into {args.run_dir}; export with: crossdistill export --run-dir {args.run_dir}")
    return 0
