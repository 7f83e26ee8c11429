"""Saved spaces are real diffusers folders, and our prompt encoding is exactly what each diffusers pipeline makes."""

from __future__ import annotations

import diffusers
import pytest
import torch

from crossdistill.models import get_family

PROMPTS = ["a red cat", ""]
PIPELINES = {
    "sd15": diffusers.StableDiffusionPipeline,
    "sdxl": diffusers.StableDiffusionXLPipeline,
    "sd3": diffusers.StableDiffusion3Pipeline,
    "flux": diffusers.FluxPipeline,
}


def _pipeline_embeds(family: str, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The embeddings each pipeline's own ``encode_prompt`` builds for ``prompts`` (no CFG)."""
    if family == "sd15":
        hidden, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        return {"encoder_hidden_states": hidden}
    if family == "sdxl":
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        return {"encoder_hidden_states": hidden, "pooled": pooled}
    if family == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
        )
        return {"encoder_hidden_states": hidden, "pooled": pooled}
    hidden, pooled, _ = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=12)
    return {"encoder_hidden_states": hidden, "pooled": pooled}


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_saved_folder_loads_in_diffusers_and_encodes_the_same(family, tmp_path):
    space = get_family(family).tiny(0)
    space.save_pretrained(tmp_path)
    pipe = PIPELINES[family].from_pretrained(tmp_path)
    ours = space.encode_prompts(PROMPTS[:1]).tensors
    for key, value in _pipeline_embeds(family, pipe, PROMPTS[:1]).items():
        # Same construction; only kernel choices (e.g. SDPA vs eager attention) may differ in the last bits.
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=f"{family} {key}")


def test_sd3_without_t5_pads_zeros_like_the_pipeline(tmp_path):
    space = get_family("sd3").tiny(0, t5=False)
    space.save_pretrained(tmp_path)
    # diffusers' documented way to run SD3 without T5.
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    ours = space.encode_prompts(PROMPTS[:1]).tensors
    for key, value in _pipeline_embeds("sd3", pipe, PROMPTS[:1]).items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5)
    # Reloading keeps the T5-less construction.
    again = get_family("sd3").from_pretrained(tmp_path)
    assert again.prompt_encoder.text_encoder_3 is None
    assert torch.equal(
        again.encode_prompts(PROMPTS).tensors["encoder_hidden_states"],
        space.encode_prompts(PROMPTS).tensors["encoder_hidden_states"],
    )


def test_sdxl_empty_prompt_is_zeros_as_the_pipeline_uncond():
    embeds = get_family("sdxl").tiny(0).encode_prompts(PROMPTS).tensors
    assert embeds["encoder_hidden_states"][1].abs().sum() == 0 and embeds["pooled"][1].abs().sum() == 0
    assert embeds["encoder_hidden_states"][0].abs().sum() > 0
