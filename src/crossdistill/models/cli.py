"""``crossdistill info``: the registered model families, or what a model folder holds."""

from __future__ import annotations

import argparse
import json

from crossdistill.models.registry import family_names, load_space


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=family_names(), help="family of the folder given by --model")
    parser.add_argument("--model", help="local diffusers folder or hub id to inspect (needs --family)")


def run(args: argparse.Namespace) -> int:
    if not args.model:
        for name in family_names():
            print(name)
        return 0
    if not args.family:
        raise SystemExit("crossdistill info: --model needs --family")
    space = load_space(args.family, args.model)
    print(json.dumps(space.describe(), indent=2))
    return 0
