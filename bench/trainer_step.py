"""Benchmark: the real distillation trainer's step (crossdistill.train.distill.DistillTrainer) at real sizes.

bench/train_step.py composes the DMD2 step from the model classes; this one runs the trainer itself, with a
preset's config (fp32 master weights under bf16 autocast, EMA, gradient clipping, the NaN guard, LoRA or copy fake
score, the speed options), on spaces of the real architectures with random weights:

- Student: SD 1.5 UNet + SD 1.5 VAE at 512 px; Teacher: SD3.5-Medium MMDiT + SD3 VAE (16 channels) at 1024 px;
- the Bridge: a freshly built ``prior_projector`` (full decode + projector), saved and loaded as a trained one is;
- the text encoders keep their output widths (CLIP 768 / 1280 with projections, T5 4096; 77 + 256 tokens) but have
  two layers: they only run once at start-up to fill the prompt-embedding cache, never inside a step.

Each variant is a config override on the preset; the generator update and the critic update are timed separately
(the trainer runs ``critic_steps_per_generator_step`` critic updates per generator update). ``--set KEY=VALUE``
(repeatable, any config key, e.g. ``--set train.ddp_comm_hook=bf16``) applies to every variant after its own
overrides; the report records them and each row's resolved ``train`` options. With the GAN or Bridge co-training on
(``--set train.gan_weight=1e-3``) and no ``data.real_images``, ``--reals N`` random images serve as the reals.

    PYTHONUNBUFFERED=1 python bench/trainer_step.py --out $OUT                              # GPU, real sizes
    python bench/trainer_step.py --tiny --out /tmp/bench                                     # CPU smoke test

Under ``accelerate launch`` the trainer runs as configured there (DDP, or FSDP2 sharding every model); each process
trains its own batch, the report (rank 0's timings, every rank's peak memory) counts samples/s over all of them:

    accelerate launch --multi_gpu --num_processes 2 bench/trainer_step.py --variants preset --out $OUT/ddp
    accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP bench/trainer_step.py --variants preset --out $OUT/fsdp
    accelerate launch --multi_gpu --num_processes 2 bench/trainer_step.py --variants preset \
        --set train.ddp_comm_hook=bf16 --set train.ddp_static_graph=true --out $OUT/ddp_bf16    # DDP options

``--profile`` adds, after the timing, one profiled update of each kind: the GPU's busy and idle time, time by kernel
kind, and the NCCL time that no other kernel overlaps (the part of a multi-GPU update spent waiting on the link).
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

# The preset's step fills an 80 GB GPU to ~77 GiB (measured): let the allocator grow segments instead of fragmenting.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from common import (
    Clock,
    build,
    count_flops,
    env_markdown,
    environment,
    fmt,
    fresh_peak,
    matmul_tflops,
    peak_memory_gb,
    profile_kernels,
    sd15_unet_config,
    sd15_vae_config,
    sd35_medium_config,
    sync,
    time_ms,
    write_report,
)
from crossdistill.bridge.model import Bridge
from crossdistill.config import apply_overrides, to_dict
from crossdistill.train import distill
from crossdistill.train.perf import compile_cache_counts
from crossdistill.train.presets import PRESETS

# name -> (config overrides on the preset, rough cost in s at real size on an H100-class GPU incl. compile)
VARIANTS: dict[str, tuple[list[str], float]] = {
    "preset": ([], 90),
    "preset_compiled": (["train.compile=true"], 300),
    "compiled_no_ckpt": (["train.compile=true", "train.gradient_checkpointing=false"], 300),
    "compiled_subpixel": (["train.compile=true", "train.subpixel_upsample=true"], 300),
}


WORLD = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
RANK = int(os.environ.get("RANK", "0"))


def bench_device() -> torch.device:
    """This process's device: its own GPU under ``accelerate launch``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def real_spaces(device: torch.device):
    """SD 1.5 Student and SD3.5-Medium Teacher spaces of the real sizes, random weights (text encoders: 2 layers)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    from crossdistill.models.loading import codec_from_vae
    from crossdistill.models.sd3 import SD3Denoiser, SD3Space, flow_scheduler
    from crossdistill.models.sd15 import SD15Denoiser, SD15Space, ddpm_scheduler
    from crossdistill.models.text import GenericTextEncoder, SD3PromptEncoder, tiny_clip, tiny_t5, tiny_tokenizer

    f32 = torch.float32  # the trainer casts: frozen parts to its mixed precision, trained parts to fp32
    unet = build(UNet2DConditionModel, sd15_unet_config(), device, f32)
    sd15_vae = build(AutoencoderKL, sd15_vae_config() | {"scaling_factor": 0.18215}, device, f32)
    text = GenericTextEncoder(tiny_clip(0, 768, max_length=77), tiny_tokenizer(77))
    student = SD15Space(codec_from_vae(sd15_vae), SD15Denoiser(unet, ddpm_scheduler()), text, resolution=512)

    mmdit = build(SD3Transformer2DModel, sd35_medium_config(), device, f32)
    sd3_vae_cfg = sd15_vae_config() | dict(
        latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    sd3_vae = build(AutoencoderKL, sd3_vae_cfg, device, f32)
    encoder = SD3PromptEncoder(
        tiny_clip(1, 768, projection=True, max_length=77), tiny_tokenizer(77),
        tiny_clip(2, 1280, projection=True, max_length=77), tiny_tokenizer(77),
        tiny_t5(3, 4096), tiny_tokenizer(256), joint_attention_dim=4096, max_sequence_length=256,
    )  # fmt: skip
    teacher = SD3Space(codec_from_vae(sd3_vae), SD3Denoiser(mmdit, flow_scheduler(3.0), shift=3.0), encoder,
                       resolution=1024)  # fmt: skip
    return student, teacher


def tiny_spaces(device: torch.device):
    from crossdistill.models.sd3 import SD3Space
    from crossdistill.models.sd15 import SD15Space

    return SD15Space.tiny(seed=0), SD3Space.tiny(seed=1)


def make_trainer(args, overrides: list[str], work: Path):
    """A DistillTrainer on freshly built spaces (each variant trains its own copy), the Bridge saved beside it.
    ``overrides``: the variant's, then every ``--set`` of the command line."""
    device = bench_device()
    student, teacher = (tiny_spaces if args.tiny else real_spaces)(device)
    spaces = {"bench:student": student, "bench:teacher": teacher}
    bridge_dir = work / "bridge"
    if not bridge_dir.exists():
        Bridge.build("prior_projector", student, teacher).save_pretrained(bridge_dir)
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"bench prompt number {i}\n" for i in range(64)))
    cfg = PRESETS[args.preset]()
    cfg = apply_overrides(cfg, [
        "model.student_path=bench:student", "model.teacher_path=bench:teacher", f"model.bridge_path={bridge_dir}",
        f"data.prompts={prompts}", f"train.batch_size={args.batch}", f"train.cpu={device.type == 'cpu'}", *overrides,
        *args.set,
    ])  # fmt: skip
    if (cfg.train.gan_weight > 0 or cfg.train.cotrain_bridge) and not cfg.data.real_images:
        cfg.data.real_images = str(synthetic_reals(work / "reals", args.reals, teacher.resolution))
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="run_"))
    original = distill.load_space
    distill.load_space = lambda family, path: spaces[path]  # the trainer asks for its spaces by config path
    try:
        return distill.DistillTrainer(cfg, run_dir)
    finally:
        distill.load_space = original


def synthetic_reals(folder: Path, n: int, resolution: int) -> Path:
    """``n`` random images with captions, for the GAN's and the Bridge co-training's reals (their speed does not
    depend on what the images show; the GPU machines have no image set)."""
    from PIL import Image

    if not folder.exists():
        folder.mkdir(parents=True)
        gen = torch.Generator().manual_seed(0)
        for i in range(n):  # smooth colour fields: PNGs of a few hundred KiB rather than incompressible noise
            small = torch.rand(3, 8, 8, generator=gen)
            big = torch.nn.functional.interpolate(small[None], size=(resolution,) * 2, mode="bilinear")[0]
            Image.fromarray((big.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"real_{i}.png")
            (folder / f"real_{i}.txt").write_text(f"bench real image number {i}\n")
    return folder


def progress(clock: Clock, name: str, message: str) -> None:
    """One line on rank 0 while a variant runs (a run cut off by a call's time limit still tells how far it got)."""
    if RANK == 0:
        print(f"[{clock.elapsed():5.0f} s] {name}: {message}", flush=True)


def run_variant(args, name: str, overrides: list[str], work: Path, matmul: float, clock: Clock) -> dict:
    row: dict = {"name": name, "overrides": overrides, "set": list(args.set), "preset": args.preset,
                 "batch": args.batch, "world_size": WORLD}  # fmt: skip
    device = bench_device()
    trainer = None
    try:
        with fresh_peak(device):
            t0 = time.monotonic()
            trainer = make_trainer(args, overrides, work)
            row["build_s"] = time.monotonic() - t0
            row["train"] = to_dict(trainer.cfg.train)  # the options this row ran with (preset, variant, --set)
            t0, cache0 = time.monotonic(), compile_cache_counts()
            trainer.generator_step(1)
            trainer.critic_step(1)
            sync(device)
            row["first_updates_s"] = time.monotonic() - t0  # compile (when on) and optimizer-state allocation
            # per rank below: each rank's cache keys hold its own device index
            row["compile_cache"] = compile_cache_counts(since=cache0)
            progress(clock, name, f"first updates done in {row['first_updates_s']:.0f} s; timing")
            # fresh step numbers: each update draws its own batch and noise
            steps = itertools.count(2)
            row["generator_update"] = time_ms(lambda: trainer.generator_step(next(steps)), device, warmup=1,
                                              iters=args.iters)  # fmt: skip
            row["critic_update"] = time_ms(lambda: trainer.critic_step(next(steps)), device, warmup=1,
                                           iters=args.iters)  # fmt: skip
            row["peak_gb"] = peak_memory_gb(device)
            peak = "–" if row["peak_gb"] is None else f"{row['peak_gb']:.1f} GiB"
            progress(clock, name, f"timed: generator {row['generator_update']['ms']:.0f} ms, critic "
                                  f"{row['critic_update']['ms']:.0f} ms, peak {peak}")  # fmt: skip
        if args.profile:  # after the peak: every rank runs the updates (DDP's collectives); rank 0's kernels reported
            try:
                row["profile"] = {
                    "generator update": profile_kernels(lambda: trainer.generator_step(next(steps)), device),
                    "critic update": profile_kernels(lambda: trainer.critic_step(next(steps)), device),
                }
            except Exception as err:  # the timings stand without it
                row["profile_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        k = trainer.cfg.train.critic_steps_per_generator_step
        g, c = row["generator_update"]["ms"], row["critic_update"]["ms"]
        row["critic_steps_per_generator_step"] = k
        row["one_plus_one_ms"] = g + c
        row["cycle_ms"] = g + k * c  # one generator update and its k critic updates
        accumulation = trainer.cfg.train.gradient_accumulation_steps  # micro-batches of args.batch per update
        row["samples_per_s_generator"] = WORLD * args.batch * accumulation / (row["cycle_ms"] * 1e-3)
        row["distributed_type"] = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
        row["sharded"] = trainer.sharded
        if WORLD > 1:  # every rank's peak; the FLOPs are counted on one GPU (the same arithmetic per process)
            peaks = [None] * WORLD
            torch.distributed.all_gather_object(peaks, row["peak_gb"])
            row["peak_gb_per_rank"], row["peak_gb"] = peaks, max((p for p in peaks if p is not None), default=None)
            caches = [None] * WORLD
            torch.distributed.all_gather_object(caches, row["compile_cache"])
            row["compile_cache_per_rank"] = caches
        # Counted eagerly, after the timing, each update on its own: an OOM here (the preset fills an 80 GB GPU)
        # costs only that update's MFU. The critic first: on the H100 its count ran out of memory after the
        # generator's had succeeded.
        counted = (("critic_tflop", trainer.critic_step), ("generator_tflop", trainer.generator_step))
        for key, update in counted if WORLD == 1 else ():
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                with torch.compiler.set_stance("force_eager"):
                    row[key] = count_flops(functools.partial(update, 10**6)) / 1e12
            except torch.OutOfMemoryError as err:
                row.setdefault("flops_error", f"out of memory while counting {key}: {str(err)[:300]}")
        if "generator_tflop" in row and "critic_tflop" in row:
            gt, ct = row["generator_tflop"], row["critic_tflop"]
            row["mfu_one_plus_one"] = (gt + ct) * 1e12 / ((g + c) * 1e-3) / matmul
            row["mfu_cycle"] = (gt + k * ct) * 1e12 / ((g + k * c) * 1e-3) / matmul
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err)[:300]}"
        row["peak_gb"] = peak_memory_gb(device)
    except Exception as err:  # a failing variant is a result; the others still run
        row["error"] = f"{type(err).__name__}: {str(err)[:500]}\n{traceback.format_exc()[-2000:]}"
    if RANK == 0:
        print(f"[{clock.elapsed():5.0f} s] {name}: {row}", flush=True)
    trainer = None
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the families' tiny spaces (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--preset", default="sd15_from_sd35_medium", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=4, help="train.batch_size (the preset's is 4)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--reals", type=int, default=8,
                        help="random images written as the reals when the config needs them (train.gan_weight > 0 "
                             "or train.cotrain_bridge) and sets no data.real_images")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument(
        "--profile", action="store_true",
        help="after the timing, profile one update of each kind: busy / idle GPU time, time by kernel kind, and the "
        "NCCL time no compute overlaps (multi-GPU: the wait on the link)",
    )  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant, after its own (repeatable), e.g. "
                             "--set train.ddp_comm_hook=bf16 --set train.ddp_bucket_mb=100")  # fmt: skip
    args = parser.parse_args(argv)
    for name in args.variants:  # a wrong key or value fails here, before any model is built
        distill.check_ddp_options(apply_overrides(PRESETS[args.preset](), [*VARIANTS[name][0], *args.set]).train)

    device = bench_device()
    clock = Clock(args.budget_s)
    torch.backends.cudnn.benchmark = True
    env = environment(device)
    env["bf16_matmul_tflops"] = matmul_tflops(device)
    print(env, flush=True)
    report: dict = {"env": env, "command": " ".join(sys.argv), "set": list(args.set), "rows": [], "skipped": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            overrides, cost = VARIANTS[name]
            if not args.tiny and not clock.allows(cost):
                report["skipped"].append(f"{name} ({clock.elapsed():.0f} s used of {args.budget_s:.0f} s)")
                continue
            report["rows"].append(
                run_variant(args, name, overrides, Path(tmp), env["bf16_matmul_tflops"] * 1e12, clock)
            )
            if RANK == 0:
                write_report(args.out, "trainer_step", report, to_markdown(report))
    if RANK == 0:
        write_report(args.out, "trainer_step", report, to_markdown(report))
        print(to_markdown(report), flush=True)
    return 0 if all("error" not in r for r in report["rows"]) else 1


def to_markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        "# The distillation trainer's step at real sizes (random weights)\n",
        env_markdown(env, report["command"]),
        f"MFU over the measured bf16 matmul rate ({env['bf16_matmul_tflops']:.0f} TFLOP/s). A cycle = one generator "
        "update and its critic updates.\n",
        "| variant | overrides | processes | generator ms | critic ms | 1+1 MFU | cycle ms | cycle MFU | samples/s "
        "| peak GiB | first updates s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        procs = r.get("world_size", 1)
        procs = f"{procs} ({r.get('distributed_type', '?')})" if procs > 1 else "1"
        head = f"| {r['name']} | {' '.join([*r['overrides'], *r.get('set', [])]) or '–'} | {procs} "
        if "error" in r:
            lines.append(head + f"| {r['error'].splitlines()[0][:150]} | | | | | | | |")
            continue
        # every rank's peak inside the peak cell (a cell after the last column would break the table)
        ranks = f" (ranks: {', '.join(fmt(p) for p in r['peak_gb_per_rank'])})" if "peak_gb_per_rank" in r else ""
        lines.append(
            head + f"| {r['generator_update']['ms']:.0f} | {r['critic_update']['ms']:.0f} "
            f"| {fmt(r.get('mfu_one_plus_one'), '.0%')} "
            f"| {r['cycle_ms']:.0f} (1+{r['critic_steps_per_generator_step']}) | {fmt(r.get('mfu_cycle'), '.0%')} "
            f"| {r['samples_per_s_generator']:.2f} "
            f"| {fmt(r['peak_gb'])}{ranks} | {r['first_updates_s']:.0f} |"
        )
    profiled = [r for r in report["rows"] if r.get("profile")]
    if profiled:
        lines += [
            '\nKernel profile, one update of each kind after the timing (rank 0; ms on the GPU; "NCCL exposed" = '
            "communication no compute kernel overlaps):\n",
            "| variant | update | wall | busy | idle | compute | NCCL | NCCL exposed | kernels | by kind |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in profiled:
            for update, p in r["profile"].items():
                if not p.get("kernels"):
                    lines.append(f"| {r['name']} | {update} | no GPU kernels recorded | | | | | | | |")
                    continue
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in p["by_kind_ms"].items())
                lines.append(
                    f"| {r['name']} | {update} | {p['wall_ms']:.1f} | {p['busy_ms']:.1f} | {p['idle_ms']:.1f} "
                    f"| {p['compute_ms']:.1f} | {p['comm_ms']:.1f} | {p['comm_exposed_ms']:.1f} | {p['kernels']:.0f} "
                    f"| {kinds} |"
                )
    cached = [r for r in report["rows"] if r.get("compile_cache") or any(r.get("compile_cache_per_rank") or ())]
    if cached:
        lines.append("\nCompile caches in the first updates (inductor FX graphs, AOTAutograd; per rank under DDP):\n")
        for r in cached:
            per_rank = r.get("compile_cache_per_rank") or [r["compile_cache"]]
            ranks = "; ".join(f"rank {i}: " + (", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none")
                              for i, c in enumerate(per_rank))  # fmt: skip
            lines.append(f"- {r['name']}: {ranks}")
    for r in report["rows"]:
        if "flops_error" in r:
            lines.append(f"\n{r['name']}: MFU not computed, {r['flops_error'][:200]}")
        if "profile_error" in r:
            lines.append(f"\n{r['name']}: not profiled, {r['profile_error'][:200]}")
    if report["skipped"]:
        lines.append(f"\nSkipped: {report['skipped']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
