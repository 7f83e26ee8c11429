"""``crossdistill evaluate``: measure one model on a prompt set, or compare evaluation folders.

    crossdistill evaluate --model teacher:toy --steps 20 --out eval/teacher
    crossdistill evaluate --model run:runs/cross --out eval/cross          # one step from the run's generator
    crossdistill evaluate --model pipeline:exported/ --out eval/exported   # an exported one-step SD pipeline
    crossdistill evaluate --compare eval/teacher eval/cross eval/exported --out eval/compare

Scorers beyond the built-in emoji metrics come from the registry of :mod:`crossdistill.eval.metrics`: a package can
register one through the ``crossdistill.scorers`` entry-point group, or ``--scorer-module my.module`` imports a
module that calls ``register_scorer`` (e.g. CLIP score or HPSv3 from local weights), with no edit to this project.
"""

from __future__ import annotations

import argparse
import importlib
from importlib.metadata import entry_points

from crossdistill.errors import ConfigError, DataError


def configure(parser: argparse.ArgumentParser) -> None:
    from crossdistill.eval.loaders import MODEL_KINDS

    kinds = "; ".join(f"{k}: {v}" for k, v in MODEL_KINDS.items())
    parser.add_argument("--model", metavar="KIND:PATH", help=f"the model to evaluate. {kinds}")
    parser.add_argument("--name", help="its name in tables and plots (default: derived from --model)")
    parser.add_argument(
        "--prompts",
        default="held_out",
        help="held_out or train (the emoji world's splits), or a text file with one prompt per line",
    )
    parser.add_argument("--num-prompts", type=int, help="use this many prompts, spread evenly over the set")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; metrics are mean ± spread over them")
    parser.add_argument("--steps", type=int, help="sampling steps of student/teacher (default: the world's)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the world's for multi-step, else 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=32, help="images generated per forward")
    parser.add_argument(
        "--scorer",
        action="append",
        default=[],
        metavar="NAME[:k=v,...]",
        help="add a registered scorer, with options for its factory (repeatable)",
    )
    parser.add_argument(
        "--scorer-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first, so the scorers it registers can be named by --scorer (repeatable)",
    )
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-50 Fréchet distance (faster)")
    parser.add_argument("--toy-weights", metavar="DIR", help="an emoji world built by `crossdistill toy build --out`")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="compare these evaluation folders instead")
    parser.add_argument("--out", required=True, help="output folder")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


def select_prompts(source: str, world=None, num_prompts: int | None = None) -> list[str]:
    """Prompts of an emoji-world split (``held_out``, ``train``) or of a prompt file, thinned to ``num_prompts``."""
    from crossdistill.data.images import read_prompts

    if source in ("held_out", "train"):
        if world is None:
            raise ConfigError(f"--prompts {source} names an emoji-world split; it needs the toy world")
        prompts = world.prompts(source)
    else:
        prompts = read_prompts(source)
    if not prompts:
        raise DataError(f"the prompt set {source!r} is empty")
    if num_prompts is not None and num_prompts < len(prompts):
        if num_prompts < 1:
            raise ConfigError(f"--num-prompts must be >= 1, got {num_prompts}")
        # Evenly spread, so a subset still mixes emoji, styles and backgrounds.
        step = len(prompts) / num_prompts
        prompts = [prompts[int(i * step)] for i in range(num_prompts)]
    return prompts


SCORER_ENTRY_POINTS = "crossdistill.scorers"


def resolve_scorers(specs: list[str], modules: list[str]) -> dict:
    """Scorers named ``NAME`` or ``NAME:key=value,...`` (string options for the scorer's factory).

    ``modules`` are imported first (they call ``register_scorer``). A name still unknown is looked up in the
    ``crossdistill.scorers`` entry-point group: ``name = "pkg.module"`` (which registers it on import) or
    ``name = "pkg.module:Factory"`` (registered under the entry point's name).
    """
    from crossdistill.eval.metrics import get_scorer, register_scorer, scorer_names

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"--scorer-module {module}: cannot import it ({err})") from None
    scorers = {}
    for spec in specs:
        name, _, raw = spec.partition(":")
        options = {}
        for item in filter(None, raw.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--scorer {spec!r}: options are key=value, comma-separated")
            options[key.strip()] = value.strip()
        if name not in scorer_names():
            for ep in entry_points(group=SCORER_ENTRY_POINTS, name=name):
                loaded = ep.load()
                if name not in scorer_names() and callable(loaded):
                    register_scorer(name)(loaded)
        scorers[name] = get_scorer(name, **options)
    return scorers


def run(args: argparse.Namespace) -> int:
    from crossdistill.eval.evaluate import compare_evaluations, evaluate, write_evaluation

    if args.compare:
        out = compare_evaluations(args.compare, args.out)
        print(f"comparison written to {out}/comparison.md (and .html, bars.png, grid.png)")
        return 0
    if not args.model:
        raise ConfigError("pass --model KIND:PATH (or --compare DIR ...)")
    from crossdistill.eval.loaders import load_image_model, toy_metrics

    scorers = resolve_scorers(args.scorer, args.scorer_module)
    model = load_image_model(
        args.model, steps=args.steps, guidance=args.guidance, device=args.device, name=args.name,
        toy_weights=args.toy_weights,
    )  # fmt: skip
    metrics, world = toy_metrics(device=args.device, resnet=not args.no_resnet, toy_weights=args.toy_weights)
    prompts = select_prompts(args.prompts, world, args.num_prompts)
    result, images = evaluate(
        model, prompts, parse_seeds(args.seeds), metrics=metrics, scorers=scorers, batch_size=args.batch_size
    )
    out = write_evaluation(args.out, result, images, prompts, metrics=metrics, run_dir=model.run_dir)
    for key, stat in result["summary"].items():
        print(f"  {key:<22} {stat['mean']:.4f} ± {stat['std']:.4f}")
    print(f"evaluation written to {out}/ (metrics.json, report.md, report.html, grid.png)")
    return 0
