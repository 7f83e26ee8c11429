"""``crossdistill demo``: the whole method on the shipped emoji world, in about ten minutes on a 2-core CPU.

What it runs, each stage through the same command a user would type (so the report can list them):

1. ``crossdistill bridge train --preset emoji`` — a brief stage-1 Bridge (``prior_projector``) from the 32 px
   Student space into the 64 px Teacher space;
2. ``crossdistill distill --preset emoji`` — the **cross-space** one-step Student (Teacher = the shipped SD3-family
   Teacher, through the Bridge);
3. ``crossdistill distill --preset emoji_shared`` — the **shared-space** one-step Student (plain DMD2: ``identity``
   Bridge, Teacher = the Student base), with exactly the same steps, batch, learning rates and CFG scale;
4. ``crossdistill evaluate`` on the held-out prompts for: Teacher (multi-step), Student base (multi-step and one
   step), shared-space one step, cross-space one step — same prompts, same start noise, several seeds;
5. a report (``report.md`` + ``report.html``): the verdict, the metric table, bars, the side-by-side grid and
   the training curves, plus the commands that reproduce every row.

Before anything long it times the first two steps of every training stage (they are the real runs' first steps,
resumed afterwards; the cross-space probe runs in a scratch folder because its Bridge is not trained yet) and one
sampling batch per space, and prints the plan with an estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from crossdistill.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class DemoBudget:
    bridge_steps: int  # Bridge training steps
    bridge_batch: int  # images per Bridge step
    bridge_images: int  # training images encoded for the Bridge (spread over the train split)
    distill_steps: int  # steps of EACH distill run (cross-space and shared-space get the same)
    distill_batch: int  # prompts per distill step
    eval_prompts: int  # held-out prompts per evaluation (spread evenly over the split)
    seeds: tuple[int, ...]  # evaluation seeds: metrics are mean ± spread over them
    teacher_steps: int | None = None  # Teacher sampling steps (None: the world's own setting)
    student_steps: int | None = None  # Student base multi-step sampling steps (None: the world's own setting)
    resnet: bool = True  # also the Fréchet distance on ResNet-50 (open_nsfw) features


# "tiny" is the smoke test's. "default" aims at the README's ≤ 10 minutes on a 2-core CPU: timed at about 6 minutes
# on an idle 2-core machine with the shipped weights and an empty cache (the plan printed first re-measures it).
BUDGETS: dict[str, DemoBudget] = {
    "default": DemoBudget(
        bridge_steps=100,
        bridge_batch=8,
        bridge_images=1024,
        distill_steps=300,
        distill_batch=8,
        eval_prompts=64,
        seeds=(0, 1, 2),
        teacher_steps=8,
        student_steps=10,
    ),
    "tiny": DemoBudget(
        bridge_steps=2,
        bridge_batch=4,
        bridge_images=64,
        distill_steps=2,
        distill_batch=2,
        eval_prompts=4,
        seeds=(0,),
        teacher_steps=2,
        student_steps=2,
        resnet=False,
    ),  # fmt: skip
}


def budget_for(steps: str) -> DemoBudget:
    """A named budget, or the default one with ``N`` Bridge and distill steps."""
    if steps in BUDGETS:
        return BUDGETS[steps]
    try:
        n = int(steps)
    except ValueError:
        raise ConfigError(f"--steps must be one of {sorted(BUDGETS)} or a number of steps, got {steps!r}") from None
    if n < 1:
        raise ConfigError(f"--steps must be >= 1, got {n}")
    return dataclasses.replace(BUDGETS["default"], bridge_steps=n, distill_steps=n)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps",
        default="default",
        help="budget: default (≈10 min on 2 CPU cores), tiny (smoke test), or N training steps",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--out", help="run folder (default: runs/demo-YYYYmmdd-HHMMSS)")
    parser.add_argument(
        "--plan-only", action="store_true", help="probe, print the plan and stop (rerun with the same --out to go on)"
    )


# The evaluated models, in table order.
NAMES = {
    "teacher": "Teacher (multi-step)",
    "student_multi": "Student base (multi-step)",
    "student_one": "Student base (one step)",
    "shared_one": "shared-space (one step)",
    "cross_one": "cross-space (one step)",
}

# --------------------------------------------------------------------------------------------------------------------
# The commands of the stages


def bridge_command(run: Path, budget: DemoBudget, steps: int) -> list[str]:
    return [
        "bridge", "train", "--preset", "emoji", "--run-dir", str(run / "bridge"),
        "--set", f"train.max_steps={steps}", "--set", f"train.batch_size={budget.bridge_batch}",
        "--set", f"checkpoint.every={budget.bridge_steps}", "--set", f"data.max_images={budget.bridge_images}",
    ]  # fmt: skip


def distill_command(run_dir: Path, preset: str, budget: DemoBudget, steps: int, bridge: Path, cpu: bool) -> list[str]:
    argv = [
        "distill", "--preset", preset, "--run-dir", str(run_dir),
        "--set", f"train.max_steps={steps}", "--set", f"train.batch_size={budget.distill_batch}",
        "--set", f"checkpoint.every={budget.distill_steps}", "--set", f"log.sample_every={budget.distill_steps}",
    ]  # fmt: skip
    if preset == "emoji":
        argv += ["--set", f"model.bridge_path={bridge}"]
    if cpu:
        argv += ["--set", "train.cpu=true"]
    return argv


def evaluate_command(spec: str, out: Path, budget: DemoBudget, name: str, steps: int | None, device: str) -> list[str]:
    argv = [
        "evaluate", "--model", spec, "--name", name,
        "--prompts", "held_out", "--num-prompts", str(budget.eval_prompts),
        "--seeds", ",".join(map(str, budget.seeds)), "--out", str(out), "--device", device,
    ]  # fmt: skip
    if steps is not None:
        argv += ["--steps", str(steps)]
    if not budget.resnet:
        argv.append("--no-resnet")
    return argv


def run_command(argv: list[str]) -> float:
    """Run one ``crossdistill`` command in this process; its wall time in seconds (a failure stops the demo)."""
    from crossdistill.cli import main

    print(f"\n$ crossdistill {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code:
        raise SystemExit(code)
    return time.perf_counter() - start


def step_times(run_dir: Path) -> list[float]:
    from crossdistill.train.stats import read_stats

    return [r["time/step_s"] for r in read_stats(run_dir) if "time/step_s" in r]


# --------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Probe:
    """Measured costs (seconds) that the plan's estimate is built from."""

    overhead: dict[str, float]  # per command: wall time minus its training steps (loading, caching, saving)
    step: dict[str, float]  # per training stage: a step's time
    sample: dict[str, float]  # per space: one denoiser pass per image at batch size 8 (no CFG), with decoding
    metric: float  # per image: the judge's and ResNet-50 features


def probe(run: Path, budget: DemoBudget, device: str, cpu: bool) -> Probe:
    """Time the first two steps of each training stage and one sampling batch per space."""
    overhead, step = {}, {}
    wall = run_command(bridge_command(run, budget, 2))
    times = step_times(run / "bridge")
    overhead["bridge"], step["bridge"] = wall - sum(times), times[-1]
    scratch = run / "probe_cross"
    for name, preset, run_dir in (("cross", "emoji", scratch), ("shared", "emoji_shared", run / "shared")):
        wall = run_command(distill_command(run_dir, preset, budget, 2, run / "bridge" / "bridge", cpu))
        times = step_times(run_dir)
        # Step 1 updates the generator and the critic, step 2 only the critic; the generator runs every 5th step.
        overhead[name] = wall - sum(times)
        step[name] = times[1] + max(0.0, times[0] - times[1]) / 5
    shutil.rmtree(scratch)
    sample, metric = _sampling_costs(device, budget.resnet)
    return Probe(overhead, step, sample, metric)


def _sampling_costs(device: str, resnet: bool) -> tuple[dict[str, float], float]:
    import torch

    from crossdistill.eval.evaluate import SpaceModel, start_noise
    from crossdistill.eval.loaders import toy_metrics, toy_world

    toy = toy_world(device)
    metrics, world = toy_metrics(device, resnet=resnet)
    prompts = world.prompts("held_out")[:8]
    sample = {}
    for role in ("teacher", "student"):
        model = SpaceModel(getattr(toy, role), 1)
        noise = torch.stack([start_noise(p, 0, model.noise_shape) for p in prompts])
        model.generate(prompts, noise)  # warm-up
        start = time.perf_counter()
        pixels = model.generate(prompts, noise)
        sample[role] = (time.perf_counter() - start) / len(prompts)
    start = time.perf_counter()
    for scorer in metrics.scorers.values():
        scorer(pixels, prompts)
    return sample, (time.perf_counter() - start) / len(prompts)


def plan_rows(budget: DemoBudget, costs: Probe, toy) -> list[tuple[str, str, float]]:
    """(stage, what it does, estimated seconds) for every stage still to run; stages named as in :func:`run`."""
    from crossdistill.eval.loaders import sampling_defaults

    t_steps, t_cfg = sampling_defaults(toy, "teacher")
    s_steps, s_cfg = sampling_defaults(toy, "student")
    t_steps, s_steps = budget.teacher_steps or t_steps, budget.student_steps or s_steps
    rows = [
        (
            "bridge",
            f"Bridge: {budget.bridge_steps} steps × {budget.bridge_batch} images (prior_projector, L_rec + L_attn)",
            costs.overhead["bridge"] + (budget.bridge_steps - 2) * costs.step["bridge"],
        ),
        (
            "cross",
            f"cross-space DMD2 (Teacher: sd3, 64 px): {budget.distill_steps} steps × {budget.distill_batch} prompts",
            costs.overhead["cross"] + budget.distill_steps * costs.step["cross"],
        ),
        (
            "shared",
            f"shared-space DMD2 (Teacher: the Student base): {budget.distill_steps} steps × {budget.distill_batch}",
            costs.overhead["shared"] + (budget.distill_steps - 2) * costs.step["shared"],  # resumes after the probe
        ),
    ]
    # Per image: sampling steps × a denoiser pass (two with CFG), then the metric networks.
    images = budget.eval_prompts * len(budget.seeds)
    for key, steps, per_step in (
        ("teacher", t_steps, (2 if t_cfg != 1 else 1) * costs.sample["teacher"]),
        ("student_multi", s_steps, (2 if s_cfg != 1 else 1) * costs.sample["student"]),
        ("student_one", 1, costs.sample["student"]),
        ("shared_one", 1, costs.sample["student"]),
        ("cross_one", 1, costs.sample["student"]),
    ):
        what = f"evaluate {NAMES[key]}: {budget.eval_prompts} held-out prompts × {len(budget.seeds)} seeds"
        rows.append((f"evaluate {key}", what, images * (steps * per_step + costs.metric)))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# The verdict


def verdict(results: dict[str, dict], names: dict[str, str]) -> list[str]:
    """Plain sentences comparing cross-space with shared-space (and the gap to the Teacher), from the summaries."""
    from crossdistill.eval.evaluate import lower_is_better

    cross, shared, teacher = (results[names[k]]["summary"] for k in ("cross_one", "shared_one", "teacher"))
    lines = []
    wins, total = 0, 0
    for metric in sorted(set(cross) & set(shared)):
        if metric == "latency_ms":
            continue
        c, s = cross[metric], shared[metric]
        diff = c["mean"] - s["mean"]
        total += 1
        if abs(diff) <= 1e-9 * max(1.0, abs(s["mean"])):
            lines.append(f"- {metric}: cross-space and shared-space tie at {c['mean']:.3f}.")
            continue
        better = diff < 0 if lower_is_better(metric) else diff > 0
        wins += better
        spread = c["std"] + s["std"]
        if min(c.get("n", 1), s.get("n", 1)) < 2:
            certainty = "one seed: no spread to judge the difference by"
        else:
            certainty = f"{'beyond' if abs(diff) > spread else 'within'} the seed spread of {spread:.3f}"
        lines.append(
            f"- {metric}: cross-space {c['mean']:.3f} vs shared-space {s['mean']:.3f} → cross-space is "
            f"{'ahead' if better else 'behind'} ({certainty})."
        )
    head = f"Cross-space is ahead of shared-space on {wins} of {total} quality metrics."
    if "acc/joint" in cross:
        gap = teacher["acc/joint"]["mean"] - shared["acc/joint"]["mean"]
        gained = cross["acc/joint"]["mean"] - shared["acc/joint"]["mean"]
        if gap > 0:
            head += (
                f" On joint judge accuracy it closes {100 * gained / gap:.0f}% of the gap between shared-space one "
                f"step ({shared['acc/joint']['mean']:.3f}) and the Teacher ({teacher['acc/joint']['mean']:.3f})."
            )
        else:
            head += " Shared-space one step already matches the Teacher on joint judge accuracy: no gap to close."
    return [head, *lines]


# --------------------------------------------------------------------------------------------------------------------
# The demo


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from crossdistill.eval.evaluate import add_comparison, load_evaluation
    from crossdistill.eval.loaders import toy_world
    from crossdistill.eval.report import Report, markdown_table, plot_loss_curves
    from crossdistill.train.stats import read_stats

    budget = budget_for(args.steps)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible (use --device cpu)")
    cpu = device == "cpu"
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the Bridge trainer's accelerator follows this
    run = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    run.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print(f"crossdistill demo — the emoji world on {device}, budget {args.steps!r}, into {run}/")
    print("loading the shipped emoji world and timing one step of every stage (the plan follows)...", flush=True)
    toy = toy_world(device)
    costs = probe(run, budget, device, cpu)
    rows = plan_rows(budget, costs, toy)
    estimate = sum(seconds for *_, seconds in rows)
    print("\nPLAN")
    print(markdown_table(["stage", "what", "estimate"], [(s, w, f"{t:.0f} s") for s, w, t in rows]))
    probed = time.perf_counter() - started
    print(f"≈ {estimate / 60:.1f} min from now (loading and probing took {probed:.0f} s)\n", flush=True)
    if args.plan_only:
        return 0

    bridge = run / "bridge" / "bridge"
    commands = {
        "bridge": bridge_command(run, budget, budget.bridge_steps),
        "cross": distill_command(run / "cross", "emoji", budget, budget.distill_steps, bridge, cpu),
        "shared": distill_command(run / "shared", "emoji_shared", budget, budget.distill_steps, bridge, cpu),
    }
    wall = {name: run_command(argv) for name, argv in commands.items()}

    specs = {
        "teacher": ("teacher:toy", budget.teacher_steps),
        "student_multi": ("student:toy", budget.student_steps),
        "student_one": ("student:toy", 1),
        "shared_one": (f"run:{run / 'shared'}", None),
        "cross_one": (f"run:{run / 'cross'}", None),
    }
    folders = {}
    for key, (spec, steps) in specs.items():
        folders[key] = run / "eval" / key
        commands[f"evaluate {key}"] = evaluate_command(spec, folders[key], budget, NAMES[key], steps, device)
        wall[f"evaluate {key}"] = run_command(commands[f"evaluate {key}"])

    lines = verdict({NAMES[k]: load_evaluation(f) for k, f in folders.items()}, NAMES)
    report = Report("crossdistill demo: cross-space vs shared-space one-step Students on the emoji world")
    report.text(
        f"Student: SD1.5-family UNet, 32 px, 4-channel latents. Teacher: SD3-family MMDiT, 64 px, 16-channel latents. "
        f"Both one-step Students trained {budget.distill_steps} distillation steps × {budget.distill_batch} prompts "
        f"(equal budgets); evaluated on {budget.eval_prompts} held-out prompts × seeds "
        f"{', '.join(map(str, budget.seeds))} with the same start noise per prompt and seed. Device: {device}."
    )
    report.heading("Verdict").text("\n".join(lines))
    report.heading("Metrics")
    files = run / "report_files"
    add_comparison(report, list(folders.values()), files, list(NAMES.values()))
    if plot_loss_curves({"Bridge": read_stats(run / "bridge")}, files / "bridge_loss.png", smooth=5):
        report.heading("Bridge training").image(files.resolve() / "bridge_loss.png", "stage-1 Bridge losses")
    total = time.perf_counter() - started
    report.heading("Time")
    report.table(
        ["stage", "estimated", "measured"],
        [[stage, f"{t:.0f} s", f"{wall[stage]:.0f} s"] for stage, _, t in rows]
        + [["total, with loading and probing", f"{estimate + probed:.0f} s", f"{total:.0f} s"]],
    )
    report.heading("Reproduce")
    report.text("Each stage is one command (the first two steps of each ran earlier as the timing probe):")
    report.code("\n".join(f"crossdistill {shlex.join(argv)}" for argv in commands.values()))
    md, html = report.write(run)
    summary = {
        "budget": dataclasses.asdict(budget), "device": device, "wall_s": wall, "total_s": total,
        "estimate_s": estimate, "probe_s": probed, "verdict": lines,
    }  # fmt: skip
    (run / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\ndemo finished in {total / 60:.1f} min (estimated {(estimate + probed) / 60:.1f} min)")
    print(f"report: {html}\n        {md}")
    return 0
