"""``crossdistill info``: the registered model families, or what a model folder holds."""

from __future__ import annotations

import argparse
import json

from crossdistill.errors import ModelLoadError
from crossdistill.models.loading import detect_family, resolve_folder
from crossdistill.models.registry import family_names, load_space


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=family_names(), help="family of --model (default: read from its config)")
    parser.add_argument("--model", help="local diffusers folder or hub id to describe")


def run(args: argparse.Namespace) -> int:
    if not args.model:
        for name in family_names():
            print(name)
        return 0
    family = args.family
    if family is None:
        folder = resolve_folder(args.model)
        found = detect_family(folder)
        if found is None or found[0] not in family_names():
            raise ModelLoadError(f"cannot tell the family of {folder} from its unet/ or transformer/: pass --family")
        family = found[0]
    print(json.dumps(load_space(family, args.model).describe(), indent=2))
    return 0
