"""``crossdistill generate``: prompts in, PNGs out, one step, from an exported one-step pipeline folder.

On a GPU the step runs through :mod:`crossdistill.export.fast` (compiled, CUDA graphs, bf16); elsewhere through
the plain diffusers pipeline. Both take the same prompt embeddings and the same seeded noise as ``latents``, so a
seed gives the same picture either way (up to the fast path's dtype).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from PIL import Image

from crossdistill.errors import DataError, ModelLoadError


def read_prompt_args(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    prompts = list(prompt or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise DataError(f"prompt file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DataError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def load_pipeline(folder: str | Path, device: str, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not an exported pipeline folder (no model_index.json): crossdistill export")
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(
    folder: str | Path, prompts: list[str], *, seed: int = 0, batch_size: int = 8, device: str | None = None,
    fast: bool | None = None,
) -> list[Image.Image]:  # fmt: skip
    """One image per prompt; image ``i`` uses noise seeded by ``(seed, i)`` whatever the batch size."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fast = device.startswith("cuda") if fast is None else fast
    pipe = load_pipeline(folder, device)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    runner = None
    if fast:
        from crossdistill.export.fast import OneStepRunner

        timestep = int(pipe.scheduler.config.num_train_timesteps) - 1
        runner = OneStepRunner(
            pipe.unet, pipe.vae, scale=pipe.vae.config.scaling_factor, timestep=timestep,
            alpha_bar=float(pipe.scheduler.alphas_cumprod[timestep]),
            prediction_type=pipe.scheduler.config.prediction_type, device=device,
        )  # fmt: skip
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i)) for i in range(len(chunk))]
        ).to(device)
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(chunk, device, 1, False)
            if runner is not None:
                pixels = (runner(embeds, noise).float() / 2 + 0.5).clamp(0, 1)
            else:
                pixels = pipe(
                    prompt_embeds=embeds, latents=noise, num_inference_steps=1, guidance_scale=1.0, output_type="pt"
                ).images
        arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        images += [Image.fromarray(a) for a in arrays]
    return images


def _filename(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60]
    return f"{index:04d}_{slug or 'image'}.png"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder written by `crossdistill export`")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="a text file, one prompt per line")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--no-fast", action="store_true", help="use the plain diffusers pipeline on GPU too")


def run(args: argparse.Namespace) -> int:
    prompts = read_prompt_args(args.prompt, args.prompts)
    images = generate(
        args.model, prompts, seed=args.seed, batch_size=args.batch_size, device=args.device,
        fast=False if args.no_fast else None,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        image.save(out / _filename(i, prompt))
    print(f"wrote {len(images)} images to {out}")
    return 0
