"""The on-disk prompt-embedding cache: a hit equals a fresh encoding, a miss re-encodes, a torn file is re-made."""

import pytest
import torch

from crossdistill.models.sd15 import SD15Space


@pytest.fixture
def encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSDISTILL_CACHE", str(tmp_path))
    monkeypatch.delenv("CROSSDISTILL_NO_CACHE", raising=False)
    return SD15Space.tiny(seed=0).prompt_encoder


def test_second_call_is_read_from_disk_and_equal(encoder, tmp_path, monkeypatch):
    prompts = ["a red cat", "a blue dog", ""]
    first = encoder.encode_cached(prompts)
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 1

    def fail(_):
        raise AssertionError("encoded again instead of reading the cache")

    monkeypatch.setattr(encoder, "encode", fail)
    second = encoder.encode_cached(prompts)
    for key, value in first.tensors.items():
        assert torch.equal(value, second.tensors[key])


def test_other_prompts_or_weights_miss(encoder, tmp_path):
    encoder.encode_cached(["a red cat"])
    encoder.encode_cached(["a red dog"])
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)  # other weights: another fingerprint
    encoder.encode_cached(["a red cat"])
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 3


def test_torn_cache_file_is_remade(encoder, tmp_path):
    fresh = encoder.encode_cached(["a green frog"])
    (path,) = (tmp_path / "prompts").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:20])
    again = encoder.encode_cached(["a green frog"])
    assert torch.equal(fresh.tensors["encoder_hidden_states"], again.tensors["encoder_hidden_states"])
