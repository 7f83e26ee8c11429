"""``crossdistill bridge train|report``: stage-1 Bridge training and its diagnostics report."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch

from crossdistill.bridge.model import BRIDGE_KINDS
from crossdistill.config import add_config_args, config_from_args, dumps_config, load_config, prepare_run_dir
from crossdistill.errors import ConfigError

WEIGHTLESS_KINDS = ("decode_encode", "identity")


def configure(parser: argparse.ArgumentParser) -> None:
    from crossdistill.bridge.report import DEFAULT_TAUS
    from crossdistill.bridge.train import PRESETS

    sub = parser.add_subparsers(dest="bridge_command", metavar="{train,report}", required=True)
    train = sub.add_parser(
        "train",
        help="train a Bridge (Student latents → Teacher latents) on captioned images",
        description="Stage-1 Bridge training. Resumes from the newest checkpoint of --run-dir; the Bridge is saved "
        "to RUN_DIR/bridge. Multi-GPU: `accelerate launch -m crossdistill.cli bridge train ...`.",
    )
    train.add_argument("--run-dir", required=True, help="where config.json, checkpoints, stats.jsonl go")
    train.add_argument("--kind", choices=BRIDGE_KINDS, help="shortcut for --set bridge.kind=KIND")
    add_config_args(train, PRESETS)

    report = sub.add_parser(
        "report",
        help="compare Bridges on held-out images (latent MSE, PSNR, attention KL, x0 agreement, cost)",
        description="Diagnostics of one or several Bridges. The spaces and held-out data come from --preset/"
        "--config/--set, or else from the config.json of the first --bridge's run dir.",
    )
    report.add_argument(
        "--bridge", action="append", default=[], metavar="[NAME=]DIR", help="a saved Bridge (repeatable)"
    )
    report.add_argument("--kinds", nargs="*", default=[], choices=WEIGHTLESS_KINDS, help="add untrained kinds")
    report.add_argument("--out", required=True, help="folder for report.md/html, bridge_report.json, the grid")
    report.add_argument("--num-images", type=int, default=64, help="held-out images to measure on")
    report.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS), help="Teacher times τ")
    report.add_argument("--batch-size", type=int, default=16)
    report.add_argument("--seed", type=int, default=0, help="seeds the fixed fidelity noise")
    report.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_config_args(report, PRESETS)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.bridge_command == "train":
        return _train(args)
    return _report(args)


def _train(args: argparse.Namespace) -> int:
    from crossdistill.bridge.train import PRESETS, train

    if args.kind:
        args.overrides = [f"bridge.kind={args.kind}", *args.overrides]
    cfg = config_from_args(args, PRESETS)
    if args.print_config:
        print(dumps_config(cfg), end="")
        return 0
    run_dir = prepare_run_dir(args.run_dir, cfg)
    out = train(cfg, run_dir)
    print(f"Bridge ({cfg.bridge.kind}) saved to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from crossdistill.bridge.report import candidates_for, evaluate, write_report
    from crossdistill.bridge.train import PRESETS, BridgeTrainConfig, image_dataset, load_spaces

    named = []
    for spec in args.bridge:
        name, sep, path = spec.partition("=")
        path = Path(path if sep else name)
        named.append((name if sep else path.parent.name or path.name, path))
    if not named and not args.kinds:
        raise ConfigError("nothing to report: pass --bridge DIR (repeatable) and/or --kinds decode_encode identity")
    run_config = named[0][1].parent / "config.json" if named else None
    if not (args.preset or args.config or args.overrides) and run_config is not None and run_config.is_file():
        cfg = load_config(BridgeTrainConfig, run_config)
    else:
        cfg = config_from_args(args, PRESETS)
    if args.print_config:
        print(dumps_config(cfg), end="")
        return 0
    student, teacher, world = load_spaces(cfg.model, args.device)
    dataset = image_dataset(cfg.data, max(student.resolution, teacher.resolution), "held_out", world)
    candidates = candidates_for(named, args.kinds, student, teacher)
    results, grid = evaluate(
        candidates,
        student,
        teacher,
        dataset,
        num_images=args.num_images,
        taus=args.taus,
        batch_size=args.batch_size,
        layers=cfg.loss.layers,
        seed=args.seed,
    )
    command = "crossdistill " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    print(f"report written to {write_report(results, grid, args.out, command)}")
    return 0
