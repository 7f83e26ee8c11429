"""Benchmark: whether a compiled DDP launch reuses the compile caches, with dynamo's DDP graph split on and off.

A real trainer's cold compile takes 262-435 s on an H100 and the first compiled DDP launch on a host 168-400+ s (later
ones 85-101 s): most of a 10-minute device call. This runs a toy of the trainer's compile (blocks compiled one by one
with inductor, larger than DDP's first bucket so that the split cuts them) in fresh processes that share one inductor
cache folder, in this order: one process; DDP on two gloo processes with the split off (``train.ddp_split_graphs=
false``), twice; DDP with the split on (torch's default), twice. Each launch reports inductor's FX-graph cache and
AOTAutograd's cache counters (hit / miss / bypass: a bypassed graph is traced and partitioned again every launch).

    python bench/ddp_compile_cache.py --out $OUT      # CPU (inductor's C++ backend), ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from common import env_markdown, environment, exit_gloo, free_port, init_gloo, write_report

LAUNCHES = (("one process", 1, None), ("DDP, split off (1st)", 2, False), ("DDP, split off (2nd)", 2, False),
            ("DDP, split on (1st)", 2, True), ("DDP, split on (2nd)", 2, True))  # fmt: skip


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def worker(rank: int, world: int, port: int, split: bool | None, width: int, out_file: str) -> None:
    from crossdistill.train.perf import compile_blocks, compile_cache_counts

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        init_gloo(rank, world, port)
        torch._dynamo.config.optimize_ddp = split
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(width) for _ in range(4)])
    compile_blocks(model)  # inductor, as train.compile
    step = DDP(model, bucket_cap_mb=1) if world > 1 else model  # 1 MiB buckets: each block (~8 MiB) is cut
    x = torch.randn(8, width, requires_grad=True)
    step(x).square().mean().backward()
    if rank == 0:
        Path(out_file).write_text(json.dumps(compile_cache_counts()))
    if world > 1:
        torch.distributed.barrier()
        exit_gloo()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--width", type=int, default=512, help="block width (4 x width hidden; 512: ~8 MiB a block)")
    parser.add_argument("--launch", type=int, help=argparse.SUPPRESS)  # internal: run LAUNCHES[i] in this process
    parser.add_argument("--counters", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.launch is not None:  # a fresh process per launch: nothing of an earlier one is left in memory
        import torch.multiprocessing as mp

        _, world, split = LAUNCHES[args.launch]
        # Spawned workers for one process too: the blocks' class must live in the same module (``__mp_main__``) in
        # every launch. Run in this script's ``__main__`` instead, it gave other cache keys (a toy artifact; the
        # trainer's block classes come from diffusers).
        mp.spawn(worker, args=(world, free_port(), split, args.width, args.counters), nprocs=world)
        return 0

    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}  # shared, empty at first
        for i, (name, world, split) in enumerate(LAUNCHES):
            out_file = str(Path(tmp) / "counters.json")
            cmd = [sys.executable, __file__, "--launch", str(i), "--counters", out_file, "--width", str(args.width)]
            subprocess.run(cmd, env=env, check=True, timeout=900)
            rows.append({"launch": name, "processes": world, "ddp_split_graphs": split,
                         "counters": json.loads(Path(out_file).read_text())})  # fmt: skip
            print(rows[-1], flush=True)
    env = environment(torch.device("cpu")) | {"backend": "inductor (CPU)"}
    report = {"env": env, "command": " ".join(sys.argv), "width": args.width, "rows": rows}
    write_report(args.out, "ddp_compile_cache", report, to_markdown(report))
    print(to_markdown(report), flush=True)
    return 0


def to_markdown(report: dict) -> str:
    keys = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss",
            "autograd_cache_bypass")  # fmt: skip
    lines = [
        "# Compile caches across compiled DDP launches (toy blocks, inductor)\n",
        env_markdown(report["env"], report["command"]),
        f"Four blocks of width {report['width']} compiled one by one; DDP buckets of 1 MiB. Launches in this order, "
        "in fresh processes, one inductor cache folder.\n",
        "On CPU the device has no index. On CUDA each rank compiles for its own device (`cuda:<local rank>`), and "
        "the caches' keys include every input's device index, so a one-process run on `cuda:0` can warm rank 0 "
        "only (read from torch's cache key code; not measured here).\n",
        "| launch | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for r in report["rows"]:
        lines.append(f"| {r['launch']} | " + " | ".join(str(r["counters"].get(k, 0)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
