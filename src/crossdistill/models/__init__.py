"""Model families behind one denoiser contract: spaces, codecs, prompt encoders and denoisers."""

from crossdistill.models.base import Denoiser, LatentCodec, PromptEmbeds, PromptEncoder, Space
from crossdistill.models.registry import FAMILIES, family_names, get_family, load_space, register_family

__all__ = [
    "FAMILIES",
    "Denoiser",
    "LatentCodec",
    "PromptEmbeds",
    "PromptEncoder",
    "Space",
    "family_names",
    "get_family",
    "load_space",
    "register_family",
]
