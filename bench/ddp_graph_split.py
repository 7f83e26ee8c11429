"""Benchmark: the graphs ``train.compile`` hands the compiler under DDP, with and without ``train.ddp_split_graphs``.

``train.compile`` compiles the backbones block by block. Under DDP, dynamo's DDPOptimizer (torch's default,
``torch._dynamo.config.optimize_ddp``) then splits each block's graph where DDP's gradient buckets end, so each piece
is its own graph: fewer fusions across the cuts, more graphs to compile. ``train.ddp_split_graphs=false`` keeps one
graph per block. This script counts the graphs for the real backbones, random weights, on two gloo processes on CPU
(the count depends on the graphs and the bucket size, not on the device), with dynamo's eager backend (capture only,
no code generation), one forward and backward each:

- the SD3.5-Medium MMDiT with ``--layers`` of its 24 blocks (identical blocks share their graphs, so a few show the
  pattern; all 24 in fp32 with gradients need ~35 GB per process);
- the SD 1.5 UNet, whole (the Student / generator).

It also records, on the same processes, whether DDP still starts all-reduces before the backward has left the last
compiled block with the split off: the order of "bucket all-reduce launched" and "block backward done" events in the
second backward (DDP's first all-reduces one bucket of everything while it learns the order of the gradients).

    python bench/ddp_graph_split.py --out $OUT            # ~3 min on 2 cores, ~12 GB
    python bench/ddp_graph_split.py --tiny --out /tmp/b   # the families' tiny backbones (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common import (
    env_markdown,
    environment,
    exit_gloo,
    free_port,
    init_gloo,
    sd15_unet_config,
    sd35_medium_config,
    write_report,
)

BACKBONES = ("sd35m", "sd15")


def build(which: str, tiny: bool, layers: int):
    """(backbone, forward on a small input returning a tensor to reduce)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    if which == "sd35m":
        if tiny:
            from crossdistill.models.sd3 import SD3Space

            model = SD3Space.tiny(seed=1).denoiser.backbone
        else:
            model = SD3Transformer2DModel(**(sd35_medium_config() | {"num_layers": layers, "sample_size": 16}))
        c = model.config
        inputs = dict(hidden_states=torch.randn(1, c.in_channels, 16, 16),
                      encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim),
                      pooled_projections=torch.randn(1, c.pooled_projection_dim),
                      timestep=torch.tensor([500]))  # fmt: skip
    else:
        if tiny:
            from crossdistill.models.sd15 import SD15Space

            model = SD15Space.tiny(seed=0).denoiser.backbone
        else:
            model = UNet2DConditionModel(**sd15_unet_config())
        c = model.config
        inputs = dict(sample=torch.randn(1, c.in_channels, 16, 16), timestep=torch.tensor([500]),
                      encoder_hidden_states=torch.randn(1, 8, c.cross_attention_dim))  # fmt: skip
    return model, lambda m: m(**inputs).sample


def worker(rank: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    import json

    from torch.nn.parallel import DistributedDataParallel as DDP

    from crossdistill.train.perf import compile_blocks

    init_gloo(rank, 2, port)
    rows = []
    for which in args.backbones:
        for split in (True, False):
            torch._dynamo.reset()
            torch._dynamo.config.optimize_ddp = split
            graphs: list[int] = []

            def backend(gm, example_inputs, graphs=graphs):
                graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"))
                return gm.forward

            model, forward = build(which, args.tiny, args.layers)
            blocks = compile_blocks(model, backend=backend)
            params_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
            ddp = DDP(model, bucket_cap_mb=args.bucket_mb)
            forward(ddp).float().square().mean().backward()
            rows.append({"backbone": which, "ddp_split_graphs": split, "compiled_blocks": blocks,
                         "graphs": len(graphs), "ops_per_graph": graphs, "fp32_param_mib": params_mib,
                         "events": []})  # fmt: skip
            del ddp, model
        # Split off, a pass of its own (its hooks may change the graphs): the order of the all-reduce launches and
        # the ends of the blocks' backward.
        torch._dynamo.reset()
        torch._dynamo.config.optimize_ddp = False
        model, forward = build(which, args.tiny, args.layers)
        compile_blocks(model, backend="eager")
        ddp = DDP(model, bucket_cap_mb=args.bucket_mb)
        events = rows[-1]["events"]
        order_hooks(model, ddp, events)
        for _ in range(2):  # DDP's first backward all-reduces one bucket of everything, then rebuilds its buckets
            events.clear()
            forward(ddp).float().square().mean().backward()
        del ddp, model
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    exit_gloo()


def order_hooks(model, ddp, events: list[str]) -> None:
    """Record "all-reduce" when DDP launches a bucket's all-reduce and "block N done" when the backward leaves the
    N-th compiled block (a hook on the gradient of the block's first input)."""
    import torch.distributed as dist

    from crossdistill.train.perf import outermost_blocks

    def hook(state, bucket):
        events.append("all-reduce")
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, hook)
    for i, block in enumerate(outermost_blocks(model)):  # the blocks train.compile compiles

        def pre(module, args, kwargs, i=i):
            x = args[0] if args else next(iter(kwargs.values()))
            if torch.is_tensor(x) and x.requires_grad:
                x.register_hook(lambda g: events.append(f"block {i} done"))

        block.register_forward_pre_hook(torch._dynamo.disable(pre), with_kwargs=True)  # runs eagerly


def overlap(events: list[str]) -> dict:
    """How many all-reduces DDP launched before the backward left the first block (index 0, the last to finish)."""
    if "block 0 done" not in events:
        return {"all_reduce_before_last_block_done": None, "all_reduce_total": events.count("all-reduce")}
    end = events.index("block 0 done")
    return {"all_reduce_before_last_block_done": events[:end].count("all-reduce"),
            "all_reduce_total": events.count("all-reduce")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the families' tiny backbones (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--layers", type=int, default=4, help="SD3.5-M blocks built (of 24)")
    parser.add_argument("--bucket-mb", type=int, default=25, help="DDP bucket size (train.ddp_bucket_mb)")
    args = parser.parse_args(argv)

    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "rows.json")
        mp.spawn(worker, args=(free_port(), args, out_file), nprocs=2)
        rows = json.loads(Path(out_file).read_text())
    for row in rows:
        row.update(overlap(row.pop("events")))
    env = environment(torch.device("cpu")) | {"processes": "2 (gloo)", "backend": "dynamo eager"}
    report = {"env": env, "command": " ".join(sys.argv), "bucket_mb": args.bucket_mb, "layers": args.layers,
              "rows": rows}  # fmt: skip
    write_report(args.out, "ddp_graph_split", report, to_markdown(report))
    print(to_markdown(report), flush=True)
    return 0


def to_markdown(report: dict) -> str:
    lines = [
        "# Graphs that train.compile hands the compiler under DDP\n",
        env_markdown(report["env"], report["command"]),
        f"DDP buckets of {report['bucket_mb']} MiB; SD3.5-M built with {report['layers']} of its 24 blocks. "
        "All-reduces before the end: with the split off, the bucket all-reduces DDP launched before the backward "
        "left the last compiled block (overlap with the backward kept).\n",
        "| backbone | fp32 params MiB | compiled blocks | train.ddp_split_graphs | graphs | ops per graph "
        "| all-reduces before the backward's end / all |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ops = ", ".join(map(str, r["ops_per_graph"][:12])) + (" …" if len(r["ops_per_graph"]) > 12 else "")
        before = r["all_reduce_before_last_block_done"]
        ar = "–" if r["ddp_split_graphs"] or before is None else f"{before} / {r['all_reduce_total']}"
        lines.append(f"| {r['backbone']} | {r['fp32_param_mib']:.0f} | {r['compiled_blocks']} | "
                     f"{str(r['ddp_split_graphs']).lower()} | {r['graphs']} | {ops} | {ar} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
