"""Benchmark: one-step SD 1.5 Student inference at 512 px (UNet at t = 999, x0 formula, VAE decode).

Every variant runs :class:`crossdistill.export.fast.OneStepRunner` with one set of options; the first variant
(all options off, bf16) is the eager diffusers baseline, measured in the same run, and the second is the library
default (compile + our CUDA graphs + channels_last + per-channel GroupNorm statistics + matmul attention for the
VAE's wide head + the time embedding as constants + one GEMM for every cross-attention's keys and values + fused
self-attention q/k/v + cuDNN timing every algorithm), so new options compare against both in one run. Random
weights at the real SD 1.5 sizes. cuDNN keeps its first choice per convolution shape for the whole process: a variant
with another ``cudnn_benchmark_limit`` than an earlier one in the same run reuses that choice (the report notes it),
so such variants run in a process of their own (``--only NAME --focus NAME``).
Goals (issue 7): batch 1 ≤ 10 ms; batch 8 ≥ 2× the eager images/s.

Right after the default variant (cheapest first):
- ``--profile`` (batch 1): torch.profiler over 10 calls of the default's compiled step *without* our CUDA
  graph (same compiled code, so nothing recompiles), top CUDA kernels by total time;
- ``--split``: the UNet part (UNet + x0 formula) and the decode part (VAE decode + clamp) timed separately at each
  batch size, each compiled and graph-captured exactly as the full step, with their FLOPs and floors.

The report (json + md) is rewritten after every variant, so a run cut off by a time limit keeps what it measured.
Variants already measured and beaten (docs/performance.md) are not in the default list: ``--all`` runs them too,
``--only`` picks any by name (the eager baseline always runs first).

    PYTHONUNBUFFERED=1 python bench/infer_one_step.py --out $OUT --budget-s 530   # GPU, real sizes
    python bench/infer_one_step.py --tiny --out /tmp/bench                         # CPU smoke test, tiny configs
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from common import (
    Clock,
    build,
    count_flops,
    device_kernels,
    env_markdown,
    environment,
    kernel_kind,
    matmul_tflops,
    sd15_unet_config,
    sd15_vae_config,
    sync,
    time_ms,
    write_report,
)
from crossdistill.export.fast import SD15_SCALE, FastPathOptions, OneStepRunner, has_inductor_setting
from crossdistill.models.constant_time import disable_constant_time_projection
from crossdistill.models.cross_kv import disable_shared_cross_kv
from crossdistill.models.groupnorm import disable_channel_stats_group_norm
from crossdistill.models.narrow_conv import disable_padded_narrow_convs
from crossdistill.models.subpixel import disable_subpixel_upsample
from crossdistill.models.wide_attention import disable_wide_head_matmul_attention

REPORT = "infer_one_step"


@dataclass(kw_only=True)
class Variant:
    name: str
    options: FastPathOptions
    cost_s: float  # rough wall time of the variant at real size, compile included: skipped when it would not fit
    default: bool = False  # the library default: profile and split run right after it (unless --focus)


# Plain diffusers: every option that changes what runs is off (cuDNN's benchmarking stays on, with torch's limit).
# Sessions 14 and 15 (until this line listed them) ran it with constant_time_embedding on: ~24 fewer eager launches
# of the time MLP and projections, so their eager figures are, if anything, a little fast.
EAGER = dict(dtype="bfloat16", channels_last=False, compile=None, cuda_graphs=False, channel_stats_norm=False,
             wide_head_attention=False, fuse_qkv=False, subpixel_upsample=False, pad_narrow_convs=False,
             constant_time_embedding=False, shared_cross_kv=False, cudnn_benchmark_limit=None)  # fmt: skip
DEFAULT = asdict(FastPathOptions())  # the library default
FUSE = dict(fuse_qkv=True)
TUNING = dict(inductor_tuning=True)
SUB = dict(subpixel_upsample=True)
PDL = dict(inductor_config={"triton.enable_pdl": True})
HAS_PDL = has_inductor_setting("triton.enable_pdl")  # an inductor setting of torch 2.11 and later
NO_CONST_T = dict(constant_time_embedding=False)
# The default before session 15 (2026-11-27): its cuDNN choices need a process of their own (see the variant table)
S14 = dict(shared_cross_kv=False, fuse_qkv=False, cudnn_benchmark_limit=None)
# inductor's horizontal fusion: independent small Triton kernels launched as one (fewer launches at batch 1)
COMBO = dict(inductor_config={"combo_kernels": True})
HAS_COMBO = has_inductor_setting("combo_kernels")

# Costs: on the 16-core H100 machine a cold compile in mode "default" took ~65 s per batch size (two sizes here);
# coordinate-descent tuning compiles and benchmarks variants of every Triton kernel, max-autotune also every
# conv/GEMM template, several times longer. Later compiles of the same kernels hit inductor's caches.
# cuDNN keeps its first algorithm choice per convolution shape for the life of the process (the key holds no
# cudnn_benchmark_limit), so variants with another limit than the default's compare in processes of their own:
# --only "<name>" --focus "<name>" runs the eager baseline (NCHW: shapes of its own) and that variant alone.
MAIN_VARIANTS: list[tuple[str, dict, float]] = [
    ("eager (diffusers baseline)", EAGER, 15),
    ("compile + cuda_graphs + channels_last + channel_stats_norm + wide_head_attention + constant_time_embedding "
     "+ shared_cross_kv + fuse_qkv + cudnn_benchmark_limit=0 (default)", DEFAULT, 190),
    # fuse_qkv beside shared_cross_kv fuses only the self-attentions: a tie (9.94–10.08 vs 10.01–10.08 ms)
    ("default without fuse_qkv", DEFAULT | dict(fuse_qkv=False), 190),
    # sub-pixel upsampling: a tie at batch 1 (10.24–10.26 vs 10.16–10.17 ms, session 15), +4.5% images/s at batch 8
    ("default + subpixel_upsample", DEFAULT | SUB, 190),
    ("default + subpixel_upsample + inductor_tuning", DEFAULT | SUB | TUNING, 400),
    ("compile max-autotune-no-cudagraphs + cuda_graphs + channels_last + fuse_qkv + inductor_tuning",
     DEFAULT | dict(compile="max-autotune-no-cudagraphs") | FUSE | TUNING, 900),
]  # fmt: skip
# Measured on the H100 (docs/performance.md) and slower than the default, or a tie: only with --all or --only.
EXTRA_VARIANTS: list[tuple[str, dict, float]] = [
    # With another cudnn_benchmark_limit than the default's: a process of their own each (--only NAME --focus NAME).
    # H100, session 15: 9.88–9.98 ms at batch 1 in three processes, against 10.08 without the limit (the same machine)
    ("default without cudnn_benchmark_limit=0 (a process of its own)",
     DEFAULT | dict(cudnn_benchmark_limit=None), 150),
    # the session-14 default: 10.11–10.29 ms at batch 1 (H100, six runs on three machines)
    ("the default until 2026-11-27, session 14 (without shared_cross_kv, fuse_qkv, cudnn_benchmark_limit=0; a process "
     "of its own)", DEFAULT | S14, 150),
    ("default without channel_stats_norm, wide_head_attention (the default until 2026-11-26)",
     DEFAULT | S14 | dict(channel_stats_norm=False, wide_head_attention=False), 150),
    ("default + inductor_tuning", DEFAULT | TUNING, 400),
    ("the default of session 13 (also without constant_time_embedding)", DEFAULT | S14 | NO_CONST_T, 150),
    ("eager + channels_last", EAGER | dict(channels_last=True), 15),
    ("eager + cuda_graphs", EAGER | dict(cuda_graphs=True), 15),
    ("eager + cuda_graphs + channels_last", EAGER | dict(cuda_graphs=True, channels_last=True), 15),
    ("compile + channels_last (no graphs)", EAGER | dict(compile="default", channels_last=True), 150),
    ("compile + cuda_graphs (NCHW)", EAGER | dict(compile="default", cuda_graphs=True), 150),
    ("compile + cuda_graphs + channels_last, fp16", DEFAULT | dict(dtype="float16"), 150),
    ("compile reduce-overhead + channels_last", EAGER | dict(compile="reduce-overhead", channels_last=True), 150),
    ("compile max-autotune-no-cudagraphs + cuda_graphs + channels_last",
     DEFAULT | dict(compile="max-autotune-no-cudagraphs"), 700),
    ("default + conv_1x1_as_mm", DEFAULT | dict(inductor_config={"conv_1x1_as_mm": True}), 150),
    ("default + freezing", DEFAULT | dict(inductor_config={"freezing": True}), 150),
    # Triton GEMM templates autotuned against cuBLAS, with their epilogues fused (no coordinate descent); then the
    # same for the convolutions too.
    ("default + max_autotune_gemm", DEFAULT | dict(inductor_config={"max_autotune_gemm": True}), 400),
    ("default + max_autotune", DEFAULT | dict(inductor_config={"max_autotune": True}), 600),
    # GEMM templates only, the convolutions kept on cuDNN: 11.05 ms at batch 1 against the default's 10.29 (H100,
    # session 8; its autotuning took two calls' time, ~10 minutes)
    ("default + GEMM autotune, convs on cuDNN",
     DEFAULT | dict(inductor_config={"max_autotune_gemm": True, "max_autotune_conv_backends": "ATEN"}), 400),
    # Exact channel padding of the 3/4-channel convs; programmatic dependent launch of inductor's Triton kernels (a
    # kernel's launch overlaps the end of the one before it; needs a torch with that setting, Hopper or newer).
    # H100, session 9, batch 1: padding 10.49 ms, padding + PDL 10.37 and 10.53 ms (the run's "default + PDL" row
    # kept the padding: restore() did not undo it yet) against the default's 10.43: ties.
    ("default + pad_narrow_convs", DEFAULT | dict(pad_narrow_convs=True), 150),
    *([("default + PDL", DEFAULT | PDL, 150), ("default + pad_narrow_convs + PDL",
       DEFAULT | dict(pad_narrow_convs=True) | PDL, 150)] if HAS_PDL else []),
    # The decode compiled as its own graph (the UNet + x0 keep the default): alone, as the control for the split,
    # and with max-autotune, whose Triton convolution templates timed alone beat cuDNN on some decoder shapes
    # (bench/conv_shapes.py); autotuning the decoder's ~15 conv shapes costs far less than the whole step's.
    ("default, decode compiled apart", DEFAULT | dict(decode_inductor_config={"max_autotune": False}), 150),
    ("default + decode max_autotune", DEFAULT | dict(decode_inductor_config={"max_autotune": True}), 400),
    *([("default + decode max_autotune + PDL", DEFAULT | PDL | dict(decode_inductor_config={"max_autotune": True}),
        400)] if HAS_PDL else []),
    # Fewer launches at batch 1 (H100, session 14, one run): with constant_time_embedding 10.24 ms against its
    # 10.16, without it 10.26 against 10.42: the time embedding's kernels were the gain, not the horizontal fusion.
    *([("default + combo_kernels", DEFAULT | COMBO, 150),
       ("default without constant_time_embedding + combo_kernels", DEFAULT | NO_CONST_T | COMBO, 150)]
      if HAS_COMBO else []),
]  # fmt: skip
SPLIT_COST_S = 140  # two more compiled + captured graphs (UNet part, decode part) per batch size
PROFILE_COST_S = 15


def variants(
    all_variants: bool = False, only: list[str] | None = None, focus: str | None = None, skip: list[str] | None = None
) -> list[Variant]:
    """Eager baseline first, the library default second, then the rest cheapest first (compile-heavy ones last).

    ``skip``: leave out the variants (not the baseline, not the default) whose name contains one of these.

    ``focus``: the variant (exact name) whose options the split and the profile use, instead of the default."""
    table = MAIN_VARIANTS + (EXTRA_VARIANTS if all_variants or only is not None else [])
    if focus is not None and focus not in (n for n, _, _ in table):
        raise SystemExit(f"--focus {focus!r} names no variant; choose one of: {', '.join(n for n, _, _ in table)}")
    rows = [
        Variant(name=n, options=FastPathOptions(**kw), cost_s=c, default=n == focus if focus else i == 1)
        for i, (n, kw, c) in enumerate(table)
    ]
    head, rest = rows[:2], sorted(rows[2:], key=lambda v: v.cost_s)
    picked = head + rest
    if only is not None:  # the eager baseline always runs: every speed-up is against it
        picked = [picked[0]] + [v for v in picked[1:] if v.default or any(s in v.name for s in only)]
    if skip:
        picked = [picked[0]] + [v for v in picked[1:] if v.default or not any(s in v.name for s in skip)]
    return picked


class UNetPart(OneStepRunner):
    """The runner's UNet + x0 formula only (float32 latents out), compiled and captured like the full step."""

    def _eager_step(self, prompt_embeds: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._x0(prompt_embeds, noise)


class DecodePart(OneStepRunner):
    """The runner's VAE decode + clamp only: its ``noise`` argument is taken as the x0 latents."""

    def _eager_step(self, prompt_embeds: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._decode(noise)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


CUDNN_LIMIT = torch.backends.cudnn.benchmark_limit  # torch's own, before any runner


def restore(unet, vae) -> None:
    """Undo what a runner did to the shared modules in place (fused q/k/v, sub-pixel upsamplers, norms, processors,
    padded convolutions, constant time projections, shared cross-attention keys/values): every variant starts from
    the stock modules."""
    for m in (unet, vae):
        fused = any(type(p).__name__ == "FusedAttnProcessor2_0" for p in m.attn_processors.values())
        if fused and getattr(m, "original_attn_processors", None):
            m.unfuse_qkv_projections()  # the processors only: the fused Linears stay, unused, until removed below
        for a in m.modules():
            if isinstance(a, Attention) and getattr(a, "fused_projections", False):
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(a, name):
                        delattr(a, name)
                a.fused_projections = False
        disable_subpixel_upsample(m)
        disable_channel_stats_group_norm(m)
        disable_wide_head_matmul_attention(m)
        disable_padded_narrow_convs(m)
    disable_constant_time_projection(unet)
    disable_shared_cross_kv(unet)
    torch.backends.cudnn.benchmark_limit = CUDNN_LIMIT  # a global a runner may have set


def release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_call_and_timing(runner, embeds, noise, device: torch.device, iters: int) -> tuple[torch.Tensor, dict]:
    t0 = time.monotonic()
    out = runner(embeds, noise)
    sync(device)
    first_s = time.monotonic() - t0
    timing = time_ms(lambda: runner(embeds, noise), device, warmup=3, iters=iters)
    return out, timing | {"first_call_s": first_s, "finite": bool(torch.isfinite(out).all())}


@torch.no_grad()  # the compiled step was traced under no_grad: calling it with grad on would recompile
def profile_step(runner: OneStepRunner, embeds, noise, device: torch.device, calls: int = 10, top: int = 25) -> dict:
    """Top kernels of ``calls`` calls of the runner's step as compiled, without its CUDA graph (kernels visible).

    On a CPU (no kernels) the table lists operators by self CPU time instead, so the code path is exercised.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    embeds, noise = embeds.to(device), noise.to(device, torch.float32)
    step = runner._step  # compiled (on CUDA) for exactly these shapes by the timed calls: no recompilation
    uncaptured = time_ms(lambda: step(embeds, noise), device, warmup=2, iters=calls)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step(embeds, noise)
        sync(device)
    what = "CUDA kernels" if cuda else "CPU operators (no GPU)"
    by_name: dict[str, dict] = {}  # kernels, copies and fills, by name (common.device_kernels: no annotations)
    for name, start, end in device_kernels(prof.events()) if cuda else []:
        row = by_name.setdefault(name, {"name": name, "count": 0, "total_us": 0.0})
        row["count"], row["total_us"] = row["count"] + 1, row["total_us"] + end - start
    rows = list(by_name.values())
    if not rows:  # CPU, or a profiler that lists no kernel events: operators by their own (device or CPU) time
        what = "operators by self device time" if cuda else what
        rows = [
            {"name": e.key, "count": e.count, "total_us": e.self_device_time_total if cuda else e.self_cpu_time_total}
            for e in prof.key_averages()
        ]
        rows = [r for r in rows if r["total_us"] > 0]
    total_us = sum(r["total_us"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["total_us"])
    kinds: dict[str, float] = {}
    for r in rows:
        r["kind"] = kernel_kind(r["name"]) if what == "CUDA kernels" else "operator"
        r["per_call"] = r["count"] / calls
        r["ms_per_call"] = r["total_us"] / calls / 1e3
        r["share"] = r["total_us"] / total_us
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["share"]
    return {
        "what": what,
        "calls": calls,
        "batch": noise.shape[0],
        "uncaptured_step_ms": uncaptured["ms"],
        "busy_ms_per_call": total_us / calls / 1e3,
        "distinct": len(rows),
        "events_per_call": sum(r["count"] for r in rows) / calls,
        "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [r | {"name": r["name"][:300]} for r in rows[:top]],
    }


def measure_split(
    unet, vae, inputs: dict, device: torch.device, iters: int, flops: dict, rate: float, options: FastPathOptions
) -> dict:
    """UNet part and decode part of ``options``, each compiled and captured exactly as the full step."""
    split: dict = {}
    parts = (
        ("unet", UNetPart, flops["unet_tflop"], lambda e, n: (e, n)),
        ("decode", DecodePart, flops["vae_decode_tflop"], lambda e, n: (e, n * SD15_SCALE)),  # unit-variance latents
    )
    for part, cls, tflop, make_inputs in parts:
        row = split.setdefault(part, {"tflop_per_image": tflop, "batches": {}})
        try:
            runner = cls(unet, vae, options=options, device=device)
            for b, (embeds, noise) in inputs.items():
                _, timing = first_call_and_timing(runner, *make_inputs(embeds, noise), device, iters)
                floor_ms = tflop * 1e12 * b / rate * 1e3  # tflop is in TFLOP, rate in FLOP/s
                row["batches"][b] = timing | {"floor_ms": floor_ms, "floor_fraction": floor_ms / timing["ms"]}
                print(f"split {part} | batch {b}: {timing['ms']:.2f} ms (floor {floor_ms:.2f} ms, "
                      f"first call {timing['first_call_s']:.1f} s)", flush=True)  # fmt: skip
        except Exception as err:  # a failing part is a result too
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            print(f"FAILED split {part}: {row['error']}", flush=True)
        runner = None
        restore(unet, vae)
        release(device)
    return split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=None, help="timed calls per variant and batch size (30; tiny: 3)")
    parser.add_argument("--budget-s", type=float, default=480, help="skip variants that would end after this")
    parser.add_argument("--cost-scale", type=float, default=1.0, help="scale the cost estimates (warm caches: <1)")
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose name contains one of these")
    parser.add_argument(
        "--skip", nargs="*", default=None, help="leave out variants whose name contains one of these (after --only)"
    )
    parser.add_argument("--all", action="store_true", help="also the variants already measured and beaten")
    parser.add_argument("--focus", default=None,
                        help="the variant (exact name) whose options the split and the profile use; default: "
                             "the library default")  # fmt: skip
    parser.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                        help="time the UNet part and the decode part of the default separately")  # fmt: skip
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile the default's compiled step (first batch size, no CUDA graph)")  # fmt: skip
    args = parser.parse_args(argv)
    args.iters = args.iters or (3 if args.tiny else 30)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # As torch.compile does for its own CUDA graphs on some CUDA versions: no CUPTI teardown after the profiler
        # (its re-initialisation can crash with CUDA graphs captured later in the process).
        os.environ.setdefault("TEARDOWN_CUPTI", "0")
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
    rate = env["bf16_matmul_tflops"] * 1e12
    print(env, flush=True)

    # FLOPs per image (batch 1) of the two parts: the floor every variant is measured against.
    embeds1, noise1 = inputs[args.batch_sizes[0]][0][:1], inputs[args.batch_sizes[0]][1][:1]
    with torch.no_grad():
        t = torch.full((1,), 999, device=device)
        flops_unet = count_flops(lambda: unet(noise1.to(dtype), t, encoder_hidden_states=embeds1.to(dtype)))
        flops_vae = count_flops(lambda: vae.decode(noise1.to(dtype)))
    flops = {"unet_tflop": flops_unet / 1e12, "vae_decode_tflop": flops_vae / 1e12}
    flops["floor_ms_per_image"] = (flops_unet + flops_vae) / rate * 1e3
    print(flops, flush=True)

    selected = variants(args.all, args.only, args.focus, args.skip)
    results: list[dict] = []
    report = {"env": env, "flops": flops, "results": results, "command": " ".join(sys.argv)}
    if note := cudnn_limit_note(selected):
        report["notes"] = [note]
        print(f"note: {note}", flush=True)

    def save() -> None:
        add_speedups(results)
        write_report(args.out, REPORT, report, to_markdown(report))

    def fits(name: str, cost_s: float) -> str | None:
        """None if ``cost_s`` (scaled) still fits the budget, else the reason it is skipped."""
        if args.tiny or clock.allows(cost_s * args.cost_scale):
            return None
        reason = f"time budget ({clock.elapsed():.0f} s used of {args.budget_s:.0f} s, needs ~{cost_s:.0f} s)"
        print(f"skip {name}: {reason}", flush=True)
        return reason

    save()
    reference: dict[int, torch.Tensor] = {}
    for variant in selected:
        row = {"name": variant.name, "options": asdict(variant.options), "batches": {}}
        results.append(row)
        if reason := fits(variant.name, variant.cost_s):
            row["skipped"] = reason
            save()
            continue
        runner = None
        t_variant = time.monotonic()
        try:
            runner = OneStepRunner(unet, vae, options=variant.options, device=device)
            for b, (embeds, noise) in inputs.items():
                out, timing = first_call_and_timing(runner, embeds, noise, device, args.iters)
                reference.setdefault(b, out)
                row["batches"][b] = timing | {
                    "images_per_s": b / (timing["ms"] * 1e-3),
                    "rel_err_vs_eager": rel_err(out, reference[b]),
                }
                print(f"{variant.name} | batch {b}: {timing['ms']:.2f} ms "
                      f"(first call {timing['first_call_s']:.1f} s)", flush=True)  # fmt: skip
        except Exception as err:  # a failing option is a result too; the other variants still run
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            print(f"FAILED {variant.name}: {row['error']}", flush=True)
        row["wall_s"] = time.monotonic() - t_variant
        save()
        if variant.default and args.profile and runner is not None and "error" not in row:
            if not (reason := fits("profile", PROFILE_COST_S)):
                b = args.batch_sizes[0]
                try:
                    prof = profile_step(runner, *inputs[b], device, calls=3 if args.tiny else 10)
                    report["profile"] = prof | {"variant": variant.name}
                    print(f"profile: {report['profile']['busy_ms_per_call']:.2f} ms busy per call", flush=True)
                except Exception as err:
                    report["profile"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                    print(f"FAILED profile: {report['profile']['error']}", flush=True)
            else:
                report["profile"] = {"skipped": reason}
            save()
        runner = None
        restore(unet, vae)  # the runner changed the shared modules in place: undo for later variants
        release(device)
        if variant.default and args.split:
            if not (reason := fits("split", SPLIT_COST_S)):
                split = measure_split(unet, vae, inputs, device, args.iters, flops, rate, variant.options)
                report["split"] = split | {"variant": variant.name}
            else:
                report["split"] = {"skipped": reason}
            save()

    print(to_markdown(report), flush=True)
    return 0


def cudnn_limit_note(selected: list[Variant]) -> str | None:
    """A warning for the report when variants that share convolution shapes (the same memory format) run with
    different ``cudnn_benchmark_limit`` in one process: cuDNN reuses the first variant's choice for the later ones."""
    by_format: dict[bool, dict] = {}
    for v in selected:
        by_format.setdefault(v.options.channels_last, {}).setdefault(v.options.cudnn_benchmark_limit, v.name)
    mixed = [names for names in by_format.values() if len(names) > 1]
    if not mixed:
        return None
    firsts = "; ".join(", ".join(f"limit {k}: {n!r}" for k, n in names.items()) for names in mixed)
    return (f"variants with different cudnn_benchmark_limit share convolution shapes in this process ({firsts}); "
            "cuDNN keeps the first choice per shape, so the later ones reuse it: compare them in separate processes")


def add_speedups(results: list[dict]) -> None:
    base = next((r["batches"] for r in results if r["name"].startswith("eager (")), {})
    for row in results:
        for b, r in row["batches"].items():
            if b in base:
                r["speedup_vs_eager"] = base[b]["ms"] / r["ms"]


def to_markdown(report: dict) -> str:
    fl, env = report["flops"], report["env"]
    lines = [
        "# One-step SD 1.5 inference, 512 px (UNet t=999 + x0 + VAE decode), random weights\n",
        env_markdown(env, report["command"]),
        f"FLOPs per image: UNet {fl['unet_tflop']:.2f} TFLOP + VAE decode {fl['vae_decode_tflop']:.2f} TFLOP; "
        f"floor at the measured bf16 matmul rate ({env['bf16_matmul_tflops']:.0f} TFLOP/s): "
        f"{fl['floor_ms_per_image']:.2f} ms per image.\n",
        "| variant | batch | ms / batch (min–max) | images/s | × eager | first call s | rel. err vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['name']} | – | {row.get('skipped') or row['error'][:300]} | | | | |")
        for b, r in row["batches"].items():
            lines.append(
                f"| {row['name']} | {b} | {r['ms']:.2f} ({r['ms_min']:.2f}–{r['ms_max']:.2f}) "
                f"| {r['images_per_s']:.1f} | {r.get('speedup_vs_eager', 0):.2f} "
                f"| {r['first_call_s']:.1f} | {r['rel_err_vs_eager']:.1e}{'' if r['finite'] else ' (non-finite!)'} |"
            )
    lines += [f"\n**Note:** {n}" for n in report.get("notes", [])]
    lines += split_markdown(report) + profile_markdown(report)
    return "\n".join(lines) + "\n"


def split_markdown(report: dict) -> list[str]:
    split = report.get("split")
    if split is None:
        return []
    variant = split.get("variant", "compile + cuda_graphs + channels_last (default)")  # older reports: the default
    lines = [f"\n## Split of the step of `{variant}`: UNet part vs decode part\n"]
    if "skipped" in split:
        return lines + [f"Skipped: {split['skipped']}"]
    default = next((r for r in report["results"] if r["name"] == variant), {"batches": {}})
    lines += [
        "UNet part = UNet + x0 formula; decode part = VAE decode + clamp; each compiled and captured in its own "
        "CUDA graph with that variant's options. Floor = the part's FLOPs (stock modules) at the measured bf16 "
        "matmul rate.\n",
        "| part | batch | TFLOP | ms (min–max) | floor ms | floor / time | first call s |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, row in ((p, split[p]) for p in ("unet", "decode") if p in split):
        if "error" in row:
            lines.append(f"| {part} | – | | {row['error'][:300]} | | | |")
        for b, r in row["batches"].items():
            lines.append(
                f"| {part} | {b} | {row['tflop_per_image'] * int(b):.2f} | {r['ms']:.2f} ({r['ms_min']:.2f}–"
                f"{r['ms_max']:.2f}) | {r['floor_ms']:.2f} | {100 * r['floor_fraction']:.0f}% "
                f"| {r['first_call_s']:.1f} |"
            )
    for b in default["batches"]:
        parts = [split[p]["batches"].get(b) for p in ("unet", "decode") if p in split]
        if len(parts) == 2 and all(parts):
            total = parts[0]["ms"] + parts[1]["ms"]
            lines.append(
                f"\nBatch {b}: UNet + decode = {total:.2f} ms vs the full step "
                f"{default['batches'][b]['ms']:.2f} ms; UNet {100 * parts[0]['ms'] / total:.0f}% of the parts' time."
            )
    return lines


def profile_markdown(report: dict) -> list[str]:
    prof = report.get("profile")
    if prof is None:
        return []
    variant = prof.get("variant", "compile + cuda_graphs + channels_last (default)")
    lines = [f"\n## Profile of the compiled step of `{variant}`, no CUDA graph\n"]
    if "skipped" in prof or "error" in prof:
        return lines + [f"Not run: {prof.get('skipped') or prof['error'][:500]}"]
    lines += [
        f"Batch {prof['batch']}, {prof['calls']} calls; {prof['what']}. Uncaptured step: "
        f"{prof['uncaptured_step_ms']:.2f} ms per call; device busy {prof['busy_ms_per_call']:.2f} ms per call "
        f"({prof['events_per_call']:.0f} per call, {prof['distinct']} distinct).\n",
        "By kind: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["by_kind"].items()) + "\n",
        "| # | name | kind | count per call | ms per call | share |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(prof["top"], 1):
        name = r["name"].replace("|", "\\|")
        name = name if len(name) <= 110 else name[:107] + "..."
        lines.append(
            f"| {i} | `{name}` | {r['kind']} | {r['per_call']:.0f} | {r['ms_per_call']:.3f} "
            f"| {100 * r['share']:.1f}% |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
