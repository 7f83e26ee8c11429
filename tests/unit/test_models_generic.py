"""The generic single-encoder mode (the emoji world's MiniLM) for sd15 and sd3: encoding, building, saving."""

from __future__ import annotations

import json

import pytest
import torch

from crossdistill.models import get_family
from crossdistill.models.sd3 import SD3Space
from crossdistill.models.sd15 import SD15Space
from crossdistill.models.text import GenericTextEncoder

PROMPTS = ["a grinning face on a yellow background", "a red heart", ""]


@pytest.fixture(scope="module")
def minilm(one_thread):
    return GenericTextEncoder.minilm(max_length=32)


def test_minilm_hidden_states_and_masked_mean_pooling(minilm):
    emb = minilm.encode(PROMPTS).tensors
    assert emb["encoder_hidden_states"].shape == (3, 32, 384) and emb["pooled"].shape == (3, 384)
    assert minilm.use_mask and not emb["encoder_hidden_states"].requires_grad
    # Pooled is the mean over real tokens only: the same whatever the padded length.
    longer = GenericTextEncoder(minilm.text_encoder, minilm.tokenizer, max_length=48).encode(PROMPTS[:1])
    minilm.tokenizer.model_max_length = 32  # shared tokenizer: restore the fixture's length
    torch.testing.assert_close(longer.tensors["pooled"], emb["pooled"][:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [SD15Space, SD3Space])
def test_space_with_minilm_builds_saves_and_reloads(cls, minilm, tmp_path):
    space = cls.tiny(0, text_encoder=minilm)
    cond = space.encode_prompts(PROMPTS[:2])
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, *space.latent_shape, generator=g), torch.randn(2, *space.latent_shape, generator=g)
    t = torch.tensor([0.3, 0.8])
    x_t = space.denoiser.noise(x0, t, eps)
    out = space.denoiser.denoise(x_t, t, cond, 2.0, space.null_prompt(2))
    assert out.shape == x0.shape

    space.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    loaded = get_family(space.family).from_pretrained(tmp_path)
    assert isinstance(loaded.prompt_encoder, GenericTextEncoder) and loaded.prompt_encoder.max_length == 32
    assert torch.equal(loaded.encode_prompts(PROMPTS[:2]).tensors["pooled"], cond.tensors["pooled"])
    assert torch.equal(loaded.denoiser.denoise(x_t, t, cond, 2.0, loaded.null_prompt(2)), out)


def test_space_from_components_is_the_base_constructor(minilm):
    tiny = SD3Space.tiny(0, text_encoder=minilm)
    space = SD3Space(tiny.codec, tiny.denoiser, minilm, resolution=16)
    assert space.latent_shape == (16, 8, 8) and space.family == "sd3"
