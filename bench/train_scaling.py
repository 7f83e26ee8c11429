"""Benchmark: multi-GPU scaling of the composed DMD2 step through ``accelerate launch`` (DDP).

Runs ``bench/train_step.py --parts ddp`` once per process count (default 1 and every GPU of the machine), each
process with its own batch (weak scaling, as a user adds GPUs to train faster), and reports samples/s and the
speed-up over one process. Goal (issue 7): two GPUs give >= 1.8x the samples/s of one.

    PYTHONUNBUFFERED=1 python bench/train_scaling.py --out $OUT --variants fused compiled     # GPU machine
    python bench/train_scaling.py --tiny --cpu --procs 1 2 --out /tmp/bench_scaling           # CPU smoke test (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import env_markdown, fmt, write_report

HERE = Path(__file__).resolve().parent
_RUNNING: list[subprocess.Popen] = []  # the launch in flight (its own process group)


def _stop(signum: int, _frame) -> None:
    """SIGTERM/SIGINT (e.g. an outer ``timeout``): take the launch and all its workers down too, or they outlive us
    (they run in their own session) and keep the GPUs busy for whatever runs next."""
    for proc in _RUNNING:
        kill_tree(proc.pid)
    sys.exit(128 + signum)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each worker in a session of its own, so killing the
    launcher's process group is not enough)."""
    import psutil  # a dependency of accelerate

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def launch(procs: int, variant: str, out: Path, *, tiny: bool, cpu: bool, timeout_s: float, extra: list[str]) -> dict:
    """One ``accelerate launch`` of the DDP step; returns its report (or the error and the log's tail)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    # Several CPU processes: accelerate's multi-process launcher (torchrun) with no GPU visible, gloo backend.
    cmd += ["--multi_gpu"] if procs > 1 else (["--cpu"] if cpu else [])
    cmd += [str(HERE / "train_step.py"), "--parts", "ddp", "--ddp-variant", variant, "--out", str(out)]
    cmd += (["--tiny"] if tiny else []) + extra
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    env = os.environ | {"PYTHONUNBUFFERED": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    log_path = out / f"launch_{variant}_{procs}.log"
    with log_path.open("w") as log_file:  # streamed, so a launch that times out still leaves its log
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
        _RUNNING.append(proc)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)  # the launcher and every worker process
            proc.wait()
            returncode = None
        finally:
            _RUNNING.remove(proc)
    log = log_path.read_text()
    print(log[-3000:], flush=True)
    path = out / f"train_step_ddp{procs}.json"
    if returncode != 0 or not path.exists():
        why = f"timed out after {timeout_s:.0f} s" if returncode is None else f"exit {returncode}"
        return {"error": why, "log_tail": log[-2000:], "wall_s": time.monotonic() - t0}
    report = json.loads(path.read_text())
    path.rename(out / f"train_step_ddp{procs}_{variant}.json")
    (out / f"train_step_ddp{procs}.md").rename(out / f"train_step_ddp{procs}_{variant}.md")
    return report | {"wall_s": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--procs", type=int, nargs="+", default=None, help="process counts (default: 1 and all GPUs)")
    parser.add_argument("--variants", nargs="+", default=["fused", "compiled"], help="train_step.py step variants")
    parser.add_argument("--tiny", action="store_true", help="tiny configs")
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo), for the smoke test")
    parser.add_argument("--timeout-s", type=float, default=400, help="per launch")
    parser.add_argument("--dump-stacks-after-s", type=float, default=0, help="passed to train_step.py (hangs)")
    parser.add_argument("--reuse", action="store_true", help="take runs already in --out instead of launching them")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    if args.procs is None:
        import torch

        args.procs = sorted({1, max(1, torch.cuda.device_count())})
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants:
        runs = {}
        for n in args.procs:
            done = args.out / f"train_step_ddp{n}_{variant}.json"
            if args.reuse and done.exists():  # measured by an earlier invocation on this machine
                runs[n] = json.loads(done.read_text())
                continue
            extra = ["--dump-stacks-after-s", str(args.dump_stacks_after_s)] if args.dump_stacks_after_s else []
            runs[n] = launch(n, variant, args.out, tiny=args.tiny, cpu=args.cpu, timeout_s=args.timeout_s, extra=extra)
        base = runs.get(1, {}).get("ddp") or {}
        for n, rep in runs.items():
            row = {"variant": variant, "processes": n}
            if rep.get("ddp"):
                d = rep["ddp"]
                keys = ("name", "ms", "ms_min", "ms_max", "samples_per_s", "peak_gb", "first_step_s", "world_size")
                keys += ("mfu",)
                row |= {k: d.get(k) for k in keys}
                row["env"] = rep["env"]
                if base:
                    row["speedup_vs_1"] = d["samples_per_s"] / base["samples_per_s"]
                    row["efficiency"] = row["speedup_vs_1"] / n
            else:
                row["error"] = rep.get("error") or str(rep.get("errors"))[:2000]
                row["log_tail"] = rep.get("log_tail", "")
            rows.append(row)
            print(row, flush=True)
        report = {"command": " ".join(sys.argv), "rows": rows}
        write_report(args.out, "train_scaling", report, to_markdown(report))
    return 0 if all("error" not in r for r in rows) else 1


def to_markdown(report: dict) -> str:
    env = next((r["env"] for r in report["rows"] if "env" in r), {})
    lines = [
        "# Multi-GPU scaling of the DMD2 step (accelerate launch, DDP; each process its own batch)\n",
        env_markdown(env, report["command"]) if env else f"Command: `{report['command']}`\n",
        "| variant | processes | ms / step | samples/s | × one process | efficiency | MFU per GPU | peak GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['processes']} | {r['error'][:120]} | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['processes']} | {r['ms']:.1f} | {r['samples_per_s']:.2f} "
            f"| {r.get('speedup_vs_1', float('nan')):.2f} | {r.get('efficiency', float('nan')):.0%} "
            f"| {fmt(r.get('mfu'), '.0%')} | {fmt(r['peak_gb'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
