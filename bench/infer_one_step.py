"""Benchmark: one-step SD 1.5 Student inference at 512 px (UNet at t = 999, x0 formula, VAE decode).

Every variant runs :class:`crossdistill.export.fast.OneStepRunner` with one set of options; the first variant
(all options off, bf16) is the eager diffusers baseline, measured in the same run. Random weights at the real
SD 1.5 sizes. Goals (issue 7): batch 1 ≤ 10 ms; batch 8 ≥ 2× the eager images/s.

    PYTHONUNBUFFERED=1 python bench/infer_one_step.py --out $OUT          # GPU, real sizes
    python bench/infer_one_step.py --tiny --out /tmp/bench                 # CPU smoke test, tiny configs
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from common import (
    Clock,
    build,
    count_flops,
    env_markdown,
    environment,
    matmul_tflops,
    sd15_unet_config,
    sd15_vae_config,
    time_ms,
    write_report,
)
from crossdistill.export.fast import FastPathOptions, OneStepRunner


@dataclass(kw_only=True)
class Variant:
    name: str
    options: FastPathOptions
    cost_s: float  # rough wall time of the variant at real size, compile included: skipped when it would not fit


# (name, options that differ from the eager bf16 NCHW baseline, rough cost in s at real size with compile)
VARIANTS: list[tuple[str, dict, float]] = [
    ("eager (diffusers baseline)", {}, 15),
    ("eager + channels_last", dict(channels_last=True), 15),
    ("eager + cuda_graphs", dict(cuda_graphs=True), 15),
    ("eager + cuda_graphs + channels_last", dict(cuda_graphs=True, channels_last=True), 15),
    ("compile + cuda_graphs + channels_last", dict(compile="default", cuda_graphs=True, channels_last=True), 150),
    ("compile + channels_last (no graphs)", dict(compile="default", channels_last=True), 60),
    ("compile + cuda_graphs (NCHW)", dict(compile="default", cuda_graphs=True), 120),
    ("compile + cuda_graphs + channels_last, fp16", dict(compile="default", cuda_graphs=True, channels_last=True,
                                                         dtype="float16"), 120),
    ("compile reduce-overhead + channels_last", dict(compile="reduce-overhead", channels_last=True), 60),
    ("compile max-autotune-no-cudagraphs + cuda_graphs + channels_last",
     dict(compile="max-autotune-no-cudagraphs", cuda_graphs=True, channels_last=True), 300),
]  # fmt: skip


def variants() -> list[Variant]:
    """Eager baseline first, then each option alone, then the combinations; compile-heavy ones last."""
    base = dict(dtype="bfloat16", channels_last=False, compile=None, cuda_graphs=False)
    return [Variant(name=n, options=FastPathOptions(**(base | kw)), cost_s=c) for n, kw, c in VARIANTS]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=30, help="timed calls per variant and batch size")
    parser.add_argument("--budget-s", type=float, default=480, help="skip variants that would end after this")
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose name contains one of these")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = Clock(args.budget_s)
    # Each variant × batch size is one compiled specialisation; the default limit (8) would fall back to eager.
    torch._dynamo.config.cache_size_limit = 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet = build(UNet2DConditionModel, sd15_unet_config(args.tiny), device, dtype)
    vae = build(AutoencoderKL, sd15_vae_config(args.tiny), device, dtype)
    h = unet.config.sample_size
    gen = torch.Generator(device).manual_seed(0)
    inputs = {
        b: (
            torch.randn(b, 77, unet.config.cross_attention_dim, device=device, generator=gen),
            torch.randn(b, 4, h, h, device=device, generator=gen),
        )
        for b in args.batch_sizes
    }
    env = environment(device)
    env["bf16_matmul_tflops"] = matmul_tflops(device)
    print(env, flush=True)

    # FLOPs per image (batch 1) of the two parts: the floor every variant is measured against.
    embeds1, noise1 = inputs[args.batch_sizes[0]][0][:1], inputs[args.batch_sizes[0]][1][:1]
    with torch.no_grad():
        t = torch.full((1,), 999, device=device)
        flops_unet = count_flops(lambda: unet(noise1.to(dtype), t, encoder_hidden_states=embeds1.to(dtype)))
        flops_vae = count_flops(lambda: vae.decode(noise1.to(dtype)))
    flops = {"unet_tflop": flops_unet / 1e12, "vae_decode_tflop": flops_vae / 1e12}
    floor_ms = (flops_unet + flops_vae) / (env["bf16_matmul_tflops"] * 1e12) * 1e3
    flops["floor_ms_per_image"] = floor_ms
    print(flops, flush=True)

    selected = [v for v in variants() if args.only is None or any(s in v.name for s in args.only)]
    results, reference = [], {}
    for variant in selected:
        row = {"name": variant.name, "options": asdict(variant.options), "batches": {}}
        results.append(row)
        if not args.tiny and not clock.allows(variant.cost_s):
            row["skipped"] = f"time budget ({clock.elapsed():.0f} s used of {args.budget_s:.0f} s)"
            print(f"skip {variant.name}: {row['skipped']}", flush=True)
            continue
        try:
            runner = OneStepRunner(unet, vae, options=variant.options, device=device)
            for b, (embeds, noise) in inputs.items():
                t0 = time.monotonic()
                out = runner(embeds, noise)
                torch.cuda.synchronize() if device.type == "cuda" else None
                first_s = time.monotonic() - t0
                reference.setdefault(b, out)
                timing = time_ms(lambda r=runner, e=embeds, n=noise: r(e, n), device, warmup=3, iters=args.iters)
                row["batches"][b] = timing | {
                    "images_per_s": b / (timing["ms"] * 1e-3),
                    "first_call_s": first_s,
                    "rel_err_vs_eager": rel_err(out, reference[b]),
                    "finite": bool(torch.isfinite(out).all()),
                }
                print(f"{variant.name} | batch {b}: {timing['ms']:.2f} ms (first call {first_s:.1f} s)", flush=True)
        except Exception as err:  # a failing option is a result too; the other variants still run
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            print(f"FAILED {variant.name}: {row['error']}", flush=True)
        runner = None
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = results[0]["batches"]
    for row in results:
        for b, r in row["batches"].items():
            if b in base:
                r["speedup_vs_eager"] = base[b]["ms"] / r["ms"]
    report = {"env": env, "flops": flops, "results": results, "command": " ".join(sys.argv)}
    write_report(args.out, "infer_one_step", report, to_markdown(report))
    print(to_markdown(report), flush=True)
    return 0


def to_markdown(report: dict) -> str:
    fl = report["flops"]
    lines = [
        "# One-step SD 1.5 inference, 512 px (UNet t=999 + x0 + VAE decode), random weights\n",
        env_markdown(report["env"], report["command"]),
        f"FLOPs per image: UNet {fl['unet_tflop']:.2f} TFLOP + VAE decode {fl['vae_decode_tflop']:.2f} TFLOP; "
        f"floor at the measured bf16 matmul rate ({report['env']['bf16_matmul_tflops']:.0f} TFLOP/s): "
        f"{fl['floor_ms_per_image']:.2f} ms per image.\n",
        "| variant | batch | ms / batch | images/s | × eager | first call s | rel. err vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['name']} | – | {row.get('skipped') or row['error'][:120]} | | | | |")
        for b, r in row["batches"].items():
            lines.append(
                f"| {row['name']} | {b} | {r['ms']:.2f} | {r['images_per_s']:.1f} "
                f"| {r.get('speedup_vs_eager', 0):.2f} "
                f"| {r['first_call_s']:.1f} | {r['rel_err_vs_eager']:.1e}{'' if r['finite'] else ' (non-finite!)'} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
