"""The FSDP2 helpers that need no process group: wrap-policy fitting, optimiser-state formats, gradient clipping.
The sharded paths themselves run on two processes in tests/integration/test_distributed_distill.py."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from crossdistill.models.sd3 import SD3Space
from crossdistill.models.sd15 import SD15Space
from crossdistill.train.checkpoint import CheckpointError
from crossdistill.train.distill import DenoiserCall
from crossdistill.train.sharded import ShardedOptimizer, UnshardedOptimizer, WrapPolicy, clip_grad_norm


def _accelerator(names=None, policy=transformer_auto_wrap_policy):
    plugin = SimpleNamespace(auto_wrap_policy=policy, transformer_cls_names_to_wrap=names,
                             cpu_ram_efficient_loading=True)  # fmt: skip
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))


def test_wrap_policy_is_refitted_to_each_family():
    unet, mmdit = DenoiserCall(SD15Space.tiny(0).denoiser), DenoiserCall(SD3Space.tiny(0).denoiser)
    acc = _accelerator()
    wrap = WrapPolicy(acc)
    plugin = acc.state.fsdp_plugin
    assert plugin.cpu_ram_efficient_loading is False  # every process holds its models already
    wrap.fit(unet)
    unet_blocks = plugin.transformer_cls_names_to_wrap
    assert "BasicTransformerBlock" in unet_blocks and "JointTransformerBlock" not in unet_blocks
    # accelerate resolves the policy into a partial on first use; the next module starts from the raw policy again
    plugin.auto_wrap_policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=set())
    wrap.fit(mmdit)
    assert plugin.transformer_cls_names_to_wrap == ["JointTransformerBlock"]
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy


def test_wrap_policy_keeps_the_configured_classes_each_module_has():
    mmdit = DenoiserCall(SD3Space.tiny(0).denoiser)
    acc = _accelerator(names=["JointTransformerBlock", "ResnetBlock2D"])
    WrapPolicy(acc).fit(mmdit)
    assert acc.state.fsdp_plugin.transformer_cls_names_to_wrap == ["JointTransformerBlock"]
    size_based = _accelerator(policy="size")
    WrapPolicy(size_based).fit(mmdit)  # not a transformer-based policy: left to accelerate
    assert size_based.state.fsdp_plugin.transformer_cls_names_to_wrap is None


def test_optimizer_states_of_the_other_mode_are_refused_with_the_fix():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    opt.step()
    plain = UnshardedOptimizer(opt)
    state = plain.state_dict()
    plain.load_state_dict(state)  # its own format loads
    by_name = {"state": {}, "param_groups": [{**state["param_groups"][0], "params": ["denoiser.weight"]}]}
    with pytest.raises(CheckpointError, match="written under FSDP"):
        plain.load_state_dict(by_name)
    with pytest.raises(CheckpointError, match="written without FSDP"):
        ShardedOptimizer(torch.nn.Linear(1, 1), opt).load_state_dict(state)


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn_like(pa)
        pb.grad = pa.grad.clone()
    ours = clip_grad_norm(a, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(b, 0.5)
    torch.testing.assert_close(ours, ref)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad)
    assert float(clip_grad_norm(a, float("inf"))) == pytest.approx(0.5, rel=1e-4)  # already clipped: norm only
