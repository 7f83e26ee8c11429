"""Benchmark: what a cross-space DMD2 training step costs, component by component, at real architecture sizes.

The distillation trainer (src/crossdistill/train/distill.py) is measured once it exists; until then this script
composes the same step from the real model classes with random weights, so the numbers show where time, FLOPs
and memory go:

1. components: SD3.5-Medium MMDiT fwd and fwd+bwd at 1024 px; SD 1.5 UNet fwd+bwd at 512 px; the Bridge
   (frozen SD 1.5 VAE decoder fwd+bwd to its input, plus a small conv projector);
2. one cross-space DMD2 step SD 1.5 (512 px) ← SD3.5-Medium (1024 px): generator update (UNet → x0 → decoder →
   projector → real score with CFG, fake score, DM loss, backward, AdamW) + one critic update (fake score
   fwd+bwd, AdamW), timed phase by phase, eager and with torch.compile;
3. SD 1.5 ← FLUX.1-dev at 1024 px batch 1 on one GPU: one base transformer serves as real score (adapter off)
   and, with a LoRA, as fake score (gradient checkpointing): peak memory and phase times.

FLOPs are counted with torch's FlopCounterMode; MFU is over the bf16 matmul rate measured in the same run.

    PYTHONUNBUFFERED=1 python bench/train_step.py --out $OUT       # GPU, real sizes (components, step, flux)
    PYTHONUNBUFFERED=1 python bench/train_step.py --parts step compile --budget-s 580 --out $OUT   # + compiled
    python bench/train_step.py --tiny --out /tmp/bench              # CPU smoke test, tiny configs
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import (
    Clock,
    build,
    count_flops,
    env_markdown,
    environment,
    flux_dev_config,
    fresh_peak,
    matmul_tflops,
    peak_memory_gb,
    sd15_unet_config,
    sd15_vae_config,
    sd35_medium_config,
    time_ms,
    write_report,
)
from crossdistill.bridge.model import Projector

SQRT_AB, SQRT_1M_AB = 0.00466**0.5, (1 - 0.00466) ** 0.5  # SD 1.5's ᾱ at t = 999 (see export/fast.py)
SD15_SCALE = 0.18215


class Setup:
    """Models and input shapes of one run (real or tiny)."""

    def __init__(self, tiny: bool, device: torch.device) -> None:
        self.tiny, self.device = tiny, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.student_latent = 8 if tiny else 64  # SD 1.5 latent side (512 px)
        self.text_len, self.student_text_dim = (8, 32) if tiny else (77, 768)
        self.sd3_text_len = 8 if tiny else 333  # 77 CLIP + 256 T5 tokens
        self.flux_text_len = 8 if tiny else 512

    def randn(self, *shape) -> Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def unet(self) -> UNet2DConditionModel:
        return build(UNet2DConditionModel, sd15_unet_config(self.tiny), self.device, self.dtype)

    def decoder(self) -> AutoencoderKL:
        vae = build(AutoencoderKL, sd15_vae_config(self.tiny), self.device, self.dtype)
        vae.encoder = None  # the Bridge only decodes
        return vae.requires_grad_(False).eval()

    def projector(self) -> Projector:
        # The real Bridge projector P_φ: decoded 512 px image → 128×128×16 Teacher latent grid (total stride 4).
        p = Projector(3, 16, in_size=512, out_size=128, hidden=32 if self.tiny else 128, num_blocks=4)
        return p.to(self.device, self.dtype)

    def sd3(self) -> SD3Transformer2DModel:
        return build(SD3Transformer2DModel, sd35_medium_config(self.tiny), self.device, self.dtype)

    def sd3_cond(self, b: int) -> dict:
        cfg = sd35_medium_config(self.tiny)
        return dict(
            encoder_hidden_states=self.randn(b, self.sd3_text_len, cfg["joint_attention_dim"]),
            pooled_projections=self.randn(b, cfg["pooled_projection_dim"]),
        )

    def sd3_latent(self, b: int) -> Tensor:
        side = sd35_medium_config(self.tiny)["sample_size"]
        return self.randn(b, 16, side, side)

    def unet_inputs(self, b: int) -> tuple[Tensor, Tensor]:
        s = self.student_latent
        return self.randn(b, 4, s, s), self.randn(b, self.text_len, self.student_text_dim)


def sd3_call(model: nn.Module, x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
    """SD3 velocity prediction; diffusers' SD3 takes the timestep as sigma × 1000."""
    return model(hidden_states=x, timestep=sigma * 1000, return_dict=False, **cond)[0]


def fwd_bwd(fn: Callable[[], Tensor], inputs: list[Tensor] = ()) -> Callable[[], None]:
    """A closure that runs ``fn`` forward and backward from a scalar, freeing the graph each time."""

    def step() -> None:
        for t in inputs:
            t.grad = None
        fn().float().square().mean().backward()

    return step


def measure(name: str, fn: Callable[[], object], device, clock: Clock, *, iters: int = 5) -> dict:
    """Time, FLOPs, MFU and peak memory of one callable; an OOM is recorded, not raised."""
    row: dict = {"name": name}
    try:
        with fresh_peak(device):
            row |= time_ms(fn, device, warmup=2, iters=iters)
            row["peak_gb"] = peak_memory_gb(device)
        row["tflop"] = count_flops(fn) / 1e12
        row["tflops_per_s"] = row["tflop"] / (row["ms"] * 1e-3)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err)[:200]}"
    print(f"[{clock.elapsed():5.0f} s] {name}: {row}", flush=True)
    return row


def sd3_components(setup: Setup, clock: Clock, batches: list[int]) -> list[dict]:
    dev, sd3, rows = setup.device, setup.sd3(), []
    for grad in (False, True):
        for b in batches:
            x, sigma, cond = setup.sd3_latent(b), torch.rand(b, device=dev), setup.sd3_cond(b)
            call = functools.partial(sd3_call, sd3, x, sigma, cond)
            with torch.set_grad_enabled(grad):
                name = f"SD3.5-M {'fwd+bwd' if grad else 'fwd'} 1024px b{b}"
                rows.append(measure(name, fwd_bwd(call) if grad else call, dev, clock))
            sd3.zero_grad(set_to_none=True)
    return rows


def unet_component(setup: Setup, clock: Clock, batch: int) -> dict:
    unet = setup.unet()
    z, emb = setup.unet_inputs(batch)
    t = torch.full((batch,), 999, device=setup.device)
    step = fwd_bwd(lambda: unet(z, t, encoder_hidden_states=emb, return_dict=False)[0])
    return measure(f"SD1.5 UNet fwd+bwd 512px b{batch}", step, setup.device, clock)


def bridge_components(setup: Setup, clock: Clock, batch: int) -> list[dict]:
    """The frozen decoder passes gradients to its input only; the projector here is frozen too (stage 2)."""
    vae, proj, rows = setup.decoder(), setup.projector(), []
    for b in sorted({1, batch}):
        z = setup.randn(b, 4, setup.student_latent, setup.student_latent).requires_grad_(True)
        decode = fwd_bwd(functools.partial(lambda z: vae.decode(z, return_dict=False)[0], z), [z])
        rows.append(measure(f"Bridge: SD1.5 VAE decoder fwd+bwd(input) 512px b{b}", decode, setup.device, clock))
        image = setup.randn(b, 3, 8 * setup.student_latent, 8 * setup.student_latent)
        project = fwd_bwd(functools.partial(proj, image))
        rows.append(measure(f"Bridge: projector fwd+bwd b{b}", project, setup.device, clock))
    return rows


def components(setup: Setup, clock: Clock, sd3_batches: list[int], student_batch: int) -> list[dict]:
    rows = sd3_components(setup, clock, sd3_batches)
    gc.collect()
    rows.append(unet_component(setup, clock, student_batch))
    gc.collect()
    return rows + bridge_components(setup, clock, student_batch)


class CrossSpaceStep:
    """One DMD2 step, SD 1.5 generator ← SD3.5-Medium Teacher through the Bridge, with device events per phase.

    Generator update: ``z_s = G(noise)``, ``ẑ_t = P(D(z_s))``, flow-matching noise at τ, real score with CFG
    (two batches), fake score, ``g = (μ_fake − μ_real) / mean|ẑ_t − μ_real|``, ``L = ½‖ẑ_t − sg(ẑ_t − g)‖²``,
    backward into the UNet, AdamW. Critic update: the fake score's flow-matching loss on ``sg(ẑ_t)``, AdamW.
    """

    PHASES = (
        "generator fwd", "bridge fwd", "real score fwd (CFG x2)", "fake score fwd", "bridge bwd",
        "generator bwd", "generator AdamW", "critic fwd+bwd", "critic AdamW",
    )  # fmt: skip

    def __init__(self, setup: Setup, batch: int, compile_models: bool, cfg_scale: float = 4.5) -> None:
        self.setup, self.batch, self.cfg_scale = setup, batch, cfg_scale
        self.gen, self.vae, self.proj = setup.unet(), setup.decoder(), setup.projector().requires_grad_(False)
        self.real, self.fake = setup.sd3().requires_grad_(False), setup.sd3()
        if compile_models:
            for m in (self.gen, self.vae.decoder, self.proj, self.real, self.fake):
                m.compile()
        # foreach AdamW over bf16 params: optimizer states in bf16 too (the trainer may keep fp32 masters).
        self.opt_g = torch.optim.AdamW(self.gen.parameters(), lr=1e-6, foreach=True)
        self.opt_f = torch.optim.AdamW(self.fake.parameters(), lr=1e-6, foreach=True)
        self.noise, self.emb = setup.unet_inputs(batch)
        self.cond, self.uncond = setup.sd3_cond(batch), setup.sd3_cond(batch)
        self.both = {k: torch.cat([self.cond[k], self.uncond[k]]) for k in self.cond}
        self.t = torch.full((batch,), 999, device=setup.device)
        self.events: list = []

    def mark(self) -> None:
        if self.setup.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append(ev)

    def __call__(self) -> None:
        self.events = []
        self.mark()
        eps = self.gen(self.noise, self.t, encoder_hidden_states=self.emb, return_dict=False)[0]
        z_s = (self.noise - SQRT_1M_AB * eps) / SQRT_AB
        self.mark()
        image = self.vae.decode(z_s / SD15_SCALE, return_dict=False)[0]
        z_t = self.proj(image)
        self.mark()
        # A backward hook marks where the gradient has passed the projector and the decoder.
        z_s.register_hook(lambda g: self.mark())
        with torch.no_grad():
            sigma = torch.rand(self.batch, device=z_t.device, dtype=z_t.dtype)
            s = sigma.view(-1, 1, 1, 1)
            x = (1 - s) * z_t + s * torch.randn_like(z_t)
            v_cond, v_uncond = sd3_call(self.real, torch.cat([x, x]), sigma.repeat(2), self.both).chunk(2)
            mu_real = x - s * (v_uncond + self.cfg_scale * (v_cond - v_uncond))
            self.mark()
            mu_fake = x - s * sd3_call(self.fake, x, sigma, self.cond)
            self.mark()
            g = (mu_fake - mu_real) / (z_t - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        loss = 0.5 * (z_t.float() - (z_t - g).detach().float()).square().mean()
        loss.backward()
        self.mark()
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self.mark()
        z_t = z_t.detach()
        eps_c = torch.randn_like(z_t)
        x = (1 - s) * z_t + s * eps_c
        critic_loss = (sd3_call(self.fake, x, sigma, self.cond).float() - (eps_c - z_t).float()).square().mean()
        critic_loss.backward()
        self.mark()
        self.opt_f.step()
        self.opt_f.zero_grad(set_to_none=True)
        self.mark()

    def phase_ms(self) -> dict:
        """Per-phase times of the last call (device events; the bridge-bwd mark comes from a backward hook)."""
        if not self.events:
            return {}
        e = self.events
        # order recorded: start, gen fwd, bridge fwd, real, fake, [z_s grad hook], backward done, adamw, critic, adamw
        times = [a.elapsed_time(b) for a, b in zip(e, e[1:])]
        return dict(zip(self.PHASES, times))


def cross_space_step(
    setup: Setup, clock: Clock, batch: int, compile_models: bool, matmul: float, tflop: float | None = None
) -> dict:
    """Time one composed step; ``tflop`` reuses the eager count (FlopCounterMode does not see inside compiled code)."""
    name = f"DMD2 step SD1.5 (512) <- SD3.5-M (1024), b{batch}" + (" compiled" if compile_models else " eager")
    row: dict = {"name": name}
    step = None
    try:
        with fresh_peak(setup.device):
            step = CrossSpaceStep(setup, batch, compile_models)
            row |= time_ms(step, setup.device, warmup=3, iters=5)
            row["peak_gb"] = peak_memory_gb(setup.device)
        row["phases_ms"] = step.phase_ms()
        row["tflop"] = tflop if tflop is not None else count_flops(step) / 1e12
        row["mfu"] = row["tflop"] * 1e12 / (row["ms"] * 1e-3) / matmul
        phases = row["phases_ms"]
        if phases:
            bridge = phases["bridge fwd"] + phases["bridge bwd"]
            row["bridge_share"] = bridge / sum(phases.values())
        row["samples_per_s"] = batch / (row["ms"] * 1e-3)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err)[:200]}"
    print(f"[{clock.elapsed():5.0f} s] {name}: {row}", flush=True)
    del step
    gc.collect()
    torch._dynamo.reset()
    return row


def flux_memory(setup: Setup, clock: Clock, lora_rank: int) -> dict:
    """SD 1.5 ← FLUX.1-dev at batch 1 on one GPU: base FLUX as real score, base + LoRA as fake score."""
    from peft import LoraConfig

    dev, row = setup.device, {"name": f"SD1.5 <- FLUX.1-dev 1024px b1, LoRA r{lora_rank}, grad checkpointing"}
    cfg = flux_dev_config(setup.tiny)
    with fresh_peak(dev):
        flux = build(FluxTransformer2DModel, cfg, dev, setup.dtype).requires_grad_(False)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
        flux.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=targets))
        flux.enable_gradient_checkpointing()
        gen, vae, proj = setup.unet(), setup.decoder(), setup.projector().requires_grad_(False)
        opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-6, foreach=True)
        lora = [p for p in flux.parameters() if p.requires_grad]
        opt_f = torch.optim.AdamW(lora, lr=1e-6, foreach=True)
        row["weights_gb"] = peak_memory_gb(dev)
        print(f"[{clock.elapsed():5.0f} s] FLUX + LoRA + generator built: {row['weights_gb']} GB", flush=True)
        row["lora_params_m"] = sum(p.numel() for p in lora) / 1e6
        noise, emb = setup.unet_inputs(1)
        t = torch.full((1,), 999, device=dev)
        side = 2 * setup.student_latent  # Teacher latent side (128 at 1024 px); FLUX packs 2×2 patches
        img_ids = torch.zeros(side // 2, side // 2, 3, device=dev)
        img_ids[..., 1] += torch.arange(side // 2, device=dev)[:, None]
        img_ids[..., 2] += torch.arange(side // 2, device=dev)[None, :]
        img_ids = img_ids.reshape(-1, 3)
        txt_ids = torch.zeros(setup.flux_text_len, 3, device=dev)
        cond = dict(
            encoder_hidden_states=setup.randn(1, setup.flux_text_len, cfg["joint_attention_dim"]),
            pooled_projections=setup.randn(1, cfg["pooled_projection_dim"]),
            guidance=torch.full((1,), 3.5, device=dev),
            img_ids=img_ids,
            txt_ids=txt_ids,
        )

        def pack(z: Tensor) -> Tensor:
            b, c, h, w = z.shape
            return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)

        def flux_call(x: Tensor, sigma: Tensor) -> Tensor:
            return flux(hidden_states=x, timestep=sigma, return_dict=False, **cond)[0]

        def generator_update() -> Tensor:
            eps = gen(noise, t, encoder_hidden_states=emb, return_dict=False)[0]
            z_t = pack(proj(vae.decode((noise - SQRT_1M_AB * eps) / SQRT_AB / SD15_SCALE, return_dict=False)[0]))
            with torch.no_grad():
                sigma = torch.rand(1, device=dev, dtype=setup.dtype)
                x = (1 - sigma) * z_t + sigma * torch.randn_like(z_t)
                flux.disable_adapters()  # real score: the base model (guidance embedding instead of CFG)
                mu_real = x - sigma * flux_call(x, sigma)
                flux.enable_adapters()
                mu_fake = x - sigma * flux_call(x, sigma)
                g = (mu_fake - mu_real) / (z_t - mu_real).abs().mean()
            (0.5 * (z_t.float() - (z_t - g).detach().float()).square().mean()).backward()
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            return z_t.detach()

        def critic_update(z_t: Tensor) -> None:
            flux.train()  # checkpointing is active in training mode only
            sigma = torch.rand(1, device=dev, dtype=setup.dtype)
            eps = torch.randn_like(z_t)
            v = flux_call((1 - sigma) * z_t + sigma * eps, sigma)
            (v.float() - (eps - z_t).float()).square().mean().backward()
            opt_f.step()
            opt_f.zero_grad(set_to_none=True)
            flux.eval()

        # cuDNN's fused attention failed in this backward on an H100 (torch 2.11, 2026-11-26: "mha_graph.execute
        # ... is_good()", then an illegal memory access); flash / memory-efficient attention are used instead.
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                z_t = generator_update()
                print(f"[{clock.elapsed():5.0f} s] first generator update done", flush=True)
                critic_update(z_t)  # first runs allocate optimizer states
                print(f"[{clock.elapsed():5.0f} s] first critic update done", flush=True)
                row["generator_update"] = time_ms(generator_update, dev, warmup=1, iters=3)
                row["critic_update"] = time_ms(lambda: critic_update(z_t), dev, warmup=1, iters=3)
                row["peak_gb"] = peak_memory_gb(dev)
                real_fwd = functools.partial(flux_call, z_t, torch.rand(1, device=dev, dtype=setup.dtype))
                with torch.no_grad():
                    fwd, tflop = time_ms(real_fwd, dev, iters=3), count_flops(real_fwd) / 1e12
                row["flux_fwd"] = fwd | {"tflop": tflop, "tflops_per_s": tflop / (fwd["ms"] * 1e-3)}
        except Exception as err:  # OOM or a kernel failure: keep what was measured up to here
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            row["peak_gb"] = peak_memory_gb(dev)
    print(f"[{clock.elapsed():5.0f} s] {row['name']}: {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--sd3-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--student-batch", type=int, default=8, help="UNet and decoder component batch")
    parser.add_argument("--step-batch", type=int, default=2, help="batch of the composed DMD2 step")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=420, help="skip parts that would end after this")
    # "compile" is opt-in: compiling the composed step did not finish within ~340 s on the H100 machine (16 cores),
    # so it needs a run of its own, after "step" (whose eager FLOP count it reuses).
    parser.add_argument(
        "--parts", nargs="+", default=["components", "step", "flux"], choices=["components", "step", "flux", "compile"]
    )
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = Clock(args.budget_s)
    torch.backends.cudnn.benchmark = True
    setup = Setup(args.tiny, device)
    env = environment(device)
    env["bf16_matmul_tflops"] = matmul_tflops(device)
    print(env, flush=True)
    matmul = env["bf16_matmul_tflops"] * 1e12
    report: dict = {"env": env, "command": " ".join(sys.argv), "components": [], "steps": [], "skipped": []}

    # (part, rough cost in s at real size, what it runs): cheapest and most wanted first.
    parts = [
        ("components", 90, lambda: report["components"].extend(
            components(setup, clock, args.sd3_batches, args.student_batch))),
        ("step", 45, lambda: report["steps"].append(cross_space_step(setup, clock, args.step_batch, False, matmul))),
        ("flux", 90, lambda: report.__setitem__("flux", flux_memory(setup, clock, args.lora_rank))),
        ("compile", 400, lambda: report["steps"].append(cross_space_step(
            setup, clock, args.step_batch, True, matmul, next((r.get("tflop") for r in report["steps"]), None)))),
    ]  # fmt: skip
    for name, cost, run in parts:
        if name not in args.parts or (not args.tiny and not clock.allows(cost)):
            report["skipped"].append(f"{name} ({clock.elapsed():.0f} s used of {args.budget_s:.0f} s)")
            continue
        try:
            run()
        except Exception as err:  # one failing part is a result; the rest still runs
            where = traceback.format_exc()[-3000:]
            report.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err)[:1000]}\n{where}"
            print(f"FAILED {name}: {report['errors'][name]}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Written after every part, so a run cut off by its time limit still leaves what it measured.
        write_report(args.out, "train_step", report, to_markdown(report))
    print(to_markdown(report), flush=True)
    return 0


def fmt(x, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def to_markdown(report: dict) -> str:
    env = report["env"]
    mm = env["bf16_matmul_tflops"]
    lines = [
        "# Training-step components at real sizes (random weights, bf16)\n",
        env_markdown(env, report["command"]),
        f"MFU = counted model FLOPs / time / measured bf16 matmul rate ({mm:.0f} TFLOP/s).\n",
        "## Components\n",
        "| piece | ms | TFLOP | TFLOP/s | MFU | peak GB |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["components"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['ms']:.1f} | {r['tflop']:.2f} | {r['tflops_per_s']:.0f} | "
            f"{r['tflops_per_s'] / mm:.0%} | {fmt(r.get('peak_gb'))} |"
        )
    for r in report["steps"]:
        lines += [f"\n## {r['name']}\n"]
        if "error" in r:
            lines.append(r["error"])
            continue
        lines.append(
            f"{r['ms']:.1f} ms per step (1 generator + 1 critic update), {r['samples_per_s']:.1f} samples/s, "
            f"{r['tflop']:.1f} TFLOP, MFU {r['mfu']:.0%}, peak {fmt(r.get('peak_gb'))} GB, "
            f"Bridge share {fmt(r.get('bridge_share'), '.0%')}.\n"
        )
        if r.get("phases_ms"):
            lines += ["| phase | ms |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in r["phases_ms"].items()]
    if "flux" in report:
        f = report["flux"]
        lines += [f"\n## {f['name']}\n"]
        if "error" in f:
            lines.append(f"{f['error']} (peak {fmt(f.get('peak_gb'))} GB)")
        else:
            ff = f["flux_fwd"]
            lines.append(
                f"Weights resident {fmt(f['weights_gb'])} GB (LoRA {f['lora_params_m']:.0f} M params); peak "
                f"{fmt(f['peak_gb'])} GB of {env.get('gpu_memory_gb', '–')} GB. Generator update "
                f"{f['generator_update']['ms']:.0f} ms, critic update {f['critic_update']['ms']:.0f} ms; "
                f"FLUX fwd {ff['ms']:.0f} ms, {ff['tflop']:.1f} TFLOP ({ff['tflops_per_s'] / mm:.0%} MFU)."
            )
    if report["skipped"] or report.get("errors"):
        lines.append(f"\nSkipped: {report['skipped']}; errors: {report.get('errors', {})}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
