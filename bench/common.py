"""Shared pieces of the benchmarks: real architecture configs, timing, FLOP counting and report writing.

Speed does not depend on weight values, so every model is built from its published config with random weights
(no hub). ``tiny=True`` swaps in small configs of the same classes, to debug a script on a CPU in seconds.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def sd15_unet_config(tiny: bool = False) -> dict:
    """Stable Diffusion 1.5's UNet2DConditionModel (860 M parameters)."""
    return dict(
        sample_size=8 if tiny else 64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64) if tiny else (320, 640, 1280, 1280),
        layers_per_block=1 if tiny else 2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")
        if tiny
        else ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
        if tiny
        else ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32 if tiny else 768,
        attention_head_dim=8,
        norm_num_groups=8 if tiny else 32,
    )


def sd15_vae_config(tiny: bool = False) -> dict:
    """Stable Diffusion 1.5's AutoencoderKL (4 latent channels, downsampling 8; 49 M decoder parameters)."""
    channels = (16, 32, 32, 32) if tiny else (128, 256, 512, 512)
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8 if tiny else 32,
        sample_size=64 if tiny else 512,
    )


def sd35_medium_config(tiny: bool = False) -> dict:
    """Stable Diffusion 3.5 Medium's SD3Transformer2DModel (MMDiT-X, 2.24 B parameters as built here)."""
    if tiny:
        return dict(
            sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=16,
            pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
        )  # fmt: skip
    return dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
    )  # fmt: skip


def flux_dev_config(tiny: bool = False) -> dict:
    """FLUX.1-dev's FluxTransformer2DModel (19 double + 38 single blocks, 12 B parameters, guidance embedding)."""
    if tiny:
        return dict(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
    return dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


def build(cls, config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Construct a model directly on ``device`` in ``dtype`` (a 12 B model never passes through fp32 host memory)."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its "keep in float32" note is about loading real checkpoints
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**config).to(dtype)
    finally:
        torch.set_default_dtype(previous)


def environment(device: torch.device) -> dict:
    """Device name, library versions and the date, written into every report."""
    import diffusers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft_version,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, iters: int = 10) -> dict:
    """Median and spread of ``fn``'s wall time in ms, measured per call with device events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "iters": iters}


KERNEL_KINDS = (  # first match wins (lower-case substrings of the kernel name)
    ("NCCL (communication)", ("nccl",)),  # e.g. "ncclDevKernel_AllReduce_Sum_f32_RING_LL"
    # Triton before the library kinds: inductor names a fused kernel after its source ops, e.g.
    # "triton_per_fused_..._convolution_..." for a conv's bias/norm epilogue, which must not count as a cuDNN conv.
    ("Triton template (max-autotune)", ("triton_tem_",)),
    ("Triton fused (norm/elementwise)", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("conv (cuDNN)", ("fprop", "conv", "implicit", "dgrad", "wgrad", "xmma_", "cudnn")),
    ("GEMM (cuBLAS)", ("gemm", "nvjet", "cutlass", "cublas", "sm90_", "sm80_", "ampere_")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
)
COMM = KERNEL_KINDS[0][0]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def merge_intervals(spans) -> list[tuple[float, float]]:
    """The union of ``(start, end)`` spans as sorted, disjoint spans."""
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def covered(spans) -> float:
    """Total length of the union of ``spans``."""
    return sum(b - a for a, b in merge_intervals(spans))


def overlap(x, y) -> float:
    """Length of (union of ``x``) ∩ (union of ``y``)."""
    x, y, i, j, total = merge_intervals(x), merge_intervals(y), 0, 0, 0.0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def timeline_summary(kernels: list[tuple[str, float, float]], calls: int = 1, top: int = 12) -> dict:
    """What the GPU did over ``calls`` calls of one update, from its kernels ``(name, start_us, end_us)`` on every
    stream: wall (first kernel start to last end), busy (any kernel running), idle, time by kernel kind, and the
    communication (NCCL) time with the part of it that no other kernel overlaps ("exposed": the update waits on the
    link there; "compute" counts every kernel that is not NCCL, copies included). Per call, in ms."""
    if not kernels:
        return {"kernels": 0}
    per = 1e3 * calls
    comm = [(a, b) for n, a, b in kernels if kernel_kind(n) == COMM]
    compute = [(a, b) for n, a, b in kernels if kernel_kind(n) != COMM]
    wall = max(b for _, _, b in kernels) - min(a for _, a, _ in kernels)
    busy = covered((a, b) for _, a, b in kernels)
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for n, a, b in kernels:
        by_kind[kernel_kind(n)] = by_kind.get(kernel_kind(n), 0.0) + (b - a) / per
        entry = by_name.setdefault(n, [0.0, 0])
        entry[0], entry[1] = entry[0] + (b - a), entry[1] + 1
    return {
        "kernels": len(kernels) / calls,
        "wall_ms": wall / per,
        "busy_ms": busy / per,
        "idle_ms": (wall - busy) / per,
        "compute_ms": covered(compute) / per,
        "comm_ms": covered(comm) / per,
        "comm_exposed_ms": (covered(comm) - overlap(comm, compute)) / per,
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": [
            {"name": n[:200], "kind": kernel_kind(n), "ms": us / per, "per_call": c / calls}
            for n, (us, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        ],
    }


def profile_kernels(fn: Callable[[], object], device: torch.device, calls: int = 1) -> dict:
    """Run ``fn`` ``calls`` times under torch.profiler and summarise its device kernels (:func:`timeline_summary`).
    Without a GPU there are no kernels: the summary says so (the code path still runs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    return timeline_summary(device_kernels(prof.events()), calls) | {"calls": calls}


def device_kernels(events) -> list[tuple[str, float, float]]:
    """``(name, start_us, end_us)`` of what ran on the GPU (kernels, copies, fills) among a profiler's events.

    Leaves out the user annotations: the profiler mirrors ``record_function`` ranges such as
    ``DistributedDataParallel.forward``, ``Optimizer.step#AdamW.step`` or ``nccl:all_reduce`` onto the GPU timeline as
    events of device type CUDA, spanning the kernels launched inside them (and the gaps between those). Counted as
    kernels they would double the time of what they cover and fill the gaps as busy time."""
    from torch.autograd import DeviceType

    return [
        (e.name, float(e.time_range.start), float(e.time_range.end))
        for e in events
        if e.device_type == DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and e.time_range.end > e.time_range.start
    ]


def count_flops(fn: Callable[[], object]) -> float:
    """Model FLOPs of one call (matmuls, convs, attention) counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """The measured bf16 matrix-product rate of this GPU (the denominator of every MFU here), on random data."""
    if device.type != "cuda":
        n = 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    t = time_ms(lambda: a @ b, device, warmup=5, iters=20)
    return 2 * n**3 / (t["ms"] * 1e-3) / 1e12


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@contextmanager
def fresh_peak(device: torch.device):
    """Reset the peak-memory counter for the block (after freeing cached blocks of earlier work)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield


class Clock:
    """Wall-clock budget of one run, so a long optional variant is skipped rather than killing the whole run."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, needed_s: float) -> bool:
        return self.elapsed() + needed_s <= self.budget_s


def write_report(out_dir: Path, name: str, report: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)


def fmt(x, spec: str = ".1f") -> str:
    """A report cell: ``x`` formatted, or a dash where it was not measured."""
    return "–" if x is None else format(x, spec)


def env_markdown(env: dict, command: str) -> str:
    keys = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("date", "device"))
    return f"Device: **{env['device']}** · {env['date']} · {keys}\n\nCommand: `{command}`\n"


# Two-process gloo workers on CPU (torch.multiprocessing.spawn), for the benchmarks that look at DDP's graphs.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def exit_gloo() -> None:
    """Destroy the process group and leave without interpreter teardown: freeing DDP's reducer there can deadlock on
    the GIL with gloo's worker thread (seen: ~ProcessGroupGloo joining a thread that waits for the GIL to drop a
    Python object). Write results before calling it."""
    import torch.distributed as dist

    dist.destroy_process_group()
    os._exit(0)
