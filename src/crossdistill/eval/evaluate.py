"""Evaluate a text-to-image model on a prompt set with fixed seeds: the emoji-world metrics, scorers and latency.

The pieces, in the order :func:`evaluate` runs them:

- an :class:`ImageModel` turns prompts plus *start noise* into pixels. The start noise of a (prompt, seed) pair is a
  pure function of the two (:func:`start_noise`), so every model of the same latent shape starts from the same noise
  for the same prompt and seed, and a rerun reproduces every image;
- for each seed, all prompts are generated in batches and timed (wall clock per image, after one untimed warm-up
  batch so one-off costs such as allocator growth do not count);
- :class:`EmojiMetrics` holds the world's real renders of the same prompts and the judge: judge accuracy per
  attribute and joint. Prompts that are not emoji-world captions get no reference (a real model on its own prompts);
- every scorer (the registry of :mod:`crossdistill.eval.metrics`, extensible by entry points or a
  ``--scorer-module``) adds its numbers: the mean of per-image scores, or for a feature scorer the Fréchet distance
  to the real renders. The defaults are the judge's features and the open_nsfw ResNet-50's (never called FID);
- the summary is mean ± spread over seeds; :func:`write_evaluation` writes JSON, markdown/HTML, grids and plots.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from crossdistill.config import atomic_write_text
from crossdistill.data.emoji import uint8_to_unit
from crossdistill.errors import ConfigError, DataError
from crossdistill.eval.metrics import frechet_distance, get_scorer, judge_accuracy
from crossdistill.eval.report import (
    Report,
    format_mean_spread,
    image_grid,
    markdown_table,
    mean_spread,
    plot_loss_curves,
    plot_metric_bars,
    to_uint8,
)
from crossdistill.models.base import Space
from crossdistill.train.seeding import derive_seed
from crossdistill.train.stats import read_stats

METRICS_FILE = "metrics.json"
SAMPLES_DIR = "samples"
# How many prompts the grid shows (rows); every image is still saved under samples/.
GRID_PROMPTS = 8

logger = logging.getLogger(__name__)


def lower_is_better(metric: str) -> bool:
    """Fréchet distances and latency: lower is better; accuracies and scorer scores: higher."""
    return metric.startswith("fd/") or metric == "latency_ms"


# --------------------------------------------------------------------------------------------------------------------
# Models under evaluation


def start_noise(prompt: str, seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The start noise ``[C, h, w]`` of one (prompt, seed): identical for every model with this latent shape."""
    gen = torch.Generator().manual_seed(derive_seed("crossdistill.evaluate", prompt, int(seed)))
    return torch.randn(tuple(shape), generator=gen)


class ImageModel(ABC):
    """Prompts + start noise → pixels ``[B, 3, H, W]`` in [-1, 1]; what :func:`evaluate` measures."""

    #: Short name used in tables and plots.
    name: str
    #: A distill run folder whose ``stats.jsonl`` gives the training curves (``None`` for other models).
    run_dir: Path | None = None

    @property
    @abstractmethod
    def noise_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one start-noise latent."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] for ``B`` prompts from ``noise: [B, C, h, w]`` (deterministic)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts recorded beside the metrics (kind, steps, guidance, ...)."""
        return {"name": self.name}


class SpaceModel(ImageModel):
    """A :class:`~crossdistill.models.base.Space` sampled with ``num_steps`` (``1`` = one x0-prediction from noise)."""

    def __init__(self, space: Space, num_steps: int, guidance_scale: float = 1.0, name: str | None = None, **facts):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.space = space
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        self.name = name or f"{space.family} {num_steps}-step"
        self.facts = facts

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        return self.space.latent_shape

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        p = next(self.space.denoiser.parameters())
        cond = self.space.encode_prompts(list(prompts)).to(p.device, p.dtype)
        latents = self.space.sample(cond, self.num_steps, self.guidance_scale, noise=noise.to(p.device))
        return self.space.codec.decode(latents).float()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "space": self.space.describe(),
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            **self.facts,
        }


# --------------------------------------------------------------------------------------------------------------------
# Metrics


class EmojiMetrics:
    """The emoji world as a reference: real renders of the prompts, judge accuracy, and its feature scorers.

    Args:
        world: the :class:`~crossdistill.data.emoji.EmojiWorld` whose captions the prompts are.
        judge: the world's judge, trained on real images only.
        resnet: also measure the Fréchet distance on open_nsfw ResNet-50 features (a second or so per hundred
            images on a CPU; ``False`` skips it).
        resolution: size of the real renders (default: the judge's input size). Generated images keep their own
            resolution; the judge and the feature networks resize whatever they are given.
    """

    def __init__(self, world, judge, resnet: bool = True, resolution: int | None = None):
        self.world = world
        self.judge = judge
        self.resolution = int(resolution or judge.config.input_size)
        self.scorers = {"judge_features": get_scorer("judge_features", judge=judge)}
        if resnet:
            self.scorers["nsfw_resnet50"] = get_scorer("nsfw_resnet50")

    def applies_to(self, prompts: Sequence[str]) -> bool:
        """Whether every prompt is a caption of this world (otherwise there is no real set to compare with)."""
        try:
            for p in prompts:
                self.world.parse_caption(p)
        except DataError:
            return False
        return True

    def real_pixels(self, prompts: Sequence[str]) -> torch.Tensor:
        """The world's real image of each prompt, ``[N, 3, R, R]`` in [-1, 1]."""
        arrays = [np.asarray(self.world.render(self.world.parse_caption(p), self.resolution)) for p in prompts]
        return uint8_to_unit(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))

    def accuracy(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """``{"acc/emoji", "acc/style", "acc/background", "acc/joint"}`` read back by the judge."""
        items = [self.world.parse_caption(p) for p in prompts]
        return {f"acc/{k}": float(v) for k, v in judge_accuracy(self.judge, pixels, items).items()}


# --------------------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate(
    model: ImageModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    metrics: EmojiMetrics | None = None,
    scorers: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """Generate every (prompt, seed) and measure it. Returns ``(result, images)``.

    With ``metrics`` that apply to the prompts (emoji-world captions), the judge accuracies are measured and the
    world's feature scorers join ``scorers``. Scorers follow :class:`crossdistill.eval.metrics.Scorer`: a
    ``"scores"`` scorer adds the mean of its per-image scores under its key; a ``"features"`` scorer adds ``fd/KEY``,
    the Fréchet distance between its features of the generated and of the real images (skipped without a real set).

    ``result`` (JSON-able): ``model`` (its description), ``num_prompts``, ``seeds``, ``emoji_metrics``,
    ``metric_names`` (key → what it measures), ``per_seed`` (``{seed: {metric: value}}``), ``summary``
    (``{metric: {"mean", "std", "n"}}`` over seeds). ``images``: ``{seed: [P, 3, H, W]}`` pixels in [-1, 1], prompts
    in order.
    """
    prompts = list(prompts)
    if not prompts:
        raise DataError("the prompt set is empty")
    if not seeds:
        raise ConfigError("evaluate needs at least one seed")
    use_reference = metrics is not None and metrics.applies_to(prompts)
    scorers = {**(metrics.scorers if use_reference else {}), **(scorers or {})}
    skipped = [k for k, sc in scorers.items() if sc.kind == "features" and not use_reference]
    if skipped:
        logger.warning("no real reference set for these prompts: skipping feature scorers %s", ", ".join(skipped))
    scorers = {k: sc for k, sc in scorers.items() if k not in skipped}
    real_features = {}
    if use_reference:
        # The real set is the same for every seed: its features are computed once.
        real = metrics.real_pixels(prompts)
        real_features = {k: sc(real, prompts) for k, sc in scorers.items() if sc.kind == "features"}
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]

    def run(batch: list[str], seed: int) -> torch.Tensor:
        noise = torch.stack([start_noise(p, seed, model.noise_shape) for p in batch])
        return model.generate(batch, noise).float().cpu()

    run(batches[0][:1], int(seeds[0]))  # untimed warm-up
    per_seed: dict[int, dict[str, float]] = {}
    images: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(seeds) * len(prompts), desc=f"evaluate {model.name}", unit="img", disable=not progress)
    for seed in map(int, seeds):
        chunks, seconds = [], 0.0
        for batch in batches:
            start = time.perf_counter()
            chunks.append(run(batch, seed))
            seconds += time.perf_counter() - start
            bar.update(len(batch))
        pixels = torch.cat(chunks)
        images[seed] = pixels
        values = {"latency_ms": 1000.0 * seconds / len(prompts)}
        if use_reference:
            values.update(metrics.accuracy(pixels, prompts))
        for key, scorer in scorers.items():
            out = scorer(pixels, prompts)
            if scorer.kind == "features":
                values[f"fd/{key}"] = frechet_distance(out, real_features[key])
            else:
                values[key] = float(np.mean(np.asarray(out, dtype=np.float64)))
        per_seed[seed] = values
    bar.close()
    names = sorted({k for v in per_seed.values() for k in v})
    summary = {k: mean_spread([per_seed[s][k] for s in per_seed if k in per_seed[s]]) for k in names}
    return {
        "model": model.describe(),
        "num_prompts": len(prompts),
        "seeds": [int(s) for s in seeds],
        "emoji_metrics": use_reference,
        "metric_names": _metric_names(names, scorers),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "summary": summary,
    }, images


def _metric_names(keys: Sequence[str], scorers: Mapping[str, Any]) -> dict[str, str]:
    # What each key measures, in words, for tables: feature scorers name their network (never "FID").
    names = {
        "latency_ms": "wall-clock ms per image (batched, after a warm-up)",
        "acc/emoji": "judge accuracy: emoji",
        "acc/style": "judge accuracy: style",
        "acc/background": "judge accuracy: background",
        "acc/joint": "judge accuracy: all three attributes",
    }
    for key, scorer in scorers.items():
        label = getattr(scorer, "name", key)
        names[f"fd/{key}" if scorer.kind == "features" else key] = label
    return {k: names.get(k, k) for k in keys}


# --------------------------------------------------------------------------------------------------------------------
# Output


def write_evaluation(
    out: str | Path,
    result: dict[str, Any],
    images: Mapping[int, torch.Tensor],
    prompts: Sequence[str],
    *,
    metrics: EmojiMetrics | None = None,
    run_dir: str | Path | None = None,
) -> Path:
    """Write ``metrics.json``, ``report.md``/``report.html``, ``grid.png``, ``samples/`` and (for a run) ``loss.png``.

    The grid shows the first prompts as rows and the seeds as columns, after a column of the real image when the
    prompts are emoji-world captions. Returns the folder.
    """
    out = Path(out)
    (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    seeds = sorted(images)
    arrays = {s: to_uint8(images[s]) for s in seeds}
    for s in seeds:
        for i, a in enumerate(arrays[s]):
            Image.fromarray(a).save(out / SAMPLES_DIR / sample_name(i, s))

    shown = list(range(min(GRID_PROMPTS, len(prompts))))
    rows = [[Image.fromarray(arrays[s][i]) for s in seeds] for i in shown]
    col_labels = [f"seed {s}" for s in seeds]
    if metrics is not None and result.get("emoji_metrics"):
        real = [Image.fromarray(a) for a in to_uint8(metrics.real_pixels([prompts[i] for i in shown]))]
        for i, image in zip(shown, real):
            image.save(out / SAMPLES_DIR / f"real_{sample_name(i, 0)}")  # for comparison grids
        rows = [[real[r], *row] for r, row in enumerate(rows)]
        col_labels = ["real", *col_labels]
    image_grid(rows, col_labels=col_labels).save(out / "grid.png")

    report = Report(f"Evaluation: {result['model']['name']}")
    report.text(
        f"{result['num_prompts']} prompts × seeds {', '.join(map(str, result['seeds']))}; "
        f"mean ± sample standard deviation over seeds."
    )
    names = result.get("metric_names", {})
    report.table(
        ["metric", "what it measures", "value"],
        [[k, names.get(k, k), format_mean_spread(v)] for k, v in result["summary"].items()],
    )
    report.heading("Samples")
    report.image("grid.png", "rows: the first prompts; columns: " + ", ".join(col_labels))
    report.code("\n".join(f"{i}: {prompts[i]}" for i in shown))
    if run_dir is not None:
        result["run_dir"] = str(run_dir)
        if plot_loss_curves({result["model"]["name"]: read_stats(run_dir)}, out / "loss.png") is not None:
            report.heading("Training curves").image("loss.png", f"losses from {run_dir}/stats.jsonl")
    report.heading("Model").code(json.dumps(result["model"], indent=2))
    atomic_write_text(out / METRICS_FILE, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "prompts.txt", "".join(p + "\n" for p in prompts))
    report.write(out)
    return out


def sample_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:04d}_s{seed}.png"


def load_evaluation(folder: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of an evaluation folder, with ``folder`` added (clear error if it is not one)."""
    path = Path(folder) / METRICS_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{folder} is not an evaluation folder (no {METRICS_FILE}); run crossdistill evaluate"
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err})") from None
    result["folder"] = str(folder)
    return result


def compare_evaluations(folders: Sequence[str | Path], out: str | Path, names: Sequence[str] | None = None) -> Path:
    """Side-by-side report of several evaluation folders: the metric table, metric bars, a grid, loss curves.

    Writes ``comparison.json``, ``comparison_table.md``, ``comparison.md``/``.html``, ``bars.png``, ``grid.png``
    (the first seed they share, one column per model, if they used the same prompts) and ``loss.png`` (models
    evaluated from a run dir).
    """
    report = Report("Comparison")
    add_comparison(report, folders, out, names)
    report.write(out, "comparison")
    return Path(out)


def add_comparison(
    report: Report, folders: Sequence[str | Path], out: str | Path, names: Sequence[str] | None = None
) -> dict[str, dict]:
    """Append the comparison of evaluation folders to ``report``, writing its files into ``out``.

    Returns ``{label: result}`` (each folder's ``metrics.json``) in the given order.
    """
    if not folders:
        raise DataError("--compare needs at least one evaluation folder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [load_evaluation(f) for f in folders]
    labels = list(names) if names else _unique_names([r["model"]["name"] for r in results])
    metric_names = _ordered_metrics(results)
    summaries = {label: r["summary"] for label, r in zip(labels, results)}
    rows = [
        [label, *(format_mean_spread(r["summary"][m]) if m in r["summary"] else "—" for m in metric_names)]
        for label, r in zip(labels, results)
    ]
    header = ["model", *(f"{m} {'↓' if lower_is_better(m) else '↑'}" for m in metric_names)]
    summary_json = {"models": labels, "folders": [str(f) for f in folders], "summary": summaries}
    atomic_write_text(out / "comparison.json", json.dumps(summary_json, indent=2) + "\n")
    atomic_write_text(out / "comparison_table.md", markdown_table(header, rows) + "\n")
    legend = {k: v for r in results for k, v in r.get("metric_names", {}).items()}
    report.table(header, rows)
    report.text("mean ± sample standard deviation over seeds; ↑ higher is better, ↓ lower is better.")
    report.table(["metric", "what it measures"], [[m, legend.get(m, m)] for m in metric_names])
    # Absolute image paths: the report may live in another folder than `out` (Report.write makes them relative).
    out = out.resolve()
    plot_metric_bars(summaries, out / "bars.png", metric_names)
    report.heading("Metric bars").image(out / "bars.png", "one bar per model; error bars: spread over seeds")

    sample_dirs = [Path(r["folder"]) / SAMPLES_DIR for r in results]
    prompt_lists = [(Path(r["folder"]) / "prompts.txt").read_text(encoding="utf-8").splitlines() for r in results]
    shared_seeds = sorted(set.intersection(*(set(r["seeds"]) for r in results)))
    if all(p == prompt_lists[0] for p in prompt_lists) and shared_seeds:
        seed, shown = shared_seeds[0], range(min(GRID_PROMPTS, len(prompt_lists[0])))
        columns = [[d / sample_name(i, seed) for i in shown] for d in sample_dirs]
        col_labels = list(labels)
        real = [d / f"real_{sample_name(i, 0)}" for d in sample_dirs[:1] for i in shown]
        if all(p.is_file() for p in real):
            columns, col_labels = [real, *columns], ["real", *col_labels]
        grid_rows = [[Image.open(col[i]) for col in columns] for i in range(len(shown))]
        image_grid(grid_rows, col_labels=col_labels).save(out / "grid.png")
        caption = f"same prompts and start noise (seed {seed}); columns: {', '.join(col_labels)}"
        report.heading("Samples").image(out / "grid.png", caption)
        report.code("\n".join(f"{i}: {prompt_lists[0][i]}" for i in shown))
    else:
        report.text("No side-by-side grid: the evaluations used different prompts or seeds.")

    curves = {label: read_stats(r["run_dir"]) for label, r in zip(labels, results) if r.get("run_dir")}
    if curves and plot_loss_curves(curves, out / "loss.png") is not None:
        report.heading("Training curves").image(out / "loss.png", "losses of the distill runs (stats.jsonl)")
    return dict(zip(labels, results))


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def _ordered_metrics(results: Sequence[Mapping[str, Any]]) -> list[str]:
    # Accuracy first, then distances, latency last: the order a reader asks the questions in.
    names = {m for r in results for m in r["summary"]}

    def rank(m: str) -> tuple[int, str]:
        return (0 if m.startswith("acc/") else 2 if m == "latency_ms" else 1, m)

    return sorted(names, key=rank)
