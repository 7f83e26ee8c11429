"""``crossdistill export``: a distilled run → a one-step diffusers StableDiffusionPipeline folder."""

from __future__ import annotations

import argparse

from crossdistill.export.pipeline import export_pipeline


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a `crossdistill distill` run folder (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="folder to write the pipeline to")
    parser.add_argument("--ema", action="store_true", help="export the generator's EMA weights (train.ema_decay > 0)")
    parser.add_argument("--lora", type=int, default=None, metavar="RANK",
                        help="also write the UNet's change vs the Student base as a rank-RANK LoRA in OUT/lora "
                             "(pipe.load_lora_weights); prints the fraction of ‖ΔW‖² it captures")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    out = export_pipeline(args.run_dir, args.out, ema=args.ema, lora=args.lora)
    print(f"wrote {out}: StableDiffusionPipeline.from_pretrained('{out}')(prompt, num_inference_steps=1, "
          "guidance_scale=1.0)")  # fmt: skip
    if args.lora is not None:
        print(f"LoRA: StableDiffusionPipeline.from_pretrained(<Student base>).load_lora_weights('{args.out}/lora')")
    return 0
