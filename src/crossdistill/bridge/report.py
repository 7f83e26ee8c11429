"""``crossdistill bridge report``: what every user needs before spending GPU-days on stage 2 (DESIGN.md §2).

For each Bridge, on held-out images ``x`` with prompts ``c`` (``z_s = E_s(x)``, ``z_t* = E_t(x)``, ``ẑ_t = B(z_s)``):

- latent MSE ``‖ẑ_t − z_t*‖²`` (mean over elements, normalised Teacher latents);
- PSNR of ``D_t(ẑ_t)`` against ``x`` at the Teacher's resolution (pixels in [0, 1], per image, then averaged);
- attention fidelity ``Σ_l KL(A_l(z_t*) ‖ A_l(ẑ_t))`` and Teacher x0 agreement ``‖x0(ẑ_t) − x0(z_t*)‖²``, each at a
  few fixed Teacher times τ with one fixed noise per image, the same for every Bridge;
- cost of one sample through the Bridge: FLOPs (``torch.utils.flop_counter``) and wall-clock ms.

Written as ``report.md`` / ``report.html``, ``bridge_report.json`` and ``bridge_grid.png`` (rows: image, Student
decode, Teacher decode of the true latent, Teacher decode of each Bridge's latent).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from crossdistill.bridge.model import Bridge
from crossdistill.bridge.train import collate, encode_pairs, evenly_spaced, resize
from crossdistill.config import atomic_write_text
from crossdistill.errors import SpaceMismatchError
from crossdistill.eval.report import Report, image_grid, to_uint8
from crossdistill.losses.bridge import reconstruction_loss, teacher_agreement
from crossdistill.models.base import Space
from crossdistill.train.seeding import step_generator

DEFAULT_TAUS = (0.25, 0.5, 0.75)


@dataclass
class Candidate:
    """One row of the report: a Bridge, or the reason it cannot exist for these spaces (identity across spaces)."""

    name: str
    kind: str
    bridge: Bridge | None = None
    unavailable: str | None = None


def psnr(image: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of ``[B, 3, H, W]`` images in [-1, 1] (clamped), on the [0, 1] scale."""
    mse = ((image.float().clamp(-1, 1) - reference.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def measure_cost(bridge: Bridge, z_s: Tensor, repeats: int = 5) -> dict[str, float]:
    """FLOPs and median wall-clock ms of ``bridge(z_s)`` for one sample ``[1, C, h, w]``."""
    with FlopCounterMode(display=False) as counter:
        bridge(z_s)
    times = []
    for _ in range(repeats + 1):  # the first run warms caches and is dropped
        if z_s.is_cuda:
            torch.cuda.synchronize(z_s.device)
        tick = time.perf_counter()
        bridge(z_s)
        if z_s.is_cuda:
            torch.cuda.synchronize(z_s.device)
        times.append((time.perf_counter() - tick) * 1e3)
    return {"gflops": counter.get_total_flops() / 1e9, "ms": statistics.median(times[1:])}


@torch.no_grad()
def evaluate(
    candidates: Sequence[Candidate],
    student: Space,
    teacher: Space,
    dataset,
    *,
    num_images: int = 64,
    taus: Sequence[float] = DEFAULT_TAUS,
    batch_size: int = 16,
    num_grid: int = 8,
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[dict, Image.Image]:
    """Metrics of every available candidate on ``num_images`` of ``dataset`` (spread evenly), and the image grid."""
    device = next(teacher.codec.parameters()).device
    n = min(num_images, len(dataset))
    dataset = evenly_spaced(dataset, n)
    live = [c for c in candidates if c.bridge is not None]
    sums: dict[str, dict[str, float]] = {c.name: {} for c in live}
    reference = {"teacher_vae_psnr": 0.0, "student_vae_psnr": 0.0}
    grid_rows: dict[str, list[Tensor]] = {}

    def add(name: str, key: str, value: Tensor) -> None:
        sums[name][key] = sums[name].get(key, 0.0) + float(value.sum())

    for start in range(0, n, batch_size):
        pixels, captions = collate(dataset, list(range(start, min(start + batch_size, n))))
        b = len(captions)
        z_s, z_t, cond = encode_pairs(student, teacher, pixels, captions)
        cond = cond.to(device)
        target = resize(pixels, teacher.resolution).to(device)
        true_decode = teacher.codec.decode(z_t)
        student_decode = resize(student.codec.decode(z_s).float(), teacher.resolution)
        reference["teacher_vae_psnr"] += float(psnr(true_decode, target).sum())
        reference["student_vae_psnr"] += float(psnr(student_decode, target).sum())
        rows = {"image": target, "Student decode": student_decode, "Teacher decode (true latent)": true_decode}
        # One fixed noise per image and τ, shared by every Bridge, so their fidelities are compared like for like.
        gen = step_generator(seed, 0, start, device, stream="report")
        noises = [torch.randn(z_t.shape, generator=gen, device=device) for _ in taus]
        for c in live:
            z_hat = c.bridge(z_s).float()
            add(c.name, "latent_mse", reconstruction_loss(z_hat, z_t) * b)
            decoded = teacher.codec.decode(z_hat)
            add(c.name, "psnr_db", psnr(decoded, target))
            rows[c.name] = decoded
            for tau, eps in zip(taus, noises):
                t = torch.full((b,), float(tau), device=device)
                attn, out = teacher_agreement(z_hat, z_t, teacher, cond, t, eps, "kl", layers)
                add(c.name, f"attention_kl@{tau:g}", attn * b)
                add(c.name, f"x0_mse@{tau:g}", out * b)
        if start == 0:
            grid_rows = {k: v[:num_grid].float().cpu() for k, v in rows.items()}

    results: dict = {
        "num_images": n,
        "taus": list(taus),
        "reference": {k: v / n for k, v in reference.items()},
        "bridges": {},
    }
    probe = encode_pairs(student, teacher, *collate(dataset, [0]))[0]
    for c in candidates:
        if c.bridge is None:
            results["bridges"][c.name] = {"kind": c.kind, "unavailable": c.unavailable}
            continue
        metrics = {k: v / n for k, v in sums[c.name].items()}
        metrics["attention_kl"] = statistics.fmean(metrics[f"attention_kl@{tau:g}"] for tau in taus)
        metrics["x0_mse"] = statistics.fmean(metrics[f"x0_mse@{tau:g}"] for tau in taus)
        metrics["trainable_params"] = sum(p.numel() for p in c.bridge.parameters())
        results["bridges"][c.name] = {"kind": c.kind, **metrics, **measure_cost(c.bridge, probe)}
    grid = image_grid(
        [[Image.fromarray(a) for a in to_uint8(images)] for images in grid_rows.values()],
        row_labels=list(grid_rows),
    )
    return results, grid


def candidates_for(
    bridge_dirs: Sequence[tuple[str, Path]], kinds: Sequence[str], student: Space, teacher: Space
) -> list[Candidate]:
    """Saved Bridges (``(name, dir)``) plus freshly built weightless kinds; identity across spaces is n/a."""
    out = []
    for name, path in bridge_dirs:
        bridge = Bridge.load(path, student, teacher).to(next(teacher.codec.parameters()).device).eval()
        out.append(Candidate(name, bridge.config.kind, bridge))
    for kind in kinds:
        try:
            out.append(Candidate(kind, kind, Bridge.build(kind, student, teacher).eval()))
        except SpaceMismatchError as err:
            out.append(Candidate(kind, kind, unavailable=str(err)))
    return out


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def write_report(results: dict, grid: Image.Image, out_dir: str | Path, command: str = "") -> Path:
    """``report.md``/``report.html``, ``bridge_report.json`` and ``bridge_grid.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "bridge_report.json", json.dumps(results, indent=2) + "\n")
    grid.save(out_dir / "bridge_grid.png")
    taus = results["taus"]
    header = ["bridge", "kind", "latent MSE ↓", "Teacher-decoded PSNR dB ↑", "attention KL ↓", "x0 MSE ↓"]
    header += ["params", "GFLOPs/sample", "ms/sample"]
    rows = []
    for name, m in results["bridges"].items():
        if "unavailable" in m:
            rows.append([name, m["kind"], *["n/a"] * (len(header) - 2)])
            continue
        rows.append(
            [
                name,
                m["kind"],
                _fmt(m["latent_mse"]),
                f"{m['psnr_db']:.2f}",
                _fmt(m["attention_kl"]),
                _fmt(m["x0_mse"]),
                f"{m['trainable_params']:,}",
                _fmt(m["gflops"], 3),
                f"{m['ms']:.2f}",
            ]
        )
    ref = results["reference"]
    report = Report("Bridge report")
    if command:
        report.code(command)
    report.text(
        f"{results['num_images']} held-out images. Attention KL and x0 MSE are means over τ ∈ "
        f"{{{', '.join(f'{t:g}' for t in taus)}}} (per τ in bridge_report.json). For reference, the Teacher VAE's "
        f"own round trip D_t(E_t(x)) gives {ref['teacher_vae_psnr']:.2f} dB and the Student's, upsampled to the "
        f"Teacher resolution, {ref['student_vae_psnr']:.2f} dB."
    )
    report.table(header, rows)
    for name, m in results["bridges"].items():
        if "unavailable" in m:
            report.text(f"{name}: n/a — {m['unavailable']}")
    report.image("bridge_grid.png", "rows: image, Student decode, Teacher decode of the true latent, then each Bridge")
    md, _ = report.write(out_dir)
    return md
