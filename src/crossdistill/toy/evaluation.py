"""The emoji world's quality table: how good each shipped model is, measured on held-out prompts.

:func:`evaluate_world` gives every number of the table in ``docs/emoji_world.md`` and a comparison grid:

- VAE reconstruction PSNR of both spaces on real held-out images;
- judge accuracy on real held-out images (per attribute and joint);
- Teacher multi-step (flow Euler + CFG), Student-base multi-step (DDIM + CFG) and Student-base one-step samples,
  each scored by :func:`crossdistill.eval.evaluate.evaluate` (judge accuracy, Fréchet distance on judge features
  and on ResNet-50 (open_nsfw) features) with the same per-prompt start noise.

It runs on any :class:`~crossdistill.toy.world.ToyWorld`, so a rebuilt world is measured exactly as the shipped one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from crossdistill.data.emoji import uint8_to_unit
from crossdistill.eval.evaluate import EmojiMetrics, SpaceModel, evaluate
from crossdistill.eval.metrics import frechet_distance, judge_accuracy
from crossdistill.eval.report import image_grid, to_uint8
from crossdistill.toy.build import EvalRecipe, psnr

# Row names of the table, in order.
SAMPLERS = ("teacher", "student_multi", "student_one")


def held_out_subset(world, num_prompts: int) -> list[int]:
    """Indices of ``num_prompts`` held-out prompts spread evenly over the split (all when it is smaller)."""
    n = len(world.items("held_out"))
    if num_prompts >= n:
        return list(range(n))
    return np.linspace(0, n - 1, num_prompts).round().astype(int).tolist()


@torch.no_grad()
def reconstruction_psnr(space, pixels: torch.Tensor, batch_size: int = 256) -> float:
    """Mean PSNR (dB) of ``decode(encode(x))`` over uint8 images ``[N, 3, H, W]`` at the space's resolution."""
    device = next(space.codec.parameters()).device
    values = []
    for i in range(0, len(pixels), batch_size):
        x = uint8_to_unit(pixels[i : i + batch_size]).to(device)
        values.append(psnr(space.codec.decode(space.codec.encode(x)), x) * len(x))
    return sum(values) / len(pixels)


def samplers(toy, recipe: EvalRecipe) -> dict[str, SpaceModel]:
    """The three sampled models of the table, named as its rows."""
    return {
        "teacher": SpaceModel(toy.teacher, recipe.teacher_steps, recipe.teacher_guidance, name="Teacher"),
        "student_multi": SpaceModel(
            toy.student, recipe.student_steps, recipe.student_guidance, name="Student base (multi-step)"
        ),
        "student_one": SpaceModel(toy.student, 1, 1.0, name="Student base (one step)"),
    }


def generate_samples(toy, recipe: EvalRecipe, progress: bool = True) -> dict[str, dict]:
    """Samples of every row of the table on the held-out prompts (the slow part: run it where the GPU is).

    Returns ``{sampler: {"pixels": uint8 [N, 3, H, W], "model": description, "latency_ms": float}}``."""
    prompts = [toy.world.items("held_out")[i].caption for i in held_out_subset(toy.world, recipe.num_prompts)]
    out = {}
    for name, model in samplers(toy, recipe).items():
        result, images = evaluate(model, prompts, [recipe.seed], batch_size=recipe.batch_size, progress=progress)
        out[name] = {
            "pixels": torch.from_numpy(to_uint8(images[recipe.seed])).permute(0, 3, 1, 2).contiguous(),
            "model": model.describe(),
            "latency_ms": result["summary"]["latency_ms"]["mean"],
        }
    return out


def save_samples(samples: dict[str, dict], path: str | Path) -> None:
    """Samples of :func:`generate_samples` as one safetensors file (descriptions in its metadata)."""
    meta = {name: json.dumps({k: v for k, v in s.items() if k != "pixels"}) for name, s in samples.items()}
    save_file({name: s["pixels"] for name, s in samples.items()}, str(path), metadata=meta)


def load_samples(path: str | Path) -> dict[str, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return {name: {"pixels": f.get_tensor(name), **json.loads(meta[name])} for name in f.keys()}


def score_samples(toy, samples: dict[str, dict], recipe: EvalRecipe, resnet: bool = True) -> tuple[dict, Image.Image]:
    """Every metric of the emoji-world table, and a grid (rows: prompts; columns: real, then each sampler).

    Returns ``(metrics, grid)`` with ``metrics`` JSON-able: ``vae_psnr`` per space, ``judge_real`` accuracies,
    ``samples`` ``{sampler: {"model": description, "metrics": {name: value}}}``, and what was measured on."""
    world = toy.world
    index = held_out_subset(world, recipe.num_prompts)
    items = [world.items("held_out")[i] for i in index]
    prompts = [it.caption for it in items]

    out: dict = {"num_prompts": len(prompts), "split": "held_out", "seed": recipe.seed, "vae_psnr": {}}
    for name, space in (("teacher", toy.teacher), ("student", toy.student)):
        pixels, _ = world.tensor_cache("held_out", space.resolution)
        out["vae_psnr"][name] = reconstruction_psnr(space, pixels[index])

    real, _ = world.tensor_cache("held_out", toy.judge.config.input_size)
    out["judge_real"] = judge_accuracy(toy.judge, real[index], items)

    # The same measurements as crossdistill.eval.evaluate.evaluate, on samples generated elsewhere.
    metrics = EmojiMetrics(world, toy.judge, resnet=resnet)
    real = metrics.real_pixels(prompts)
    features = {k: sc for k, sc in metrics.scorers.items() if sc.kind == "features"}
    real_features = {k: sc(real, prompts) for k, sc in features.items()}
    out["samples"] = {}
    for name in SAMPLERS:
        pixels = uint8_to_unit(samples[name]["pixels"])
        values = metrics.accuracy(pixels, prompts)
        for key, scorer in features.items():
            values[f"fd/{key}"] = frechet_distance(scorer(pixels, prompts), real_features[key])
        values["latency_ms"] = samples[name]["latency_ms"]
        out["samples"][name] = {"model": samples[name]["model"], "metrics": values}

    shown = range(min(recipe.grid_prompts, len(prompts)))
    columns = [to_uint8(real[: len(shown)])]
    columns += [to_uint8(samples[n]["pixels"][: len(shown)]) for n in SAMPLERS]
    rows = [[Image.fromarray(column[i]) for column in columns] for i in shown]
    grid = image_grid(rows, col_labels=["real", "Teacher", "Student", "1-step"])
    out["grid_prompts"] = [prompts[i] for i in shown]
    return out, grid


def evaluate_world(toy, recipe: EvalRecipe, progress: bool = True, resnet: bool = True) -> tuple[dict, Image.Image]:
    """:func:`generate_samples` then :func:`score_samples`: the whole table for a loaded world."""
    return score_samples(toy, generate_samples(toy, recipe, progress), recipe, resnet)


def metrics_table(metrics: dict) -> str:
    """The markdown table of ``docs/emoji_world.md`` from the metrics that :func:`score_samples` returns."""
    heads = ("emoji", "style", "background", "joint")
    lines = [
        "| model | sampler | judge accuracy: emoji / style / background / joint | Fréchet distance on judge features "
        "| Fréchet distance on ResNet-50 (open_nsfw) features |",
        "|---|---|---|---|---|",
    ]
    real = " / ".join(f"{metrics['judge_real'][h]:.3f}" for h in heads)
    lines.append(f"| real held-out images | – | {real} | 0 | 0 |")
    for name in SAMPLERS:
        entry = metrics["samples"][name]
        m, model = entry["metrics"], entry["model"]
        sampler = f"{model['num_steps']} steps, CFG {model['guidance_scale']:g}"
        acc = " / ".join(f"{m['acc/' + h]:.3f}" for h in heads)
        fd_resnet = m.get("fd/nsfw_resnet50")
        fd_resnet = "–" if fd_resnet is None else f"{fd_resnet:.2f}"
        lines.append(f"| {model['name']} | {sampler} | {acc} | {m['fd/judge_features']:.2f} | {fd_resnet} |")
    psnr_line = (
        f"VAE reconstruction PSNR on the same held-out images: Teacher space {metrics['vae_psnr']['teacher']:.2f} dB "
        f"(64 px, 16×16×16 latents), Student space {metrics['vae_psnr']['student']:.2f} dB (32 px, 8×8×4 latents)."
    )
    return "\n".join(lines) + "\n\n" + psnr_line + "\n"
