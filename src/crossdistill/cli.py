"""The ``crossdistill`` command line: one subcommand per job, each living beside the code it drives.

Each entry of :data:`COMMANDS` names a module that defines ``configure(parser)`` and ``run(args) -> int``.
Only the chosen subcommand's module is imported, so ``crossdistill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from crossdistill import __version__
from crossdistill.errors import CrossDistillError

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("crossdistill.models.cli", "list model families and inspect a model folder"),
    "distill": ("crossdistill.train.distill_cli", "distil a one-step Student from a Teacher (DMD2 across spaces)"),
    "export": ("crossdistill.export.cli", "export a distilled run as a one-step StableDiffusionPipeline folder"),
    "generate": ("crossdistill.export.generate", "one-step images from an exported pipeline folder"),
    "bridge": ("crossdistill.bridge.cli", "train a Bridge into the Teacher's latent space, or report on Bridges"),
    "toy": ("crossdistill.toy.cli", "build or inspect the emoji world's shipped models"),
    "evaluate": ("crossdistill.eval.cli", "evaluate a model (metrics, grids, latency) or compare evaluations"),
    "demo": ("crossdistill.demo", "the whole method on the emoji world: Bridge, two distillations, evaluation"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (the others' sub-parsers carry just their help line)."""
    parser = argparse.ArgumentParser(
        prog="crossdistill",
        description="Distil a Teacher from another latent space (SD3.5, FLUX, SDXL) into a one-step Student "
        "(SD 1.5) through the Bridge of Cross-Space Distillation.",
    )
    parser.add_argument("--version", action="version", version=f"crossdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional image backends (torchvision) this tool never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except CrossDistillError as err:
        # A problem the user can fix: one clear line, no traceback.
        print(f"crossdistill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
