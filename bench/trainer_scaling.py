"""Report: the real trainer's multi-GPU scaling, from ``bench/trainer_step.py`` reports run side by side.

A compiled trainer's first updates take minutes, so the runs of one comparison go side by side on one host: a DDP
launch on some of its GPUs, the one-process baseline on another, at the same time (for example on a 4-GPU host,
``CUDA_VISIBLE_DEVICES=0,1 accelerate launch ...`` beside ``CUDA_VISIBLE_DEVICES=2 python ...``). This script pairs
their reports and computes what the issue's goal asks for: samples/s of the DDP run over samples/s of the one
process (goal: >= 1.8x on two GPUs). It refuses a pair that does not compare like with like: another device name,
another preset, batch or variant, or another config beyond the DDP options (``train.ddp_*``).

    python bench/trainer_scaling.py --pair "b4, split off" ddp/trainer_step.json one/trainer_step.json \\
        --pair "b8, split off" ddp8/trainer_step.json one8/trainer_step.json --out bench/results --name scaling
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from common import fmt, write_report

GOAL = 1.8  # issue 7: two GPUs give >= 1.8x the samples/s of one


def load_row(path: Path) -> tuple[dict, dict]:
    """The report's environment and its one timed row (``--variants`` with a single variant)."""
    report = json.loads(path.read_text())
    rows = [r for r in report["rows"] if "error" not in r]
    if len(rows) != 1:
        raise SystemExit(f"{path}: expected one timed row, found {len(rows)} (run trainer_step.py with one variant)")
    return report["env"], rows[0]


def not_ddp_options(settings: list[str]) -> list[str]:
    return sorted(s for s in settings if not s.startswith("train.ddp_"))


def pair(label: str, ddp_path: Path, one_path: Path) -> dict:
    (ddp_env, ddp), (one_env, one) = load_row(ddp_path), load_row(one_path)
    problems = []
    if ddp["world_size"] < 2 or one["world_size"] != 1:
        problems.append(f"processes {ddp['world_size']} and {one['world_size']} (want a DDP run, then one process)")
    if ddp_env["device"] != one_env["device"]:
        problems.append(f"devices {ddp_env['device']!r} and {one_env['device']!r}")
    for key in ("preset", "batch", "overrides"):
        if ddp[key] != one[key]:
            problems.append(f"{key} {ddp[key]!r} and {one[key]!r}")
    if not_ddp_options(ddp["set"]) != not_ddp_options(one["set"]):
        problems.append(f"--set beyond train.ddp_*: {not_ddp_options(ddp['set'])} and {not_ddp_options(one['set'])}")
    if problems:
        raise SystemExit(f"pair {label!r} ({ddp_path}, {one_path}) does not compare like with like: "
                         + "; ".join(problems))  # fmt: skip
    speedup = ddp["samples_per_s_generator"] / one["samples_per_s_generator"]
    return {
        "label": label, "ddp_report": str(ddp_path), "one_report": str(one_path),
        "device": ddp_env["device"], "dates": [ddp_env["date"], one_env["date"]],
        "preset": ddp["preset"], "batch": ddp["batch"], "overrides": ddp["overrides"],
        "ddp_options": sorted(s for s in ddp["set"] if s.startswith("train.ddp_")),
        "processes": ddp["world_size"],
        "ddp": {k: ddp[k] for k in ("cycle_ms", "samples_per_s_generator", "peak_gb")}
        | {"generator_ms": ddp["generator_update"]["ms"], "critic_ms": ddp["critic_update"]["ms"]},
        "one": {k: one[k] for k in ("cycle_ms", "samples_per_s_generator", "peak_gb")}
        | {"generator_ms": one["generator_update"]["ms"], "critic_ms": one["critic_update"]["ms"]},
        "speedup": speedup, "efficiency": speedup / ddp["world_size"],
        "meets_goal": ddp["world_size"] == 2 and speedup >= GOAL,
    }  # fmt: skip


def to_markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# The real trainer's multi-GPU scaling (trainer_step.py reports run side by side)",
        "",
        f"Command: `{command}`",
        "",
        "Each row: a DDP launch and a one-process run of the same preset, batch per GPU and variant, on one device "
        f"model (dates: when each run started). Goal (two GPUs): >= {GOAL}x the samples/s of one.",
        "",
        "| pair | device | dates | batch / GPU | DDP options | DDP gen / critic ms | one gen / critic ms "
        "| DDP cycle ms | one cycle ms | DDP samples/s | one samples/s | speed-up | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, o = r["ddp"], r["one"]
        lines.append(
            f"| {r['label']} | {r['device']} | {' / '.join(r['dates'])} | {r['batch']} | "
            f"{' '.join(r['ddp_options']) or '–'} | {d['generator_ms']:.0f} / {d['critic_ms']:.0f} | "
            f"{o['generator_ms']:.0f} / {o['critic_ms']:.0f} | {d['cycle_ms']:.0f} | {o['cycle_ms']:.0f} | "
            f"{fmt(d['samples_per_s_generator'], '.3f')} | {fmt(o['samples_per_s_generator'], '.3f')} | "
            f"**{r['speedup']:.2f}x** | {'met' if r['meets_goal'] else 'not met'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "DDP_JSON", "ONE_JSON"),
                        help="a label, the DDP launch's report, the one-process run's report")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="trainer_scaling")
    args = parser.parse_args(argv)
    rows = [pair(label, Path(ddp), Path(one)) for label, ddp, one in args.pair]
    command = "python bench/trainer_scaling.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_report(args.out, args.name, {"command": command, "goal": GOAL, "rows": rows}, to_markdown(rows, command))
    for r in rows:
        print(f"{r['label']}: {r['speedup']:.2f}x ({r['ddp']['samples_per_s_generator']:.3f} / "
              f"{r['one']['samples_per_s_generator']:.3f} samples/s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
