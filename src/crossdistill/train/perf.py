"""Speed options shared by the trainer and the benchmarks (docs/performance.md has the measured effect of each).

- :func:`compile_blocks`: *regional* ``torch.compile``: each repeated block (an MMDiT / FLUX block, a UNet
  transformer or residual block, a Bridge projector block) is compiled in place, not the whole model. Blocks of one
  class and input shape share one compiled program (parameters are graph inputs), so compile time grows with the
  number of distinct block shapes, not with depth (the whole cross-space SD3.5-M step: 227 s cold, 24 s from
  inductor's cache, docs/performance.md), while the fusions that matter (norm + modulation + activation into the
  neighbouring kernels) are the same. The glue between blocks stays eager.
- :func:`make_adamw`: AdamW with the fused (single-kernel) update where the parameters allow it.
- :func:`to_channels_last`: NHWC weights for convolution-heavy modules (UNet, VAE decoder, projector);
  :func:`is_convolutional` tells them from transformers.
- :func:`compile_cache_counts` / :func:`log_first_compiled_step`: what the first compiled step took from inductor's
  cache, logged once per run.
- :data:`MODULE_SWAPS`: the options that switch modules in place to an equal, faster form (class or processor swaps
  that keep weights and state-dict keys), by their ``train.*`` name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
from torch import nn

from crossdistill.models.groupnorm import enable_channel_stats_group_norm
from crossdistill.models.subpixel import enable_subpixel_upsample
from crossdistill.models.wide_attention import enable_wide_head_matmul_attention

logger = logging.getLogger(__name__)

# Class names of the blocks compiled one by one. The outermost match wins: a UNet's Transformer2DModel is compiled
# with its BasicTransformerBlocks inside it.
BLOCK_CLASSES = frozenset(
    {
        "JointTransformerBlock",  # SD3 / SD3.5 MMDiT
        "FluxTransformerBlock",  # FLUX double-stream
        "FluxSingleTransformerBlock",  # FLUX single-stream
        "Transformer2DModel",  # SD 1.5 / SD 2 / SDXL UNet spatial transformer (proj_in, blocks, proj_out)
        "BasicTransformerBlock",  # a bare UNet / DiT transformer block
        "ResnetBlock2D",  # UNet and VAE residual blocks
        "UNetMidBlock2D",  # VAE mid block (residual blocks + attention)
    }
)
# train.<name> -> the in-place switch it applies to each step module (returns how many submodules it switched).
MODULE_SWAPS = {
    "subpixel_upsample": enable_subpixel_upsample,  # "nearest x2 + 3x3 conv" in sub-pixel form (models/subpixel.py)
    "channel_stats_norm": enable_channel_stats_group_norm,  # GroupNorm statistics per channel (models/groupnorm.py)
    "wide_head_attention": enable_wide_head_matmul_attention,  # heads wider than 256 as matmuls (wide_attention.py)
}
# Dynamo compiles once per (block class, input shape); a UNet has ~12 residual-block shapes, a VAE decoder ~8.
_RECOMPILE_LIMIT = 64


def _is_block(module: nn.Module) -> bool:
    from crossdistill.bridge.model import ResBlock

    return type(module).__name__ in BLOCK_CLASSES or isinstance(module, ResBlock)


def outermost_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks :func:`compile_blocks` compiles, in module order: the outermost modules of
    :data:`BLOCK_CLASSES` (or Bridge residual blocks); nothing inside a block is listed."""
    if _is_block(module):
        return [module]
    return [block for child in module.children() for block in outermost_blocks(child)]


def compile_blocks(module: nn.Module, **compile_kwargs) -> int:
    """Compile every outermost repeated block of ``module`` in place (``nn.Module.compile``); returns how many.

    ``compile_kwargs`` go to ``torch.compile`` (default ``dynamic=False``: training shapes are fixed, and static
    kernels are faster). Modules with no known block are compiled whole, so nothing is silently left eager.
    """
    compile_kwargs.setdefault("dynamic", False)
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 16 * _RECOMPILE_LIMIT))

    blocks = outermost_blocks(module)
    if not blocks:
        logger.info("compile_blocks: no known block in %s, compiling it whole", type(module).__name__)
        module.compile(**compile_kwargs)
        return 1
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def compile_cache_counts(since: dict[str, int] | None = None) -> dict[str, int]:
    """This process's compile-cache counters: inductor's FX-graph cache and AOTAutograd's (``..._hit``, ``..._miss``,
    ``..._bypass``). With ``since`` (an earlier reading), what happened after it: the counters that moved, by how
    much."""
    from torch._dynamo.utils import counters

    now = {k: v for group in ("inductor", "aot_autograd") for k, v in counters[group].items() if "cache" in k}
    if since is None:
        return now
    return {k: v - since.get(k, 0) for k, v in now.items() if v != since.get(k, 0)}


def log_first_compiled_step(seconds: float, counts: dict[str, int]) -> None:
    """One line after a compiled run's first step: its time, the graphs inductor compiled and those it took from
    its cache (``counts``: :func:`compile_cache_counts` over the step), and where that cache is. A cold compile of a
    real preset takes minutes (262–435 s on H100s); with the cache kept, a later launch or resume takes ~1.5 min
    (docs/performance.md). Under DDP the keys hold each rank's GPU index, so each rank fills its own entries."""
    compiled = counts.get("fxgraph_cache_miss", 0) + counts.get("fxgraph_cache_bypass", 0)
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        where = cache_dir()
    except Exception:  # an internal module: the variable is the documented way to set it
        where = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
    logger.info(
        "first compiled step: %.0f s; inductor compiled %d graphs and took %d from its cache (%s; keep it on a "
        "persistent disk, or set TORCHINDUCTOR_CACHE_DIR, and later launches and resumes skip most of the compile)",
        seconds, compiled, counts.get("fxgraph_cache_hit", 0), where,
    )  # fmt: skip


def make_adamw(
    params: Iterable[torch.Tensor], *, lr: float, weight_decay: float, fused: bool = True
) -> torch.optim.AdamW:
    """AdamW; ``fused=True`` uses the single-kernel update when every parameter is a floating CUDA tensor (else the
    torch default). Both compute the same update up to rounding."""
    params = list(params)
    use_fused = fused and bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    kwargs = {"fused": True} if use_fused else {}  # torch's default: foreach on CUDA, a loop on CPU
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
    optimizer.register_load_state_dict_post_hook(_state_like_params)
    return optimizer


def _state_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded moments their parameter's strides: a checkpoint stores them contiguous, a channels_last parameter
    is not, and the fused / foreach updates want one layout for a parameter and its state."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    like = torch.empty_strided(p.shape, p.stride(), dtype=value.dtype, device=value.device)
                    optimizer.state[p][key] = like.copy_(value)


def is_convolutional(module: nn.Module) -> bool:
    """Whether ``module`` is a convolutional network (UNet, VAE, Bridge projector: it holds residual conv blocks),
    where :func:`to_channels_last` applies; a transformer's lone patch-embedding conv does not count."""
    from crossdistill.bridge.model import ResBlock

    return any(type(m).__name__ == "ResnetBlock2D" or isinstance(m, ResBlock) for m in module.modules())


def to_channels_last(module: nn.Module) -> nn.Module:
    """NHWC memory format for the module's 4-D weights (what cuDNN's tensor-core convolutions want); in place."""
    return module.to(memory_format=torch.channels_last)
