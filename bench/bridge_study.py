"""Study: what the Bridge (frozen SD 1.5 decoder prior + projector) costs in a training step; what compiles it best.

The Bridge part of the cross-space step alone, at real size: ``ẑ_t = P(D(z_s))`` forward, then the backward of a
loss on ``ẑ_t`` into ``z_s`` (the decoder is frozen: only input gradients; the projector frozen too, as in the
composed step of bench/train_step.py). Batch 4 (the preset's). Variants, each built fresh:

- how it is compiled: ``regional`` (what ``train.compile`` does: every residual block and the mid block compiled
  alone, the glue eager; crossdistill.train.perf.compile_blocks) or ``whole`` (the decoder and the projector each one
  ``torch.compile`` graph);
- the layout (NCHW or channels_last) and ``channel_stats_norm`` (crossdistill.models.groupnorm).

Forward and backward are timed apart (device events), with a kernel profile by kind and the output and gradient
against the first variant.

    PYTHONUNBUFFERED=1 python bench/bridge_study.py --out $OUT        # GPU, real sizes (~1-2 min per variant cold)
    python bench/bridge_study.py --tiny --out /tmp/bench               # CPU smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import Clock, env_markdown, environment, fmt, profile_kernels, sync, write_report
from crossdistill.train.perf import compile_blocks
from infer_one_step import rel_err
from train_step import SD15_SCALE, Setup, switch_options

REPORT = "bridge_study"


@dataclass(kw_only=True)
class Variant:
    compile: str  # "regional" | "whole" | "none"
    channels_last: bool = False
    channel_stats_norm: bool = False
    wide_head_attention: bool = False  # the decoder's 512-wide mid-block head as matmuls (models.wide_attention)

    @property
    def name(self) -> str:
        opts = [f"{self.compile} compile", "channels_last" if self.channels_last else "NCHW"]
        opts += ["channel_stats_norm"] if self.channel_stats_norm else []
        return ", ".join(opts + (["wide_head_attention"] if self.wide_head_attention else []))


VARIANTS = {
    "regional": Variant(compile="regional"),  # train.compile, the trainer's default layout
    "whole_cl_csn": Variant(compile="whole", channels_last=True, channel_stats_norm=True),
    "regional_cl_csn": Variant(compile="regional", channels_last=True, channel_stats_norm=True),
    "whole": Variant(compile="whole"),
    "whole_csn": Variant(compile="whole", channel_stats_norm=True),
    "regional_cl_csn_wide": Variant(compile="regional", channels_last=True, channel_stats_norm=True,
                                    wide_head_attention=True),
    "whole_cl_csn_wide": Variant(compile="whole", channels_last=True, channel_stats_norm=True,
                                 wide_head_attention=True),
    "regional_wide": Variant(compile="regional", wide_head_attention=True),
}


class BridgePart:
    """The Bridge's forward and backward of one training step, timed apart."""

    def __init__(self, setup: Setup, base: tuple, v: Variant, batch: int) -> None:
        self.vae, self.proj = copy.deepcopy(base)  # the same weights in every variant
        for m in (self.vae.decoder, self.proj):
            switch_options(m, channels_last=v.channels_last, subpixel_upsample=False,
                           channel_stats_norm=v.channel_stats_norm, wide_head_attention=v.wide_head_attention)
            if v.compile == "regional":
                compile_blocks(m)
            elif v.compile == "whole":
                m.compile(dynamic=False)
        gen = torch.Generator(setup.device).manual_seed(0)
        shape = (batch, 4, setup.student_latent, setup.student_latent)
        self.z = torch.randn(shape, device=setup.device, generator=gen).to(setup.dtype).requires_grad_(True)
        side = 2 * setup.student_latent
        self.gout = torch.randn(batch, 16, side, side, device=setup.device, generator=gen)
        self.device = setup.device

    def forward(self) -> torch.Tensor:
        return self.proj(self.vae.decode(self.z / SD15_SCALE, return_dict=False)[0])

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.z.grad = None
        out = self.forward()
        (out.float() * self.gout).sum().backward()
        return out.detach(), self.z.grad

    def timed(self, iters: int) -> dict:
        fwd, bwd = [], []
        for _ in range(iters):
            self.z.grad = None
            if self.device.type == "cuda":
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                ev[0].record()
                out = self.forward()
                ev[1].record()
                (out.float() * self.gout).sum().backward()
                ev[2].record()
                ev[2].synchronize()
                fwd.append(ev[0].elapsed_time(ev[1]))
                bwd.append(ev[1].elapsed_time(ev[2]))
            else:
                t0 = time.perf_counter()
                out = self.forward()
                t1 = time.perf_counter()
                (out.float() * self.gout).sum().backward()
                fwd.append((t1 - t0) * 1e3)
                bwd.append((time.perf_counter() - t1) * 1e3)
        f, b = statistics.median(fwd), statistics.median(bwd)
        return {"fwd_ms": f, "bwd_ms": b, "ms": f + b, "iters": iters}

    def profile(self, calls: int) -> dict:
        """GPU time per step by kernel kind (common.profile_kernels), under the report's keys."""
        p = profile_kernels(self, self.device, calls)
        return {"busy_ms_per_call": p.get("busy_ms", 0.0), "kinds_ms": p.get("by_kind_ms", {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=None, help="timed steps per variant (10; tiny: 2)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budget-s", type=float, default=480, help="skip variants that would end after this")
    parser.add_argument("--cost-s", type=float, default=110, help="rough wall time of one variant, compile included")
    args = parser.parse_args(argv)
    iters = args.iters or (2 if args.tiny else 10)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = Clock(args.budget_s)
    setup = Setup(args.tiny, device)
    env = environment(device)
    print(env, flush=True)
    results: list[dict] = []
    report = {"env": env, "batch": args.batch, "results": results, "command": " ".join(sys.argv)}
    reference = None
    base = (setup.decoder(), setup.projector().requires_grad_(False))
    for key in args.variants:
        v = VARIANTS[key]
        row: dict = {"name": v.name, "options": asdict(v)}
        results.append(row)
        if not args.tiny and not clock.allows(args.cost_s):
            row["skipped"] = f"time budget ({clock.elapsed():.0f} s used of {args.budget_s:.0f} s)"
            print(f"skip {v.name}", flush=True)
            continue
        try:
            t0 = time.monotonic()
            part = BridgePart(setup, base, v, args.batch)
            out, grad = part()
            sync(device)
            row["first_call_s"] = time.monotonic() - t0
            part()  # a second warm-up: lazy inits, cuDNN's algorithm choice
            row |= part.timed(iters)
            reference = reference or (out.float(), grad.float())
            row["rel_err_out"], row["rel_err_grad"] = rel_err(out, reference[0]), rel_err(grad, reference[1])
            row["grad_norm"] = float(grad.float().norm())
            if row["grad_norm"] == 0.0:  # seen on CPU: whole-graph inductor through the decoder (docs/performance.md)
                print(f"WARNING {v.name}: zero input gradient", flush=True)
            if device.type == "cuda":
                row["profile"] = part.profile(3)
            print(f"{v.name}: fwd {row['fwd_ms']:.1f} ms, bwd {row['bwd_ms']:.1f} ms", flush=True)
        except Exception as err:  # a failing variant is a result too
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            print(f"FAILED {v.name}: {row['error']}", flush=True)
        part = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_report(args.out, REPORT, report, to_markdown(report))
    write_report(args.out, REPORT, report, to_markdown(report))
    print(to_markdown(report), flush=True)
    return 0


def to_markdown(report: dict) -> str:
    lines = [
        "# The Bridge's share of a training step: decoder prior + projector, forward and backward",
        "",
        env_markdown(report["env"], report["command"]),
        f"Batch {report['batch']}, bf16, z_s → ẑ_t (SD 1.5 decoder at 512 px → projector → 128×128×16), backward "
        "into z_s. Median of the timed steps; rel. err. against the first row.",
        "",
        "| variant | fwd ms | bwd ms | total ms | first call s | rel. err. out / grad | GPU busy ms | kernels ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['name']} | {r.get('skipped') or r['error'][:200]} | | | | | | |")
            continue
        prof = r.get("profile", {})
        kinds = ", ".join(f"{k} {fmt(ms)}" for k, ms in prof.get("kinds_ms", {}).items())
        lines.append(
            f"| {r['name']} | {fmt(r['fwd_ms'])} | {fmt(r['bwd_ms'])} | {fmt(r['ms'])} | "
            f"{fmt(r['first_call_s'], '.0f')} | {r['rel_err_out']:.1e} / {r['rel_err_grad']:.1e}"
            f"{' (zero gradient!)' if r.get('grad_norm') == 0.0 else ''} | "
            f"{fmt(prof.get('busy_ms_per_call'))} | {kinds} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
