"""Every convolution of the one-step path, alone: cuDNN against inductor's Triton convolution template.

Batch-1 one-step inference (SD 1.5 UNet + VAE decode, 512 px) spends half its kernel time in cuDNN convolutions
(docs/performance.md). Inductor's max-autotune can replace a convolution by a Triton template, but compiling and
autotuning the whole step that way has not finished within one 10-minute device call. This script takes the
convolutions one at a time instead:

1. it runs the UNet and the VAE decoder on the meta device (no memory, no compute) at the step's shapes and records
   every ``nn.Conv2d`` call: input shape, weight shape, stride, padding, and how often each occurs per image;
2. for each distinct convolution it times, on the GPU in bf16 and channels_last, cuDNN (eager, ``cudnn.benchmark``)
   and the convolution compiled by inductor with max-autotune restricted to its Triton template
   (``max_autotune_conv_backends="TRITON"``), each over the same input, ``--iters`` calls back to back in one CUDA
   graph (kernel time and the graph's launch gaps, as in the one-step path; no Python launch overhead). Without the
   biases by default: eager PyTorch adds a bias after cuDNN's kernel in a pass of its own, which the compiled step
   fuses into its next kernel (``--bias`` times them with it);
3. it sums both over the occurrences: the convolution time per image as cuDNN runs it, and as it would be if every
   convolution took the faster of the two.

That sum is a prediction from isolated timings, not a measurement of the step: in the step inductor fuses
neighbouring work into its kernels, and isolated GEMM timings already misled once (session 8: Triton GEMM templates
won 38 of 40 shapes alone, and the step got slower).

    python bench/conv_shapes.py --out $OUT --budget-s 480      # GPU, real sizes
    python bench/conv_shapes.py --tiny --out /tmp/b           # CPU smoke test (shapes only, nothing timed)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import env_markdown, environment, fmt, sd15_unet_config, sd15_vae_config, write_report

REPORT = "conv_shapes"


def conv_calls(tiny: bool, batch: int = 1) -> list[dict]:
    """Distinct ``nn.Conv2d`` calls of the UNet (t = 999, 77 prompt tokens) and the VAE decode, with their counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config(tiny))
        vae = AutoencoderKL(**sd15_vae_config(tiny))
    seen: dict[tuple, dict] = {}

    def hook(part):
        def record(module, args):
            x = args[0]
            bias = module.bias is not None
            key = (part, tuple(x.shape), tuple(module.weight.shape), module.stride, module.padding, bias)
            row = seen.setdefault(key, {"part": part, "input": list(x.shape), "weight": list(module.weight.shape),
                                        "stride": list(module.stride), "padding": list(module.padding),
                                        "bias": bias, "count": 0, "names": []})  # fmt: skip
            row["count"] += 1
            if len(row["names"]) < 3:
                row["names"].append(names[module])

        return record

    names = {m: n for part in (unet, vae) for n, m in part.named_modules()}
    handles = [m.register_forward_pre_hook(hook(part)) for part, model in (("unet", unet), ("decode", vae.decoder))
               for m in model.modules() if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    handles += [vae.post_quant_conv.register_forward_pre_hook(hook("decode"))]
    c, size = unet.config.in_channels, unet.config.sample_size
    z = torch.randn(batch, c, size, size, device="meta")
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device="meta")
    with torch.no_grad():
        unet(z, torch.full((batch,), 999, device="meta"), encoder_hidden_states=text)
        vae.decode(z)
    for h in handles:
        h.remove()
    rows = list(seen.values())
    for r in rows:
        n, cin, h, w = r["input"]
        cout, _, kh, kw = r["weight"]
        oh = (h + 2 * r["padding"][0] - kh) // r["stride"][0] + 1
        ow = (w + 2 * r["padding"][1] - kw) // r["stride"][1] + 1
        r["gflop"] = 2 * n * cout * oh * ow * cin * kh * kw / 1e9
    return sorted(rows, key=lambda r: -r["gflop"] * r["count"])


def graph_time_us(fn, device: torch.device, iters: int, repeats: int = 5) -> float:
    """µs per call of ``fn`` run ``iters`` times back to back inside one CUDA graph (median of ``repeats`` replays):
    kernel time and the graph's launch gaps, as in the one-step path, without Python's launch overhead."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # compile / autotune / cuDNN benchmarking happen outside the capture
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times[1:])


def time_conv(row: dict, device: torch.device, iters: int, bias: bool = False) -> dict:
    """cuDNN and the Triton template (inductor max-autotune, conv backend TRITON only) on the same bf16 NHWC input.

    ``bias``: pass the convolution's bias. Eager PyTorch adds it after cuDNN's kernel in a separate pass over the
    output, which the step does not pay (inductor fuses the add into the next kernel), while the template adds it in
    its epilogue; so by default both run without it."""
    torch.backends.cudnn.benchmark = True
    cl = torch.channels_last
    x = torch.randn(row["input"], device=device, dtype=torch.bfloat16).contiguous(memory_format=cl)
    w = (torch.randn(row["weight"], device=device, dtype=torch.bfloat16) * 0.02).contiguous(memory_format=cl)
    b = torch.randn(row["weight"][0], device=device, dtype=torch.bfloat16) if row["bias"] and bias else None
    stride, padding = tuple(row["stride"]), tuple(row["padding"])

    def conv(x, w, b):
        return F.conv2d(x, w, b, stride, padding)

    out: dict = {"cudnn_us": graph_time_us(lambda: conv(x, w, b), device, iters)}
    # Triton templates only for the convolution (inductor also gates its templates on the GEMM backends: keep those)
    options = {"max_autotune": True, "max_autotune_conv_backends": "TRITON"}
    torch._dynamo.reset()
    compiled = torch.compile(conv, options=options, dynamic=False)
    t0 = time.monotonic()
    try:
        ref = conv(x, w, b).float()
        got = compiled(x, w, b).float()
        out["compile_s"] = time.monotonic() - t0
        out["rel_err"] = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
        out["triton_us"] = graph_time_us(lambda: compiled(x, w, b), device, iters)
    except Exception as err:  # no valid template for this shape (e.g. too much shared memory): a result too
        out["triton_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs: list the shapes only (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20, help="calls per CUDA graph")
    parser.add_argument("--bias", action="store_true", help="time with the convolutions' biases (see time_conv)")
    parser.add_argument("--budget-s", type=float, default=480, help="stop timing new shapes after this")
    args = parser.parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    rows = conv_calls(args.tiny, args.batch)
    report = {"env": environment(device), "command": " ".join(["bench/conv_shapes.py", *sys.argv[1:]]),
              "batch": args.batch, "bias": args.bias, "rows": rows, "timed": device.type == "cuda"}  # fmt: skip
    if device.type == "cuda":
        for row in rows:
            if time.monotonic() - start > args.budget_s:
                row["skipped"] = "time budget"
                continue
            row.update(time_conv(row, device, args.iters, args.bias))
            print(f"{row['part']} {row['input']} * {row['weight']} x{row['count']}: cuDNN {row['cudnn_us']:.1f} us, "
                  f"Triton {row.get('triton_us', float('nan')):.1f} us {row.get('triton_error', '')}", flush=True)
            write_report(args.out, REPORT, report, to_markdown(report))
    report["totals"] = totals(rows)
    write_report(args.out, REPORT, report, to_markdown(report))
    print(to_markdown(report), flush=True)
    return report


def totals(rows: list[dict]) -> dict:
    """Per-image sums over the timed shapes, by part: cuDNN, and the faster of the two for each shape."""
    out: dict = {}
    for r in rows:
        if "cudnn_us" not in r:
            continue
        t = out.setdefault(r["part"], {"shapes": 0, "calls": 0, "cudnn_us": 0.0, "best_us": 0.0, "triton_wins": 0})
        best = min(r["cudnn_us"], r.get("triton_us", float("inf")))
        t["shapes"] += 1
        t["calls"] += r["count"]
        t["cudnn_us"] += r["count"] * r["cudnn_us"]
        t["best_us"] += r["count"] * best
        t["triton_wins"] += int(best < r["cudnn_us"])
    return out


def to_markdown(report: dict) -> str:
    bias = "with the biases (cuDNN: plus eager PyTorch's separate bias pass)" if report.get("bias") else "no bias"
    lines = ["# Every convolution of the one-step path alone: cuDNN against inductor's Triton template", "",
             env_markdown(report["env"], report["command"]), "",
             f"Batch {report['batch']}, bf16, channels_last, {bias}; µs per call (back to back in a CUDA graph). "
             "Count = calls per image. "
             "The sums are predictions from isolated timings, not a measurement of the step.", "",
             "| part | input | weight | stride | count | GFLOP | cuDNN µs | Triton µs | Triton / cuDNN | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        triton = fmt(r["triton_us"], ".1f") if "triton_us" in r else r.get("triton_error") or r.get("skipped", "–")
        ratio = fmt(r["triton_us"] / r["cudnn_us"], ".2f") if "triton_us" in r else "–"
        lines.append(f"| {r['part']} | {r['input']} | {r['weight']} | {r['stride'][0]} | {r['count']} | "
                     f"{r['gflop']:.1f} | {fmt(r.get('cudnn_us'), '.1f')} | {triton} | {ratio} | "
                     f"{fmt(r.get('compile_s'), '.0f')} |")  # fmt: skip
    for part, t in report.get("totals", {}).items():
        lines += ["", f"**{part}**: {t['shapes']} shapes timed ({t['calls']} calls per image): cuDNN "
                  f"{t['cudnn_us'] / 1e3:.3f} ms per image; each shape at the faster of the two "
                  f"{t['best_us'] / 1e3:.3f} ms (Triton faster for {t['triton_wins']} shapes)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
