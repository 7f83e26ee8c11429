"""FSDP2 (``accelerate launch`` with ``fsdp_version: 2``) for the distillation trainer: sharding the frozen Teacher,
whole-tensor checkpoints of sharded modules, and gradient clipping of sharded parameters.

accelerate prepares each trained module with its optimiser (``fully_shard`` per block, as its config says); what it
does not cover is here, built from torch's maintained pieces (DTensor, ``torch.distributed.checkpoint.state_dict``,
``torch.nn.utils.get_total_norm``) — there is no home-made collective:

- :func:`shard_frozen`: the real score's Teacher (frozen, no optimiser) through accelerate's own FSDP2 preparation;
- :class:`ShardedParams` / :class:`ShardedOptimizer`: checkpoint objects that gather full tensors onto the main
  process (``DTensor.full_tensor``; the optimiser through ``get_optimizer_state_dict``). A checkpoint written under
  FSDP holds the same names and shapes as one written on one GPU (export and ``generate`` read either); the optimiser
  states are keyed by parameter name, so a run resumes on any number of GPUs under FSDP (but not without FSDP: an
  FSDP run resumes under FSDP, and :class:`UnshardedOptimizer` says so);
- :func:`clip_grad_norm`: the global norm over DTensor gradient shards.

Every method here is collective: all processes call it, in the same order (the checkpoint code does so).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from crossdistill.errors import ConfigError
from crossdistill.train.checkpoint import CheckpointError

logger = logging.getLogger(__name__)


def is_fsdp(accelerator) -> bool:
    """True under FSDP2; FSDP1 is refused with the fix (its flat parameters cannot mix the LoRA fake score's frozen
    base and trainable adapter, nor run a module's named methods outside its ``forward``)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if not accelerator.is_fsdp2:
        raise ConfigError(
            "crossdistill trains under FSDP2 only: set `fsdp_version: 2` in the accelerate config "
            "(`accelerate config`, or --fsdp_version 2 on `accelerate launch`)"
        )
    return True


class WrapPolicy:
    """The FSDP plugin's wrap policy, fitted to each module before it is sharded.

    accelerate keeps one plugin per run and resolves a transformer-based policy once, from the first model prepared;
    the trainer shards up to three models of two families (a UNet Student, an MMDiT Teacher). Each is fitted here:
    the block classes come from the accelerate config if it names them (those the module has), else from the
    module's ``_no_split_modules`` (diffusers' per-class list, forwarded by ``DenoiserCall``)."""

    def __init__(self, accelerator):
        self.plugin = accelerator.state.fsdp_plugin
        if self.plugin.cpu_ram_efficient_loading:
            # Loading on rank 0 and broadcasting saves nothing here (every process has loaded its spaces before they
            # are sharded), and accelerate's broadcast expects every state entry to be a DTensor: the persistent
            # buffers of diffusers models (SD3's positional embedding) are not.
            logger.info("FSDP: cpu_ram_efficient_loading off (the models are loaded on every process first)")
            self.plugin.cpu_ram_efficient_loading = False
        policy = self.plugin.auto_wrap_policy
        self.policy = getattr(policy, "func", policy)  # a previous resolution leaves a functools.partial
        self.names = self.plugin.transformer_cls_names_to_wrap  # None: each module's own _no_split_modules

    def fit(self, module: nn.Module) -> None:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        if self.policy is not transformer_auto_wrap_policy:
            return
        present = {type(m).__name__ for m in module.modules()}
        names = self.names if self.names is not None else list(getattr(module, "_no_split_modules", []))
        self.plugin.auto_wrap_policy = self.policy
        self.plugin.transformer_cls_names_to_wrap = [n for n in names if n in present]
        if not self.plugin.transformer_cls_names_to_wrap:
            logger.warning(
                "FSDP: none of the block classes %s is in %s; it is sharded as one unit (set "
                "fsdp_transformer_layer_cls_to_wrap in the accelerate config)", names, type(module).__name__
            )


def shard_frozen(accelerator, module: nn.Module) -> nn.Module:
    """Shard a frozen module (no optimiser) as accelerate shards the trained ones: its FSDP plugin's wrap policy,
    mixed precision and offload. accelerate's ``prepare`` insists on a model-optimiser pair under FSDP2, so this calls
    the preparation it runs for the model (``accelerate.utils.fsdp2_prepare_model``)."""
    from accelerate.utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, module)


def reshard(model: nn.Module) -> None:
    """Put back the shards of every FSDP2 unit of ``model``. A root keeps its own parameters gathered after a forward
    with no backward (sampling, the frozen Teacher); until resharded, ``named_parameters`` are not the DTensors the
    optimiser holds."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _trainable_names(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)]


class ShardedParams:
    """The trainable parameters of ``model`` under ``prefix`` as full tensors, named without the prefix: the same
    state as :class:`crossdistill.train.distill.TrainableParams` of the unsharded part."""

    def __init__(self, model: nn.Module, prefix: str):
        self.model, self.prefix = model, prefix

    def state_dict(self) -> dict[str, Tensor]:
        # One parameter at a time (as torch.distributed.checkpoint gathers): only this part's, so the critic's fake
        # score and GAN head are each gathered once. The main process keeps CPU copies, the others drop them.
        main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        reshard(self.model)
        state = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad and name.startswith(self.prefix):
                whole = full_tensor(param.detach())
                if main:
                    state[name[len(self.prefix) :]] = whole.cpu()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = {n[len(self.prefix) :] for n in _trainable_names(self.model, self.prefix)}
        if set(state) != names:
            raise ConfigError(
                f"checkpoint does not match the model's trainable parameters "
                f"({len(set(state) ^ names)} names differ): was it written with another model config?"
            )
        full = {self.prefix + k: v for k, v in state.items()}  # every process read the file: each takes its shard
        reshard(self.model)
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, strict=False))


def _keyed_by_name(state: dict) -> bool:
    """True for an optimiser state written under FSDP (parameters by name), False for one by index."""
    return any(isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))


class ShardedOptimizer:
    """An optimiser's state over a sharded model, gathered whole and keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: Any):
        self.model = model
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        reshard(self.model)  # the optimiser's parameters are the shards
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not _keyed_by_name(state):
            raise CheckpointError(
                "this checkpoint's optimiser state was written without FSDP (parameters by index, not by name): "
                "resume it without FSDP, or start a new --run-dir"
            )
        reshard(self.model)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


class UnshardedOptimizer:
    """An optimiser as a checkpoint object without FSDP: its own state_dict, and a clear error for a state that an
    FSDP run wrote (keyed by parameter name), which torch's loader would misread."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if _keyed_by_name(state):
            raise CheckpointError(
                "this checkpoint's optimiser state was written under FSDP (parameters by name): resume it under FSDP "
                "(accelerate launch with fsdp_version 2), or start a new --run-dir"
            )
        self.optimizer.load_state_dict(state)


def clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """Clip the gradients of (sharded) parameters to a global L2 norm; returns that norm before clipping, whole."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):  # a partial norm over the shards: reduce it across processes
        total = total.full_tensor()
    if max_norm < float("inf"):
        by_mesh: dict = {}
        for p in params:
            if p.grad is not None:
                by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        for mesh, group in by_mesh.items():
            norm = total if mesh is None else DTensor.from_local(total, mesh)  # replicated on the shards' mesh
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return total


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (collective); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
