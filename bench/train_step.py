"""Benchmark: what a DMD2 training step costs at real architecture sizes, and what each speed option buys.

The step is composed from the real model classes with random weights (speed does not depend on weight values) and
the trainer's own speed options (crossdistill.train.perf: regional compile, fused AdamW, LoRA fake score):

1. step: one cross-space DMD2 step SD 1.5 (512 px) <- SD3.5-Medium (1024 px): generator update (UNet -> x0 ->
   frozen decoder -> projector -> real score with CFG, fake score, DM loss, backward, AdamW) + one critic update
   (fake score fwd+bwd, AdamW), timed phase by phase; variants eager / fused AdamW / compiled / batch 4 with a
   LoRA fake score, beside the same-space SD 1.5 DMD2 step (the shared-space baseline);
2. flux: SD 1.5 <- FLUX.1-dev at 1024 px batch 1 on one GPU: one base transformer serves as real score (adapter
   off) and, with a LoRA, as fake score (gradient checkpointing): peak memory and update times;
3. ddp: the step under ``accelerate launch`` (DDP over generator and fake score); bench/train_scaling.py runs it on
   1 and N GPUs and reports the scaling;
4. components (opt-in): each model pass alone, fwd and fwd+bwd.

FLOPs are counted with torch's FlopCounterMode on the eager step; MFU is over the bf16 matmul rate measured in the
same run.

    PYTHONUNBUFFERED=1 python bench/train_step.py --out $OUT              # GPU, real sizes: step variants, flux
    python bench/train_step.py --tiny --out /tmp/bench                     # CPU smoke test, tiny configs
    accelerate launch --cpu --num_processes 2 bench/train_step.py --tiny --parts ddp --out /tmp/bench   # DDP smoke
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import functools
import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
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
    fmt,
    fresh_peak,
    matmul_tflops,
    peak_memory_gb,
    sd15_unet_config,
    sd15_vae_config,
    sd35_medium_config,
    sync,
    time_ms,
    write_report,
)
from crossdistill.bridge.model import Projector, decoder_features, prior_geometry
from crossdistill.train.distill import LORA_TARGETS
from crossdistill.train.perf import MODULE_SWAPS, compile_blocks, make_adamw, to_channels_last

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

    def projector(self, prior_up_blocks: int | None = None) -> Projector:
        # The real Bridge projector P_φ: decoded 512 px image (or the decoder's features after prior_up_blocks
        # up-blocks) → 128×128×16 Teacher latent grid.
        channels = list(sd15_vae_config(self.tiny)["block_out_channels"])
        space = {"resolution": 8 * self.student_latent, "latent_size": self.student_latent}
        in_ch, in_size = prior_geometry(space, prior_up_blocks, channels)
        out_size = 2 * self.student_latent  # the Teacher latent grid: 1024 px / 8
        p = Projector(in_ch, 16, in_size, out_size, hidden=32 if self.tiny else 128, num_blocks=4)
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


def switch_options(m: nn.Module, *, channels_last: bool, **swaps: bool) -> None:
    """The trainer's layout and module-swap speed options on one module, in place, in the trainer's order:
    train.channels_last, then each of perf.MODULE_SWAPS (``swaps`` names every one of them, on or off)."""
    if set(swaps) != set(MODULE_SWAPS):
        raise TypeError(f"switch_options wants exactly {sorted(MODULE_SWAPS)}, got {sorted(swaps)}")
    if channels_last:
        to_channels_last(m)
    for key, switch in MODULE_SWAPS.items():
        if swaps[key]:
            switch(m)


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


@dataclass(frozen=True)
class StepOptions:
    """One variant of the composed DMD2 step: the trainer's speed options (crossdistill.train.perf) and its shape."""

    teacher: str = "sd35m"  # "sd35m": SD3.5-Medium at 1024 px through the Bridge; "sd15": same-space SD 1.5 DMD2
    batch: int = 2
    compile: bool = False  # regional torch.compile of every repeated block (perf.compile_blocks)
    fused_adamw: bool = False  # fused single-kernel AdamW (perf.make_adamw); off = foreach
    fake: str = "copy"  # fake score: a full copy of the Teacher, or "lora" on the shared Teacher base
    channels_last: bool = False  # NHWC weights for UNets, decoder and projector (perf.to_channels_last)
    subpixel: bool = False  # UNet / decoder upsample convs in sub-pixel form (models.subpixel)
    prior_up_blocks: int | None = None  # the Bridge prior: full decode (None) or the decoder's first k up-blocks
    channel_stats_norm: bool = False  # GroupNorm statistics per channel, then per group (models.groupnorm)
    wide_head_attention: bool = False  # the decoder's 512-wide attention head as matmuls (models.wide_attention)
    lora_rank: int = 64

    @property
    def name(self) -> str:
        what = "SD1.5 (512) <- SD3.5-M (1024)" if self.teacher == "sd35m" else "SD1.5 (512) <- SD1.5 (512), same space"
        opts = ["compiled" if self.compile else "eager", "fused AdamW" if self.fused_adamw else "foreach AdamW"]
        if self.fake == "lora":
            opts.append(f"LoRA r{self.lora_rank} fake score")
        if self.channels_last:
            opts.append("channels_last")
        if self.subpixel:
            opts.append("subpixel_upsample")
        if self.channel_stats_norm:
            opts.append("channel_stats_norm")
        if self.wide_head_attention:
            opts.append("wide_head_attention")
        if self.prior_up_blocks is not None:
            opts.append(f"Bridge prior = {self.prior_up_blocks} decoder up-blocks")
        return f"DMD2 step {what}, b{self.batch}, {', '.join(opts)}"


class DMD2Step:
    """One DMD2 step (one generator update + one critic update) composed from the real model classes.

    Cross-space (``teacher="sd35m"``): ``z_s = G(noise)``, ``ẑ_t = P(D(z_s))`` (frozen SD 1.5 decoder + projector),
    flow-matching noise at τ, real score with CFG (two batches), fake score,
    ``g = (μ_fake − μ_real) / mean|ẑ_t − μ_real|``, ``L = ½‖ẑ_t − sg(ẑ_t − g)‖²``, backward into the UNet, AdamW;
    critic update: the fake score's flow-matching loss on ``sg(ẑ_t)``, AdamW. Same-space (``teacher="sd15"``):
    the same with SD 1.5 UNets as real and fake score and no Bridge (ε-prediction, DDPM time).

    With an ``accelerator`` (``accelerate launch``), the generator and the fake score are wrapped by
    ``accelerator.prepare`` (DDP), as in the trainer; the frozen real score is not.
    """

    PHASES = (
        "generator fwd", "bridge fwd", "real score fwd (CFG x2)", "fake score fwd", "bridge bwd",
        "generator bwd", "generator AdamW", "critic fwd+bwd", "critic AdamW",
    )  # fmt: skip

    def __init__(self, setup: Setup, opts: StepOptions, cfg_scale: float = 4.5, accelerator=None) -> None:
        self.setup, self.opts, self.cfg_scale, self.batch = setup, opts, cfg_scale, opts.batch
        b = opts.batch
        self.gen = setup.unet()
        self.cross = opts.teacher == "sd35m"
        if self.cross:
            self.vae = setup.decoder()
            self.proj = setup.projector(opts.prior_up_blocks).requires_grad_(False)
            self.real = setup.sd3().requires_grad_(False)
            self.cond, self.uncond = setup.sd3_cond(b), setup.sd3_cond(b)
        else:
            self.vae = self.proj = None
            self.real = setup.unet().requires_grad_(False)
            self.cond = {"encoder_hidden_states": setup.unet_inputs(b)[1]}
            self.uncond = {"encoder_hidden_states": setup.unet_inputs(b)[1]}
        if opts.fake == "lora":
            from peft import LoraConfig

            names = {n.rsplit(".", 1)[-1] for n, _ in self.real.named_modules()} | {"to_out.0"}
            targets = [t for t in LORA_TARGETS if t in names]
            self.real.add_adapter(LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_rank, target_modules=targets))
            self.fake = self.real
        else:
            self.fake = copy.deepcopy(self.real).requires_grad_(True)
        # The convolutional modules: the trainer's train.channels_last / subpixel_upsample / channel_stats_norm /
        # wide_head_attention touch the same ones.
        conv = [self.gen] + ([self.vae.decoder, self.proj] if self.cross else [self.real, self.fake])
        for m in conv:
            switch_options(m, channels_last=opts.channels_last, subpixel_upsample=opts.subpixel,
                           channel_stats_norm=opts.channel_stats_norm, wide_head_attention=opts.wide_head_attention)
        if opts.compile:
            modules = [self.gen, self.real] + ([] if self.fake is self.real else [self.fake])
            modules += [self.vae.decoder, self.proj] if self.cross else []
            self.compiled_blocks = sum(compile_blocks(m) for m in modules)
        # bf16 params and bf16 optimizer states (the trainer keeps fp32 masters under mixed precision).
        fake_params = [p for p in self.fake.parameters() if p.requires_grad]
        self.opt_g = make_adamw(self.gen.parameters(), lr=1e-6, weight_decay=0.01, fused=opts.fused_adamw)
        self.opt_f = make_adamw(fake_params, lr=1e-6, weight_decay=0.01, fused=opts.fused_adamw)
        if not opts.fused_adamw:  # the baseline: torch's multi-tensor update, also on CPU
            for opt in (self.opt_g, self.opt_f):
                opt.defaults["foreach"] = True
                for group in opt.param_groups:
                    group["foreach"] = True
        self.gen_call, self.fake_call = self.gen, self.fake
        if accelerator is not None:
            self.gen_call, self.opt_g = accelerator.prepare(self.gen, self.opt_g)
            if self.fake is not self.real:
                self.fake_call, self.opt_f = accelerator.prepare(self.fake, self.opt_f)
        self.noise, self.emb = setup.unet_inputs(b)
        if opts.channels_last:
            self.noise = self.noise.contiguous(memory_format=torch.channels_last)
        self.both = {k: torch.cat([self.cond[k], self.uncond[k]]) for k in self.cond}
        self.t = torch.full((b,), 999, device=setup.device)
        self.events: list = []

    def mark(self) -> None:
        if self.setup.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append(ev)

    def teacher(self, model: nn.Module, x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
        """The Teacher-space denoiser's raw output: SD3 velocity, or SD 1.5 ε at DDPM time σ × 999."""
        if self.cross:
            return sd3_call(model, x, sigma, cond)
        return model(x, sigma * 999, return_dict=False, **cond)[0]

    def real_score(self, x: Tensor, sigma: Tensor) -> Tensor:
        lora = self.opts.fake == "lora"
        if lora:
            self.real.disable_adapters()  # real score: the shared base with the fake score's adapter off
        out = self.teacher(self.real, torch.cat([x, x]), sigma.repeat(2), self.both)
        if lora:
            self.real.enable_adapters()
        return out

    def __call__(self) -> None:
        self.events = []
        self.mark()
        eps = self.gen_call(self.noise, self.t, encoder_hidden_states=self.emb, return_dict=False)[0]
        z_s = (self.noise - SQRT_1M_AB * eps) / SQRT_AB
        self.mark()
        if self.cross:
            if self.opts.prior_up_blocks is None:
                prior = self.vae.decode(z_s / SD15_SCALE, return_dict=False)[0]
            else:
                prior = decoder_features(self.vae, z_s / SD15_SCALE, self.opts.prior_up_blocks)
            z_t = self.proj(prior)
        else:
            z_t = z_s * 1.0  # no Bridge: the Student's latent is the Teacher's
        self.mark()
        # A backward hook marks where the gradient has passed the projector and the decoder.
        z_s.register_hook(lambda g: self.mark())
        with torch.no_grad():
            sigma = torch.rand(self.batch, device=z_t.device, dtype=z_t.dtype)
            s = sigma.view(-1, 1, 1, 1)
            x = (1 - s) * z_t + s * torch.randn_like(z_t)
            v_cond, v_uncond = self.real_score(x, sigma).chunk(2)
            mu_real = x - s * (v_uncond + self.cfg_scale * (v_cond - v_uncond))
            self.mark()
            mu_fake = x - s * self.teacher(self.fake_call, x, sigma, self.cond)
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
        out = self.teacher(self.fake_call, x, sigma, self.cond)
        critic_loss = (out.float() - (eps_c - z_t).float()).square().mean()
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


def measure_step(setup: Setup, opts: StepOptions, matmul: float, *, iters: int = 5, accelerator=None) -> dict:
    """Build one step variant, run its first step (compile, optimizer-state allocation), time it, and count its
    FLOPs on the same step run eagerly (``force_eager``: FlopCounterMode does not see inside compiled code; the
    arithmetic is the same). Under ``accelerate launch`` every rank runs all of it (DDP's all-reduces need both)."""
    row: dict = {}
    t0 = time.monotonic()
    step = DMD2Step(setup, opts, accelerator=accelerator)
    step()
    sync(setup.device)
    row["first_step_s"] = time.monotonic() - t0
    if accelerator is not None:
        accelerator.wait_for_everyone()
    row |= time_ms(step, setup.device, warmup=2, iters=iters)
    row["peak_gb"] = peak_memory_gb(setup.device)
    row["compiled_blocks"] = getattr(step, "compiled_blocks", 0)
    row["phases_ms"] = phases = step.phase_ms()  # of the last timed call
    if phases and step.cross:
        row["bridge_share"] = (phases["bridge fwd"] + phases["bridge bwd"]) / sum(phases.values())
    with torch.compiler.set_stance("force_eager"):
        row["tflop"] = count_flops(step) / 1e12
    row["mfu"] = row["tflop"] * 1e12 / (row["ms"] * 1e-3) / matmul
    row["samples_per_s"] = opts.batch / (row["ms"] * 1e-3)
    return row


def dmd2_step(setup: Setup, clock: Clock, opts: StepOptions, matmul: float, *, iters: int = 5) -> dict:
    """Time one composed step variant on one GPU; an OOM is recorded, not raised."""
    row: dict = {"name": opts.name, "options": asdict(opts)}
    try:
        with fresh_peak(setup.device):
            row |= measure_step(setup, opts, matmul, iters=iters)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err)[:200]}"
    print(f"[{clock.elapsed():5.0f} s] {opts.name}: {row}", flush=True)
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
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
        opt_g = make_adamw(gen.parameters(), lr=1e-6, weight_decay=0.01)  # fused: no foreach temporaries
        lora = [p for p in flux.parameters() if p.requires_grad]
        opt_f = make_adamw(lora, lr=1e-6, weight_decay=0.01)
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


# The step variants, by key: (options, rough cost in s at real size on an H100 incl. compile). Eager first, so each
# option's effect is read against the row above it in one run.
VARIANTS: dict[str, tuple[StepOptions, float]] = {
    "eager": (StepOptions(), 45),
    "fused": (StepOptions(fused_adamw=True), 40),
    "same_eager": (StepOptions(teacher="sd15", fused_adamw=True), 25),
    "compiled": (StepOptions(compile=True, fused_adamw=True), 240),
    "same_compiled": (StepOptions(teacher="sd15", compile=True, fused_adamw=True), 60),
    "fused_b4_lora": (StepOptions(batch=4, fused_adamw=True, fake="lora"), 50),
    "compiled_b4_lora": (StepOptions(batch=4, compile=True, fused_adamw=True, fake="lora"), 150),
    "compiled_b4": (StepOptions(batch=4, compile=True, fused_adamw=True), 150),
    "fused_b4": (StepOptions(batch=4, fused_adamw=True), 50),
    "compiled_cl": (StepOptions(compile=True, fused_adamw=True, channels_last=True), 240),
    "compiled_b4_cl": (StepOptions(batch=4, compile=True, fused_adamw=True, channels_last=True), 150),
    "fused_sp": (StepOptions(fused_adamw=True, subpixel=True), 40),
    "compiled_sp": (StepOptions(compile=True, fused_adamw=True, subpixel=True), 120),
    "compiled_b4_sp": (StepOptions(batch=4, compile=True, fused_adamw=True, subpixel=True), 150),
    "compiled_b4_prior3": (StepOptions(batch=4, compile=True, fused_adamw=True, prior_up_blocks=3), 150),
    "compiled_b4_prior2": (StepOptions(batch=4, compile=True, fused_adamw=True, prior_up_blocks=2), 150),
    "compiled_b4_sp_cl": (
        StepOptions(batch=4, compile=True, fused_adamw=True, subpixel=True, channels_last=True), 150),
    "compiled_b4_csn": (StepOptions(batch=4, compile=True, fused_adamw=True, channel_stats_norm=True), 150),
    "compiled_b4_cl_csn": (
        StepOptions(batch=4, compile=True, fused_adamw=True, channels_last=True, channel_stats_norm=True), 150),
    "compiled_b4_cl_csn_wide": (StepOptions(batch=4, compile=True, fused_adamw=True, channels_last=True,
                                            channel_stats_norm=True, wide_head_attention=True), 150),
    "compiled_b4_cl_csn_sp": (StepOptions(batch=4, compile=True, fused_adamw=True, channels_last=True,
                                          channel_stats_norm=True, subpixel=True), 150),
}
DEFAULT_VARIANTS = ["eager", "fused", "same_eager", "compiled", "same_compiled", "compiled_b4_lora"]


def ddp_step(setup: Setup, clock: Clock, opts: StepOptions, accelerator, matmul: float, *, iters: int = 5) -> dict:
    """The step under ``accelerate launch``: DDP over the generator and fake score, each process its own batch.
    Every rank times the same calls (they synchronise in the gradient all-reduce); rank 0's numbers are reported."""
    world = accelerator.num_processes
    row: dict = {"name": f"{opts.name}, {world} process(es)", "options": asdict(opts), "world_size": world}
    row |= measure_step(setup, opts, matmul, iters=iters, accelerator=accelerator)
    row["samples_per_s_per_gpu"] = row["samples_per_s"]
    row["samples_per_s"] = world * row["samples_per_s_per_gpu"]
    print(f"[{clock.elapsed():5.0f} s] rank {accelerator.process_index}: {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--sd3-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--student-batch", type=int, default=8, help="UNet and decoder component batch")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=540, help="skip parts / variants that would end after this")
    parser.add_argument(
        "--parts", nargs="+", default=["step", "flux"], choices=["components", "step", "flux", "ddp"],
        help="components: each model pass alone (measured 2026-11-26, see docs/performance.md); step: the composed "
        "DMD2 step variants; flux: SD 1.5 <- FLUX.1-dev on one GPU; ddp: the step under `accelerate launch` "
        "(bench/train_scaling.py runs it for 1 and N GPUs)",
    )  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--ddp-variant", default="compiled", choices=list(VARIANTS))
    parser.add_argument("--dump-stacks-after-s", type=float, default=0,
                        help="ddp: dump every thread's stack and exit after this long (hangs)")  # fmt: skip
    args = parser.parse_args(argv)

    accelerator = None
    if "ddp" in args.parts:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        device = accelerator.device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = Clock(args.budget_s)
    torch.backends.cudnn.benchmark = True
    setup = Setup(args.tiny, device)
    env = environment(device)
    env["bf16_matmul_tflops"] = matmul_tflops(device)
    print(env, flush=True)
    matmul = env["bf16_matmul_tflops"] * 1e12
    report: dict = {"env": env, "command": " ".join(sys.argv), "components": [], "steps": [], "skipped": []}
    name = "train_step"

    # (part, rough cost in s at real size, what it runs): cheapest and most wanted first.
    parts: list[tuple[str, float, Callable[[], None]]] = []
    if "components" in args.parts:
        parts.append(("components", 90, lambda: report["components"].extend(
            components(setup, clock, args.sd3_batches, args.student_batch))))  # fmt: skip
    if "step" in args.parts:
        for key in args.variants:
            opts, cost = VARIANTS[key]
            opts = replace(opts, lora_rank=args.lora_rank)
            parts.append((f"step:{key}", cost, functools.partial(
                lambda o: report["steps"].append(dmd2_step(setup, clock, o, matmul)), opts)))  # fmt: skip
    if "flux" in args.parts:
        parts.append(("flux", 90, lambda: report.__setitem__("flux", flux_memory(setup, clock, args.lora_rank))))
    if "ddp" in args.parts:
        name = f"train_step_ddp{accelerator.num_processes}"
        opts = replace(VARIANTS[args.ddp_variant][0], lora_rank=args.lora_rank)
        report["ddp"] = None
        if args.dump_stacks_after_s > 0:
            faulthandler.dump_traceback_later(args.dump_stacks_after_s, exit=True)
        parts.append(("ddp", 0, lambda: report.__setitem__("ddp", ddp_step(setup, clock, opts, accelerator, matmul))))
    main_process = accelerator is None or accelerator.is_main_process
    for part, cost, run in parts:
        if not args.tiny and not clock.allows(cost):
            report["skipped"].append(f"{part} ({clock.elapsed():.0f} s used of {args.budget_s:.0f} s)")
            continue
        try:
            run()
        except Exception as err:  # one failing part is a result; the rest still runs
            where = traceback.format_exc()[-3000:]
            report.setdefault("errors", {})[part] = f"{type(err).__name__}: {str(err)[:1000]}\n{where}"
            print(f"FAILED {part}: {report['errors'][part]}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Written after every part, so a run cut off by its time limit still leaves what it measured.
        if main_process:
            write_report(args.out, name, report, to_markdown(report))
    faulthandler.cancel_dump_traceback_later()
    if main_process:
        print(to_markdown(report), flush=True)
    if accelerator is not None:
        accelerator.end_training()
    return 1 if accelerator is not None and report.get("errors") else 0


def to_markdown(report: dict) -> str:
    env = report["env"]
    mm = env["bf16_matmul_tflops"]
    lines = [
        "# Training step at real sizes (random weights, bf16)\n",
        env_markdown(env, report["command"]),
        f"MFU = counted FLOPs / time / measured bf16 matmul rate ({mm:.0f} TFLOP/s). The FLOPs are those the "
        "variant executes: the sub-pixel upsample computes the same function with fewer, so it is not credited "
        "with the FLOPs it skips.\n",
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
    if report["steps"]:
        lines += [
            "\n## Composed DMD2 steps (1 generator + 1 critic update)\n",
            "| variant | ms / step | samples/s | TFLOP | MFU | peak GB | Bridge share | first step s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["steps"]:
            if "error" in r:
                lines.append(f"| {r['name']} | {r['error'][:100]} | | | | | | |")
                continue
            lines.append(
                f"| {r['name']} | {r['ms']:.1f} | {r['samples_per_s']:.2f} | {r['tflop']:.1f} | {r['mfu']:.0%} "
                f"| {fmt(r.get('peak_gb'))} | {fmt(r.get('bridge_share'), '.1%')} | {fmt(r.get('first_step_s'))} |"
            )
        ok = [r for r in report["steps"] if r.get("phases_ms")]
        if ok:
            lines += ["\nPhase times (ms, device events):\n", "| phase | " + " | ".join(
                f"v{i + 1}" for i in range(len(ok))) + " |", "|---|" + "---|" * len(ok)]  # fmt: skip
            for phase in DMD2Step.PHASES:
                lines.append(f"| {phase} | " + " | ".join(fmt(r["phases_ms"].get(phase)) for r in ok) + " |")
            lines.append("\n" + "; ".join(f"v{i + 1} = {r['name']}" for i, r in enumerate(ok)) + ".")
    if report.get("ddp"):
        r = report["ddp"]
        lines += [
            f"\n## {r['name']}\n",
            f"{r['ms']:.1f} ms per step per process, {r['samples_per_s']:.2f} samples/s in all "
            f"({r['samples_per_s_per_gpu']:.2f} per GPU), peak {fmt(r.get('peak_gb'))} GB.",
        ]
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
