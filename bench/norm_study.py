"""Study: what the VAE decode's GroupNorms and its wide-head attention cost, and what the fast path's options save.

Two parts, each with the stock modules as the in-run baseline:
1. GroupNorm + SiLU alone, compiled, at the SD 1.5 decoder's (and UNet's) activation shapes, NHWC and NCHW: stock
   ``F.group_norm`` against :func:`crossdistill.models.groupnorm.channel_stats_group_norm`, with the bandwidth each
   reaches (one read + one write of the activation, bf16). Times include a compiled call's Python overhead (tens of
   µs), so the small shapes are launch-bound; read the large ones.
2. The decode part (VAE decode + clamp) and the UNet part (UNet + x0) of :class:`OneStepRunner`, compiled and captured
   exactly as the full step, with ``channel_stats_norm`` / ``wide_head_attention`` on and off, each with a kernel
   profile (kinds of CUDA kernels) at batch 1.

    PYTHONUNBUFFERED=1 python bench/norm_study.py --out $OUT        # GPU, real sizes (~6 minutes on an H100)
    python bench/norm_study.py --tiny --out /tmp/bench               # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from common import (
    Clock,
    build,
    env_markdown,
    environment,
    fmt,
    sd15_unet_config,
    sd15_vae_config,
    time_ms,
    write_report,
)
from crossdistill.export.fast import SD15_SCALE, FastPathOptions
from crossdistill.models.groupnorm import channel_stats_group_norm
from infer_one_step import DecodePart, UNetPart, first_call_and_timing, profile_step, rel_err, release, restore

REPORT = "norm_study"
SHAPES = [(1, 512, 64, 64), (1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 256, 256), (1, 256, 512, 512),
          (1, 128, 512, 512), (8, 128, 512, 512), (1, 320, 64, 64), (1, 1280, 8, 8)]  # fmt: skip
STOCK = dict(channel_stats_norm=False, wide_head_attention=False)
# (part, name, options, batch sizes, profile at batch 1)
PARTS = [
    ("decode", "stock", STOCK, (1, 8), True),
    ("decode", "channel_stats_norm", STOCK | dict(channel_stats_norm=True), (1, 8), True),
    ("decode", "channel_stats_norm + wide_head_attention", dict(), (1, 8), True),
    ("decode", "wide_head_attention", STOCK | dict(wide_head_attention=True), (1, 8), False),
    ("unet", "stock", STOCK, (1,), True),
    ("unet", "channel_stats_norm", STOCK | dict(channel_stats_norm=True), (1,), True),
]


def group_norm_micro(device: torch.device, shapes: list[tuple]) -> list[dict]:
    rows = []
    for shape in shapes:
        c = shape[1]
        w, b = (torch.randn(c, device=device, dtype=torch.bfloat16) for _ in range(2))
        x = torch.randn(shape, device=device, dtype=torch.bfloat16) * 2 + 1
        ref = F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), 1e-6))
        row: dict = {"shape": shape}
        for name, layout, norm in [
            ("stock_nhwc", torch.channels_last, F.group_norm),
            ("stock_nchw", torch.contiguous_format, F.group_norm),
            ("chstats_nhwc", torch.channels_last, channel_stats_group_norm),
            ("chstats_nchw", torch.contiguous_format, channel_stats_group_norm),
        ]:
            xi = x.contiguous(memory_format=layout)
            f = lambda t, norm=norm, w=w, b=b: F.silu(norm(t, 32, w, b, 1e-6))  # noqa: E731
            f = torch.compile(f, dynamic=False) if device.type == "cuda" else f  # CPU (smoke test): eager
            out = f(xi)
            t = time_ms(lambda f=f, xi=xi: f(xi), device, warmup=3, iters=20)
            row[name] = {"ms": t["ms"], "GBps": 2 * x.numel() * 2 / (t["ms"] * 1e-3) / 1e9,
                         "max_err": float((out.float() - ref).abs().max())}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    torch._dynamo.reset()
    return rows


def to_markdown(report: dict) -> str:
    lines = ["# GroupNorm and wide-head attention in the one-step path (SD 1.5, 512 px)\n",
             env_markdown(report["env"], report["command"])]  # fmt: skip
    if report.get("note"):
        lines.append(report["note"] + "\n")
    lines += ["## GroupNorm + SiLU, compiled, bf16: µs per call (GB/s of one read + one write)\n",
              "| shape | stock NHWC | stock NCHW | per-channel stats NHWC | per-channel stats NCHW |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in report.get("gn_micro", []):
        cells = [f"{r[k]['ms'] * 1e3:.0f} ({r[k]['GBps']:.0f})" for k in
                 ("stock_nhwc", "stock_nchw", "chstats_nhwc", "chstats_nchw")]  # fmt: skip
        lines.append(f"| {'×'.join(map(str, r['shape']))} | " + " | ".join(cells) + " |")
    lines += ["\n## Parts of the one-step path, compiled + CUDA graph, channels_last, bf16\n",
              "| part | options | batch 1 ms | batch 8 ms | rel. diff. to stock | busy ms (b1 profile) "
              "| kernel kinds (b1) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in report.get("parts", {}).items():
        part, name = key.split(" | ")
        b1, b8 = row.get("1", {}), row.get("8", {})
        prof = row.get("profile", {})
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in prof.get("by_kind", {}).items() if v >= 0.01)
        err, busy = b1.get("rel_err_vs_first"), prof.get("busy_ms_per_call")
        lines.append(
            f"| {part} | {name} | {fmt(b1.get('ms'), '.2f')} | {fmt(b8.get('ms'), '.2f')} | {fmt(err, '.1e')} "
            f"| {fmt(busy, '.2f')} | {kinds} |" + (f" error: {row['error'][:200]}" if "error" in row else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--budget-s", type=float, default=540, help="skip the UNet parts after this")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.config.cache_size_limit = 64
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    clock = Clock(args.budget_s)
    report: dict = {"env": environment(device), "command": " ".join(sys.argv), "parts": {}}

    def save() -> None:
        write_report(args.out, REPORT, report, to_markdown(report))

    report["gn_micro"] = group_norm_micro(device, [(1, 64, 8, 8)] if args.tiny else SHAPES)
    save()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet = build(UNet2DConditionModel, sd15_unet_config(args.tiny), device, dtype)
    vae = build(AutoencoderKL, sd15_vae_config(args.tiny), device, dtype)
    gen = torch.Generator(device).manual_seed(0)
    h, d = unet.config.sample_size, unet.config.cross_attention_dim
    inputs = {b: (torch.randn(b, 77, d, device=device, generator=gen),
                  torch.randn(b, 4, h, h, device=device, generator=gen)) for b in (1, 8)}  # fmt: skip
    firsts: dict[tuple, torch.Tensor] = {}
    for part, name, options, batches, prof in PARTS:
        if part == "unet" and not args.tiny and not clock.allows(100):
            print(f"skip {part} {name}: time budget", flush=True)
            continue
        row = report["parts"].setdefault(f"{part} | {name}", {})
        cls, scale = (DecodePart, SD15_SCALE) if part == "decode" else (UNetPart, 1.0)
        try:
            runner = cls(unet, vae, options=FastPathOptions(**options), device=device)
            for b in batches:
                embeds, noise = inputs[b]
                out, row[str(b)] = first_call_and_timing(runner, embeds, noise * scale, device, 30)
                if (part, b) in firsts:  # the part's first (stock) variant is the reference
                    row[str(b)]["rel_err_vs_first"] = rel_err(out, firsts[(part, b)])
                else:
                    firsts[(part, b)] = out
                print(part, name, b, row[str(b)], flush=True)
                save()
            if prof:
                embeds, noise = inputs[1]
                row["profile"] = profile_step(runner, embeds, noise * scale, device, top=40)
        except Exception as err:  # a failing part is a result too
            row["error"] = f"{type(err).__name__}: {err}"[:3000]
            print("FAILED", part, name, row["error"], flush=True)
        runner = None
        restore(unet, vae)
        release(device)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
