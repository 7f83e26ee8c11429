"""``crossdistill toy``: rebuild the emoji world's shipped models (``build``) or show what ships (``info``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from crossdistill.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="{build,info}", required=True)
    build = sub.add_parser("build", help="train every emoji-world model from scratch and write weights + manifest")
    build.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    build.add_argument("--out", default="runs/toy_world", help="folder for the weights, manifest and sample grid")
    build.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (0.01: smoke)")
    build.add_argument("--only", default=None, help="comma-separated stages (vae_teacher,vae_student,teacher,"
                       "student,judge,eval); the others are loaded from --out")  # fmt: skip
    build.add_argument("--num-emoji", type=int, default=None, help="a smaller world (smoke builds); default: all")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts to evaluate (default 512)")
    build.add_argument("--samples", default=None, help="eval stage: score these samples (from generate_samples, "
                       "e.g. made on a GPU) instead of generating them")  # fmt: skip
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    info = sub.add_parser("info", help="the shipped (or a built) world's files, recipe summary and metrics")
    info.add_argument("--weights", default=None, help="a folder written by `toy build` (default: the shipped one)")
    info.add_argument("--verify", action="store_true", help="also check every file's sha256")


def run(args: argparse.Namespace) -> int:
    return _build(args) if args.toy_command == "build" else _info(args)


def _build(args: argparse.Namespace) -> int:
    from crossdistill.toy.build import STAGES, Builder, ToyRecipe, scaled, total_weight_bytes

    stages = tuple(s.strip() for s in args.only.split(",") if s.strip()) if args.only else STAGES
    recipe = scaled(ToyRecipe(seed=args.seed, num_emoji=args.num_emoji), args.steps_scale)
    if args.eval_prompts is not None:
        if args.eval_prompts < 2:
            raise ConfigError("--eval-prompts must be at least 2 (a Fréchet distance needs two samples)")
        recipe.eval.num_prompts = args.eval_prompts
    print(f"toy build: stages {', '.join(stages)} on {args.device}, steps ×{args.steps_scale}, into {args.out}")
    start = time.perf_counter()
    manifest = Builder(recipe, args.out, args.device, not args.no_progress, args.samples).run(stages)
    size_mib = total_weight_bytes(manifest) / 2**20
    print(f"toy build: done in {time.perf_counter() - start:.0f} s; {size_mib:.1f} MiB of weights in {args.out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from crossdistill.toy import world as toy
    from crossdistill.toy.build import total_weight_bytes

    manifest = toy.verify_weights(args.weights) if args.verify else toy.read_manifest(args.weights)
    print(f"weights: {Path(args.weights or toy.WEIGHTS_DIR)} ({total_weight_bytes(manifest) / 2**20:.1f} MiB)"
          + (" — sha256 verified" if args.verify else ""))  # fmt: skip
    for name, entry in manifest["files"].items():
        stage = manifest.get("stages", {}).get(name, {})
        print(f"  {name:12s} {entry['file']:26s} {entry['num_params'] / 1e6:6.2f} M params  "
              f"{stage.get('wall_s', float('nan')):7.1f} s on {stage.get('device', '?')}")  # fmt: skip
    if "metrics" in manifest:
        from crossdistill.toy.evaluation import metrics_table

        print(f"\nheld-out metrics ({manifest['metrics']['num_prompts']} prompts):\n")
        print(metrics_table(manifest["metrics"]))
    return 0
