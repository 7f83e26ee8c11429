"""Counted, not timed: the FLOPs of the trainer's GAN passes, and what the trainer now leaves out of them.

With DMD2's GAN on (``train.gan_weight > 0``, with real images; off in the real-model presets, whose timed trainer
runs no GAN pass), the GAN head reads the fake score's features at one block
(``crossdistill.losses.dm.feature_module``: the middle of an MMDiT's ``transformer_blocks``). Two passes of the
trainer run the fake score only for those features: the critic update's pass over the real latents, and the
generator update's GAN pass. Both now stop at the feature block (``crossdistill.losses.dm.run_to``), which skips the
forward after it. The generator update's backward also computed the fake score's weight gradients up to the block,
which the critic update then zeroed (only the gradient that reaches the generator's sample is used): the pass now
runs with the critic's weights frozen (``distill.weights_frozen``; one process and DDP, not under FSDP2).

This script builds the Teacher-sized fake score on the meta device (no memory, no compute) and counts, with torch's
``FlopCounterMode``, at the preset's batch: the whole forward, the forward stopped at the feature block, and the
stopped pass's backward with and without the fake score's weight gradients. Nothing is timed: what the FLOPs come to
in time depends on the kernels (docs/performance.md).

    python bench/gan_pass_flops.py --out $OUT          # SD3.5-Medium fake score, batch 4, 1024 px (CPU, seconds)
    python bench/gan_pass_flops.py --tiny --out /tmp/b  # the tiny config (smoke test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import count_flops, env_markdown, environment, sd35_medium_config, write_report
from crossdistill.losses.dm import feature_module, run_to

REPORT = "gan_pass_flops"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny SD3 config (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--batch", type=int, default=4, help="the preset's train.batch_size")
    parser.add_argument("--text-tokens", type=int, default=333, help="CLIP 77 + T5 256, as the SD3 presets encode")
    args = parser.parse_args(argv)

    from diffusers import SD3Transformer2DModel

    config = sd35_medium_config(args.tiny) | ({"num_layers": 4} if args.tiny else {})  # tiny: blocks after the middle
    with torch.device("meta"):
        fake = SD3Transformer2DModel(**config).to(torch.bfloat16)
    b, size = args.batch, config["sample_size"]
    kw = dict(dtype=torch.bfloat16, device="meta")
    latents = torch.randn(b, config["in_channels"], size, size, **kw)
    text = torch.randn(b, args.text_tokens, config["joint_attention_dim"], **kw)
    pooled = torch.randn(b, config["pooled_projection_dim"], **kw)
    t = torch.full((b,), 500.0, device="meta")

    block = feature_module(fake)
    k = list(fake.transformer_blocks).index(block)

    def forward(x):
        return fake(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample

    def features_backward(weights: bool):
        """The stopped pass and its backward from the features (a stand-in for the GAN head's gradient)."""
        fake.requires_grad_(weights)
        x = latents.clone().requires_grad_(True)
        with run_to(fake, block):
            forward(x).float().sum().backward()

    with torch.no_grad():
        full = count_flops(lambda: forward(latents))
        with run_to(fake, block):
            truncated = count_flops(lambda: forward(latents))
    with_w, without_w = count_flops(lambda: features_backward(True)), count_flops(lambda: features_backward(False))
    n = len(fake.transformer_blocks)
    after = full - truncated
    weight_grads = with_w - without_w
    tf = 1e12
    report = {
        "env": environment(torch.device("cpu")) | {"device": "meta (FLOPs counted, nothing run)"},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "batch": b,
        "feature_block": k,
        "blocks": n,
        "forward_tflop": full / tf,
        "forward_to_feature_block_tflop": truncated / tf,
        "forward_after_feature_block_tflop": after / tf,
        "feature_pass_fwd_bwd_tflop": with_w / tf,
        "feature_pass_weight_grad_tflop": weight_grads / tf,
        "skipped_per_critic_update_tflop": after / tf,
        "skipped_per_generator_update_tflop": (after + weight_grads) / tf,
    }
    md = [
        "# The GAN passes' unneeded FLOPs (counted, not timed)\n",
        env_markdown(report["env"], f"bench/{report['command']}"),
        f"Fake score: SD3Transformer2DModel, {n} blocks, the GAN head's features after block {k}; batch {b}, "
        f"{size * 8} px, {args.text_tokens} text tokens. TFLOP as FlopCounterMode counts them (a multiply-add = 2). "
        "These passes run only with DMD2's GAN on (`train.gan_weight > 0`); the presets and their timed trainer have "
        "it off.\n",
        "| quantity | TFLOP |",
        "|---|---|",
        f"| one forward of the fake score | {full / tf:.2f} |",
        f"| the forward up to the feature block | {truncated / tf:.2f} |",
        f"| the forward after it (blocks {k + 1}–{n - 1}) | {after / tf:.2f} |",
        f"| the stopped pass, forward + backward with weight gradients | {with_w / tf:.2f} |",
        f"| of which the fake score's weight gradients | {weight_grads / tf:.2f} |",
        f"| **skipped by the stop, per critic update** (the real latents' pass) | **{after / tf:.2f}** |",
        f"| **skipped per generator update** (the GAN pass: the stop + the frozen weights; FSDP2: the stop only) | "
        f"**{(after + weight_grads) / tf:.2f}** |",
        "",
        "The stopped pass still runs the output layers (norm_out, proj_out) on the feature block's output; they are "
        "counted in both. Without gradient checkpointing. With it (the presets) the backward also recomputes the "
        "stopped forward, in both counts alike, so the differences are the same.",
    ]
    write_report(args.out, REPORT, report, "\n".join(md) + "\n")
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
