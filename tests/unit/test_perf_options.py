"""The trainer's speed options (issue 7): regional compile, fused AdamW, channels_last, text-encoder offload, and
the DDP options (train.ddp_*; their two-process runs are in tests/integration/test_distributed_distill.py).

Each option must leave what a step computes unchanged (up to rounding) and checkpoints interchangeable. The
compile tests here trace with dynamo's ``eager`` backend (graph capture, guards and recompiles, no C++ codegen);
the inductor runs that compile real kernels on the CPU take minutes and are marked slow.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from crossdistill.errors import ConfigError
from crossdistill.models.sd3 import SD3Space
from crossdistill.models.sd15 import SD15Space
from crossdistill.train import distill
from crossdistill.train.distill import DistillTrainer
from crossdistill.train.perf import (
    compile_blocks,
    compile_cache_counts,
    is_convolutional,
    log_first_compiled_step,
    make_adamw,
    to_channels_last,
)
from crossdistill.train.stats import read_stats

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from distill_common import tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


def _compiled(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


def _losses(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("loss/")} for r in read_stats(run_dir)]


def _assert_losses_close(got: list[dict], want: list[dict], rtol: float, atol: float) -> None:
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for step, (a, b) in enumerate(zip(got, want), start=1):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=rtol, abs=atol), (step, k, a[k], b[k])


# ---------------------------------------------------------------------------------------------------------------------
# perf.compile_blocks


def test_compile_blocks_compiles_the_outermost_blocks_and_keeps_parameter_names():
    unet = SD15Space.tiny(seed=0).denoiser.backbone
    names = [n for n, _ in unet.named_parameters()]
    outer = {n for n, m in unet.named_modules() if type(m).__name__ in ("Transformer2DModel", "ResnetBlock2D")}
    assert compile_blocks(unet) == len(outer) > 0
    assert set(_compiled(unet)) == outer  # the BasicTransformerBlocks inside a Transformer2DModel are not separate
    assert [n for n, _ in unet.named_parameters()] == names  # no `_orig_mod.`: checkpoints keep their keys
    assert "" not in _compiled(unet)  # the UNet's glue stays eager

    mmdit = SD3Space.tiny(seed=0).denoiser.backbone
    blocks = {n for n, m in mmdit.named_modules() if type(m).__name__ == "JointTransformerBlock"}
    assert compile_blocks(mmdit) == len(blocks) > 0
    assert set(_compiled(mmdit)) == blocks

    mlp = nn.Sequential(nn.Linear(3, 3), nn.ReLU())  # no known block: compiled whole, never silently eager
    assert compile_blocks(mlp) == 1 and _compiled(mlp) == [""]


@pytest.mark.slow  # inductor compiles C++ kernels for ~15 block shapes: about a minute on 2 cores
@pytest.mark.parametrize("space_cls", [SD15Space, SD3Space], ids=["unet", "mmdit"])
def test_compiled_blocks_match_eager(space_cls):
    space = space_cls.tiny(seed=0)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *space.latent_shape, generator=gen), torch.tensor([0.3, 0.8])
    cond = space.encode_prompts(["a red cat", "a blue dog"])
    with torch.no_grad():
        want = space.denoiser.raw(x, t, cond)
        assert compile_blocks(space.denoiser.backbone) > 0
        got = space.denoiser.raw(x, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# perf.make_adamw


def _params(seed: int, channels_last: bool = False) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen))
    if channels_last:
        conv = nn.Parameter(conv.detach().to(memory_format=torch.channels_last))
    return [conv, nn.Parameter(torch.randn(5, generator=gen))]


def _steps(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: range) -> None:
    for i in steps:
        gen = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))  # in the parameter's layout
        opt.step()


def test_make_adamw_is_fused_only_for_cuda_params_and_updates_like_adamw():
    params = _params(0)
    opt = make_adamw(params, lr=1e-2, weight_decay=0.1)
    assert not opt.defaults["fused"]  # CPU parameters: torch's default update, never the CUDA-only fused kernel
    assert not make_adamw(_params(0), lr=1e-2, weight_decay=0.1, fused=False).defaults["fused"]
    assert opt.defaults["lr"] == 1e-2 and opt.defaults["weight_decay"] == 0.1
    plain_params = _params(0)
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1)
    _steps(opt, params, range(3))
    _steps(plain, plain_params, range(3))
    assert not torch.equal(params[0], _params(0)[0])
    for a, b in zip(params, plain_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_make_adamw_fuses_cuda_params():
    assert make_adamw([nn.Parameter(torch.ones(3, device="cuda"))], lr=1e-3, weight_decay=0.0).defaults["fused"]


def test_make_adamw_gives_loaded_moments_the_parameter_layout():
    """A checkpoint stores moments contiguous; a resumed channels_last parameter gets them back in its own layout, and
    the run continues exactly as an uninterrupted one."""
    params = _params(0, channels_last=True)
    opt = make_adamw(params, lr=1e-2, weight_decay=0.1)
    _steps(opt, params, range(2))
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        for k, v in state.items():
            state[k] = v.contiguous()  # what comes back from safetensors
    resumed_params = [nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in params]
    resumed = make_adamw(resumed_params, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(saved)
    conv = resumed_params[0]
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for k in ("exp_avg", "exp_avg_sq"):
        assert resumed.state[conv][k].stride() == conv.stride(), k
    _steps(opt, params, range(2, 4))
    _steps(resumed, resumed_params, range(2, 4))
    for a, b in zip(params, resumed_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer with the options on: the same losses as with them off


@pytest.fixture(scope="module")
def cross_runs(tmp_path_factory, one_thread):
    """A cross-space LoRA config (its random Bridge written once, so every run shares it) and a 4-step eager run."""
    folder = tmp_path_factory.mktemp("perf")
    cfg = tiny_config(folder, "model.fake_score=lora", "model.lora_rank=4", "train.max_steps=4", cross=True)
    cfg.train.offload_text_encoders = cfg.train.offload_idle_vaes = False
    DistillTrainer(cfg, folder / "eager").train()
    return folder, cfg


def _cfg(cfg, **train):
    cfg = copy.deepcopy(cfg)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_defaults_and_cli_show_the_options(capsys):
    from crossdistill.cli import main

    t = distill.TrainConfig()
    assert (t.compile, t.fused_optimizer, t.channels_last, t.offload_text_encoders) == (False, True, False, True)
    assert t.subpixel_upsample is False and t.channel_stats_norm is False and t.offload_idle_vaes is True
    assert t.wide_head_attention is False
    assert main(["distill", "--preset", "emoji_shared", "--print-config"]) == 0
    out = capsys.readouterr().out
    for key in ("compile", "fused_optimizer", "channels_last", "offload_text_encoders", "offload_idle_vaes",
                "subpixel_upsample", "channel_stats_norm", "wide_head_attention", *distill.DDP_KEYS):  # fmt: skip
        assert f'"{key}"' in out
    assert (t.ddp_comm_hook, t.ddp_bucket_mb) == ("none", 25)  # torch's bucket size
    assert t.ddp_static_graph is False and t.ddp_grad_as_bucket_view is False and t.ddp_broadcast_buffers is True
    assert t.ddp_split_graphs is False and '"ddp_split_graphs"' in out  # not torch's: one graph per compiled block


def test_compile_traces_the_step_modules_and_checkpoints_load_without_compile(cross_runs, tmp_path, monkeypatch):
    folder, cfg = cross_runs
    compiled: list[nn.Module] = []

    def spy(module, **kwargs):
        compiled.append(module)
        return compile_blocks(module, backend="eager", **kwargs)  # dynamo graph capture, no C++ build

    monkeypatch.setattr(distill, "compile_blocks", spy)
    seen = []  # the first step's compile line, from the cache counters read around it
    monkeypatch.setattr(distill, "log_first_compiled_step", lambda s, counts: seen.append((s, counts)))
    run = tmp_path / "run"
    trainer = DistillTrainer(_cfg(cfg, compile=True, max_steps=2), run)
    # LoRA fake score: the real score is the same backbone, compiled once; the Bridge's decoder prior and projector.
    want = [trainer.generator_denoiser.backbone, trainer.teacher.denoiser.backbone,
            trainer.student.codec.vae.decoder, trainer.bridge.projector]  # fmt: skip
    assert [id(m) for m in compiled] == [id(m) for m in want]
    assert trainer.fake_denoiser.backbone is trainer.teacher.denoiser.backbone
    assert _compiled(trainer.generator_denoiser.backbone) and trainer.ema is None
    assert any("lora_A" in n for n, _ in trainer.teacher.denoiser.backbone.named_parameters())  # LoRA before compile
    assert trainer.train() == 2
    assert len(seen) == 1 and seen[0][0] > 0  # once per run, after its first step
    assert seen[0][1] == {}  # dynamo's eager backend: no inductor cache traffic during the step

    # The checkpoint written with compile on resumes a run with compile off (same parameter names) ...
    monkeypatch.undo()
    resumed = DistillTrainer(_cfg(cfg, compile=False), run)
    assert not _compiled(resumed.generator_denoiser.backbone)
    assert resumed.train() == 4
    # ... and both halves follow the eager run's trajectory.
    _assert_losses_close(_losses(run), _losses(folder / "eager"), rtol=1e-5, atol=1e-7)


def test_compile_with_a_copied_fake_score_compiles_the_real_score_too(cross_runs, tmp_path, monkeypatch):
    _, cfg = cross_runs
    compiled: list[nn.Module] = []
    monkeypatch.setattr(distill, "compile_blocks", lambda m, **kw: compiled.append(m) or 1)
    cfg = _cfg(cfg, compile=True, ema_decay=0.9)
    cfg.model.fake_score = "copy"
    trainer = DistillTrainer(cfg, tmp_path / "run")
    assert trainer.fake_denoiser.backbone is not trainer.teacher.denoiser.backbone
    assert [id(m) for m in compiled] == [
        id(trainer.generator_denoiser.backbone), id(trainer.fake_denoiser.backbone),
        id(trainer.teacher.denoiser.backbone), id(trainer.student.codec.vae.decoder), id(trainer.bridge.projector),
    ]  # fmt: skip
    assert trainer.ema is not None and not _compiled(trainer.ema)  # the EMA copy (the sampler) stays eager


@pytest.mark.slow  # inductor builds forward and backward kernels of the UNet, SD3, the decoder and the projector
def test_inductor_compiled_steps_match_eager(cross_runs, tmp_path):
    folder, cfg = cross_runs
    run = tmp_path / "run"
    DistillTrainer(_cfg(cfg, compile=True, max_steps=2), run).train()
    _assert_losses_close(_losses(run), _losses(folder / "eager")[:2], rtol=1e-3, atol=1e-6)


def test_channels_last_changes_the_layout_not_the_losses(cross_runs, tmp_path):
    folder, cfg = cross_runs
    trainer = DistillTrainer(_cfg(cfg, channels_last=True, max_steps=2), tmp_path / "run")
    nhwc = torch.channels_last
    for module in (trainer.generator_denoiser.backbone, trainer.student.codec.vae.decoder, trainer.bridge.projector):
        convs = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
        assert convs and all(w.is_contiguous(memory_format=nhwc) and not w.is_contiguous() for w in convs)
    sd3 = trainer.teacher.denoiser.backbone  # a transformer: left alone (its patch-embedding conv included)
    assert not is_convolutional(sd3) and all(p.is_contiguous() for p in sd3.parameters())
    assert trainer.train() == 2
    _assert_losses_close(_losses(tmp_path / "run"), _losses(folder / "eager")[:2], rtol=1e-4, atol=1e-6)


def test_subpixel_upsample_switches_the_upsamplers_not_the_losses_or_the_checkpoint(cross_runs, tmp_path):
    from diffusers.models.upsampling import Upsample2D

    from crossdistill.models.subpixel import SubpixelUpsample2D

    folder, cfg = cross_runs
    run = tmp_path / "run"
    trainer = DistillTrainer(_cfg(cfg, subpixel_upsample=True, max_steps=2), run)
    for module in (trainer.generator_denoiser.backbone, trainer.student.codec.vae.decoder):
        ups = [m for m in module.modules() if isinstance(m, Upsample2D)]
        assert ups and all(type(m) is SubpixelUpsample2D for m in ups)
    assert trainer.train() == 2
    # The checkpoint resumes a run with the option off (same parameters, same keys) on the eager trajectory.
    resumed = DistillTrainer(_cfg(cfg, subpixel_upsample=False), run)
    assert not any(type(m) is SubpixelUpsample2D for m in resumed.generator_denoiser.backbone.modules())
    assert resumed.train() == 4
    _assert_losses_close(_losses(run), _losses(folder / "eager"), rtol=1e-4, atol=1e-6)


def test_channel_stats_norm_switches_the_group_norms_not_the_losses_or_the_checkpoint(cross_runs, tmp_path):
    from crossdistill.models.groupnorm import ChannelStatsGroupNorm

    folder, cfg = cross_runs
    run = tmp_path / "run"
    trainer = DistillTrainer(_cfg(cfg, channel_stats_norm=True, channels_last=True, max_steps=2), run)
    for module in (trainer.generator_denoiser.backbone, trainer.student.codec.vae.decoder):
        norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(type(m) is ChannelStatsGroupNorm for m in norms)
    assert trainer.train() == 2
    # The checkpoint resumes a run with the option off (same parameters, same keys) on the eager trajectory.
    resumed = DistillTrainer(_cfg(cfg, channel_stats_norm=False), run)
    assert not any(type(m) is ChannelStatsGroupNorm for m in resumed.student.codec.vae.decoder.modules())
    assert resumed.train() == 4
    _assert_losses_close(_losses(run), _losses(folder / "eager"), rtol=1e-4, atol=1e-6)


def test_wide_head_attention_switches_the_decoder_attention_not_the_losses(cross_runs, tmp_path, monkeypatch):
    from diffusers.models.attention_processor import Attention

    from crossdistill.models import wide_attention

    folder, cfg = cross_runs
    # The tiny decoder's mid-block head is 16 wide, not the real one's 512: lower the bar so it counts as wide.
    monkeypatch.setattr(wide_attention, "WIDEST_FUSED_HEAD", 8)
    trainer = DistillTrainer(_cfg(cfg, wide_head_attention=True, max_steps=2), tmp_path / "run")
    kinds = [type(m.processor) for m in trainer.student.codec.vae.decoder.modules() if isinstance(m, Attention)]
    assert kinds and all(k is wide_attention.WideHeadMatmulAttnProcessor for k in kinds)
    assert trainer.train() == 2
    _assert_losses_close(_losses(tmp_path / "run"), _losses(folder / "eager")[:2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_fastest_measured_bridge_recipe_compiles_and_keeps_the_losses(cross_runs, tmp_path, monkeypatch, backend):
    """docs/performance.md's fastest measured Bridge (8.7% of the SD3.5-M step): train.compile + channels_last +
    channel_stats_norm + wide_head_attention together. Dynamo traces the swapped norms and the matmul processor inside
    the compiled blocks (eager backend: graph capture without a C++ build; inductor: real kernels, slow), and the
    losses stay on the eager run's."""
    from diffusers.models.attention_processor import Attention

    from crossdistill.models import wide_attention
    from crossdistill.models.groupnorm import ChannelStatsGroupNorm

    folder, cfg = cross_runs
    monkeypatch.setattr(wide_attention, "WIDEST_FUSED_HEAD", 8)  # the tiny decoder's 16-wide head counts as wide
    monkeypatch.setattr(distill, "compile_blocks", lambda m, **kw: compile_blocks(m, backend=backend, **kw))
    recipe = dict(compile=True, channels_last=True, channel_stats_norm=True, wide_head_attention=True, max_steps=2)
    trainer = DistillTrainer(_cfg(cfg, **recipe), tmp_path / "run")
    decoder = trainer.student.codec.vae.decoder
    assert any(type(m) is ChannelStatsGroupNorm for m in decoder.modules())
    assert all(type(m.processor) is wide_attention.WideHeadMatmulAttnProcessor
               for m in decoder.modules() if isinstance(m, Attention))  # fmt: skip
    assert _compiled(trainer.generator_denoiser.backbone)
    assert trainer.train() == 2
    _assert_losses_close(_losses(tmp_path / "run"), _losses(folder / "eager")[:2], rtol=1e-4, atol=1e-6)


def test_compile_blocks_keeps_each_upsampler_out_of_the_residual_blocks_graphs():
    """Inductor (torch 2.13 CPU) zeroes the input gradient of conv → GroupNorm → conv → ×1.0 → nearest upsample → conv
    compiled as one graph (docs/performance.md, the Bridge study): a ResnetBlock2D followed by an Upsample2D. Regional
    compile is right because no compiled block holds both; a block class that did (UpDecoderBlock2D, the decoder)
    would train the generator through the Bridge with a zero gradient."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    decoder = SD15Space.tiny(seed=0).codec.vae.decoder
    compiled: list[nn.Module] = []
    for m in decoder.modules():
        m.compile = lambda m=m, **kw: compiled.append(m)  # record what compile_blocks would compile
    assert compile_blocks(decoder) == len(compiled) > 0
    for m in compiled:
        kinds = {type(x) for x in m.modules()}
        assert not (ResnetBlock2D in kinds and Upsample2D in kinds), type(m).__name__


def test_to_channels_last_keeps_values():
    vae_decoder = SD15Space.tiny(seed=0).codec.vae.decoder
    before = {n: p.detach().clone() for n, p in vae_decoder.named_parameters()}
    assert is_convolutional(vae_decoder)
    to_channels_last(vae_decoder)
    for n, p in vae_decoder.named_parameters():
        assert torch.equal(p, before[n])


def test_offloaded_text_encoders_are_moved_and_never_used_again(cross_runs, tmp_path, monkeypatch):
    """Offload to the meta device: the encoders must have moved, and any later use of one (a training step, the
    sample grid, a checkpoint) would fail on meta weights."""
    folder, cfg = cross_runs
    monkeypatch.setattr(distill, "OFFLOAD_DEVICE", "meta")
    cfg = _cfg(cfg, offload_text_encoders=True, max_steps=2)
    cfg.log.sample_every = 2
    trainer = DistillTrainer(cfg, tmp_path / "run")
    for space in (trainer.student, trainer.teacher):
        params = list(space.prompt_encoder.parameters())
        assert params and all(p.device.type == "meta" for p in params)
        assert all(p.device.type == "cpu" for p in space.denoiser.parameters())
    assert trainer.train() == 2
    assert (tmp_path / "run" / "samples" / "step_000002.png").is_file()
    _assert_losses_close(_losses(tmp_path / "run"), _losses(folder / "eager")[:2], rtol=0, atol=0)

    kept = DistillTrainer(_cfg(cfg, offload_text_encoders=False), tmp_path / "kept")
    assert all(p.device.type == "cpu" for p in kept.student.prompt_encoder.parameters())


@pytest.mark.parametrize("bridge_kind", ["prior_projector", "decode_encode"])
def test_idle_vae_parts_are_offloaded_and_never_used_again(cross_runs, tmp_path, monkeypatch, bridge_kind):
    """The Student's VAE encoder and the Teacher's VAE (all of it, or its decoder side when the decode_encode Bridge
    encodes with it) go to the meta device: a step, the sample grid or a checkpoint that used them would fail."""
    folder, cfg = cross_runs
    monkeypatch.setattr(distill, "OFFLOAD_DEVICE", "meta")
    cfg = _cfg(cfg, offload_idle_vaes=True, max_steps=2)
    cfg.model.bridge_kind = bridge_kind
    cfg.log.sample_every = 2
    trainer = DistillTrainer(cfg, tmp_path / "run")
    student, teacher = trainer.student.codec.vae, trainer.teacher.codec.vae
    on = lambda m: {p.device.type for p in m.parameters()}  # noqa: E731
    assert on(student.encoder) == {"meta"} and on(student.decoder) == {"cpu"}
    if bridge_kind == "decode_encode":
        assert on(teacher.decoder) == {"meta"} and on(teacher.encoder) == {"cpu"}
    else:
        assert on(teacher) == {"meta"}
    assert trainer.train() == 2
    assert (tmp_path / "run" / "samples" / "step_000002.png").is_file()
    if bridge_kind == "prior_projector":  # the eager run's Bridge: the same losses
        _assert_losses_close(_losses(tmp_path / "run"), _losses(folder / "eager")[:2], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# DDP options (train.ddp_*): the accelerate kwargs they build, what is refused, what is ignored


def _ddp_config(**options) -> distill.DistillConfig:
    """A config check_config passes, but for the options given."""
    cfg = distill.DistillConfig(train=distill.TrainConfig(**options))
    cfg.model.bridge_kind = "identity"
    return cfg


def test_ddp_kwargs_are_torchs_defaults_unless_set():
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    kwargs = distill.ddp_kwargs(distill.TrainConfig())
    assert isinstance(kwargs, DistributedDataParallelKwargs)
    assert kwargs.to_kwargs() == {} and kwargs.comm_hook == DDPCommunicationHookType.NO  # DDP built as before
    tuned = distill.ddp_kwargs(distill.TrainConfig(ddp_comm_hook="bf16", ddp_bucket_mb=100, ddp_static_graph=True,
                                          ddp_grad_as_bucket_view=True, ddp_broadcast_buffers=False))  # fmt: skip
    # what accelerate hands to torch.nn.parallel.DistributedDataParallel, and the hook it registers after wrapping
    assert tuned.to_kwargs() == {"bucket_cap_mb": 100, "static_graph": True, "gradient_as_bucket_view": True,
                                 "broadcast_buffers": False}  # fmt: skip
    assert tuned.comm_hook == DDPCommunicationHookType.BF16
    assert distill.ddp_kwargs(distill.TrainConfig(ddp_comm_hook="fp16")).comm_hook == DDPCommunicationHookType.FP16


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ddp_comm_hook": "int8"}, r"train.ddp_comm_hook must be one of 'none', 'fp16', 'bf16'; got 'int8'"),
        ({"ddp_bucket_mb": 0}, r"train.ddp_bucket_mb must be an int >= 1 .*got 0"),
        ({"ddp_bucket_mb": 2.5}, r"train.ddp_bucket_mb must be an int >= 1 .*got 2.5"),
        ({"ddp_static_graph": "yes"}, r"train.ddp_static_graph must be true or false; got 'yes'"),
        ({"ddp_grad_as_bucket_view": 1}, r"train.ddp_grad_as_bucket_view must be true or false; got 1"),
        ({"ddp_broadcast_buffers": "no"}, r"train.ddp_broadcast_buffers must be true or false; got 'no'"),
        ({"ddp_split_graphs": "off"}, r"train.ddp_split_graphs must be true or false; got 'off'"),
    ],
)
def test_ddp_options_refuse_bad_values_naming_the_key(options, match):
    cfg = _ddp_config(**options)
    with pytest.raises(ConfigError, match=match):
        distill.ddp_kwargs(cfg.train)
    with pytest.raises(ConfigError, match=match):
        distill.check_config(cfg)


def test_ddp_options_from_the_command_line():
    from crossdistill.config import apply_overrides

    sets = ["train.ddp_comm_hook=fp16", "train.ddp_bucket_mb=50", "train.ddp_static_graph=true",
            "train.ddp_grad_as_bucket_view=on", "train.ddp_broadcast_buffers=false"]  # fmt: skip
    t = apply_overrides(distill.DistillConfig(), sets).train
    assert (t.ddp_comm_hook, t.ddp_bucket_mb) == ("fp16", 50)
    assert t.ddp_static_graph is True and t.ddp_grad_as_bucket_view is True and t.ddp_broadcast_buffers is False
    cfg = distill.DistillConfig()
    with pytest.raises(ConfigError, match=r"'train.ddp_comm_hook' must be one of 'none', 'fp16', 'bf16'"):
        apply_overrides(cfg, ["train.ddp_comm_hook=int8"])
    with pytest.raises(ConfigError, match=r"'train.ddp_bucket_mb' expects an int"):
        apply_overrides(cfg, ["train.ddp_bucket_mb=big"])


def test_static_graph_is_refused_with_the_gan_and_why():
    """The GAN's generator-side pass runs the critic under DDP's no_sync: torch's static-graph reducer then fails on
    the first generator update (reducer.cpp: expect_autograd_hooks_ INTERNAL ASSERT FAILED, seen on 2 gloo
    processes). Without the GAN it trains, bit for bit plain DDP (test_distributed_distill.py)."""
    cfg = _ddp_config(ddp_static_graph=True, gan_weight=0.1)
    cfg.data.real_images = "emoji:train"
    distill.check_config(_ddp_config())
    with pytest.raises(ConfigError, match=r"ddp_static_graph=true cannot run with the GAN.*no_sync"):
        distill.check_config(cfg)
    cfg.train.gan_weight = 0.0
    distill.check_config(cfg)


def test_gradient_accumulation_steps_are_checked():
    """>= 1; and not with DDP's static graph: torch's static-graph reducer fails under no_sync, which the micro-batches
    before the last run in (a plain two-process DDP model, static_graph=True, one no_sync backward then a synced one:
    the same reducer.cpp INTERNAL ASSERT as with the GAN, torch 2.13 on gloo)."""
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=rf"gradient_accumulation_steps must be >= 1.*got {bad}"):
            distill.check_config(_ddp_config(gradient_accumulation_steps=bad))
    distill.check_config(_ddp_config(gradient_accumulation_steps=4))
    distill.check_config(_ddp_config(gradient_accumulation_steps=1, ddp_static_graph=True))
    with pytest.raises(ConfigError, match=r"ddp_static_graph=true cannot run with train.gradient_accumulation_steps"):
        distill.check_config(_ddp_config(gradient_accumulation_steps=2, ddp_static_graph=True))


def _accelerator(kind: str, processes: int = 2, handler=None):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[kind], num_processes=processes, is_main_process=True,
                           ddp_handler=handler)  # fmt: skip


def test_ddp_options_are_ignored_with_one_info_line_without_ddp(caplog):
    import logging

    cfg = distill.DistillConfig(train=distill.TrainConfig(ddp_comm_hook="bf16", ddp_bucket_mb=50))
    for acc, sharded, kind in ((_accelerator("NO", 1), False, "on one process"),
                               (_accelerator("MULTI_GPU", 1), False, "on one process"),
                               (_accelerator("FSDP"), True, "FSDP2")):  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="crossdistill.train.distill"):
            distill.check_ddp_accelerator(cfg, acc, sharded=sharded)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and kind in lines[0], lines
        assert "train.ddp_comm_hook='bf16', train.ddp_bucket_mb=50 ignored" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="crossdistill.train.distill"):  # at their defaults: silent
        distill.check_ddp_accelerator(distill.DistillConfig(), _accelerator("NO", 1), sharded=False)
    assert not caplog.records


def test_ddp_split_graphs_sets_dynamos_ddp_split_under_compiled_ddp_only(monkeypatch, caplog):
    """train.ddp_split_graphs -> torch._dynamo.config.optimize_ddp when train.compile runs under DDP (one info line
    saying which); elsewhere dynamo's setting is left alone, and the option set off its default says it is ignored.
    An accelerator built by the caller carries nothing of it (not a DDP constructor argument), so none is refused."""
    import logging

    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", True)  # restored after the test

    def apply(acc, **options):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="crossdistill.train.distill"):
            distill.apply_ddp_graph_split(distill.TrainConfig(**options), acc)
        return [r.getMessage() for r in caplog.records]

    ddp = _accelerator("MULTI_GPU")
    assert apply(ddp, compile=True) == [
        "compile under DDP: one graph per block (train.ddp_split_graphs=false)"]  # fmt: skip
    assert torch._dynamo.config.optimize_ddp is False
    assert apply(_accelerator("MULTI_CPU"), compile=True, ddp_split_graphs=True) == [
        "compile under DDP: split at the gradient buckets (train.ddp_split_graphs=true)"]  # fmt: skip
    assert torch._dynamo.config.optimize_ddp is True  # set back by the next compiled DDP run of the process
    ignored = ["train.ddp_split_graphs=true ignored: it applies to train.compile=true under DDP only"]
    no_ddp = (_accelerator("NO", 1), _accelerator("MULTI_GPU", 1), _accelerator("FSDP"))
    for acc, options in ((ddp, {"compile": False}), *((acc, {"compile": True}) for acc in no_ddp)):
        assert apply(acc, ddp_split_graphs=True, **options) == ignored, (acc, options)
        assert torch._dynamo.config.optimize_ddp is True
        assert apply(acc, **options) == []  # at its default: silent
        assert torch._dynamo.config.optimize_ddp is True  # dynamo's setting left alone
    distill.check_ddp_accelerator(_ddp_config(ddp_split_graphs=True), _accelerator("MULTI_CPU"), sharded=False)


def test_ddp_run_refuses_an_accelerator_without_the_options_and_a_bf16_hook_torch_refuses(monkeypatch):
    cfg = distill.DistillConfig(train=distill.TrainConfig(ddp_comm_hook="bf16", ddp_static_graph=True))
    monkeypatch.setattr(distill, "bf16_comm_hook_supported", lambda: True)
    distill.check_ddp_accelerator(cfg, _accelerator("MULTI_GPU", handler=distill.ddp_kwargs(cfg.train)), sharded=False)
    distill.check_ddp_accelerator(cfg, _accelerator("MULTI_CPU", handler=distill.ddp_kwargs(cfg.train)), sharded=False)
    for handler in (None, distill.ddp_kwargs(distill.TrainConfig())):  # e.g. an Accelerator() built by the caller
        with pytest.raises(ConfigError, match="built without them: build it with .*make_accelerator"):
            distill.check_ddp_accelerator(cfg, _accelerator("MULTI_GPU", handler=handler), sharded=False)
    # torch's DDP takes the bf16 hook in CUDA / ROCm builds with NCCL >= 2.10 (or XPU + XCCL) only, even on gloo
    monkeypatch.setattr(distill, "bf16_comm_hook_supported", lambda: False)
    with pytest.raises(ConfigError, match="ddp_comm_hook=bf16.*CUDA / ROCm build.*ddp_comm_hook=fp16"):
        distill.check_ddp_accelerator(cfg, _accelerator("MULTI_CPU", handler=distill.ddp_kwargs(cfg.train)),
                                      sharded=False)  # fmt: skip


@pytest.mark.parametrize("key", distill.DDP_KEYS)
def test_ddp_run_refuses_an_accelerator_missing_any_one_option(key, monkeypatch):
    """Each train.ddp_* sets one field of accelerate's DDP kwargs, and the check compares every one of them."""
    import dataclasses

    from accelerate.utils import DistributedDataParallelKwargs

    assert distill.DDP_KWARGS[key] in {f.name for f in dataclasses.fields(DistributedDataParallelKwargs)}
    off_default = {"ddp_comm_hook": "fp16", "ddp_bucket_mb": 7, "ddp_static_graph": True,
                   "ddp_grad_as_bucket_view": True, "ddp_broadcast_buffers": False}  # fmt: skip
    assert set(off_default) == set(distill.DDP_KEYS)
    cfg = distill.DistillConfig(train=distill.TrainConfig(**off_default))
    handler = distill.ddp_kwargs(cfg.train)
    distill.check_ddp_accelerator(cfg, _accelerator("MULTI_CPU", handler=handler), sharded=False)
    stale = dataclasses.replace(handler, **{distill.DDP_KWARGS[key]: getattr(distill.ddp_kwargs(distill.TrainConfig()),
                                                                              distill.DDP_KWARGS[key])})  # fmt: skip
    with pytest.raises(ConfigError, match="built without them"):
        distill.check_ddp_accelerator(cfg, _accelerator("MULTI_CPU", handler=stale), sharded=False)


def test_bf16_hook_support_follows_torchs_own_check():
    from torch.nn.parallel import DistributedDataParallel

    if torch.version.cuda is None and torch.version.hip is None:  # this CPU build: torch's check refuses it too
        assert not distill.bf16_comm_hook_supported()
    source = inspect.getsource(DistributedDataParallel._check_comm_hook)
    assert "bf16_compress_hook" in source and "(2, 10)" in source  # the check this mirrors is still torch's


def test_ddp_options_are_resume_safe_and_ignored_on_one_process(cross_runs, tmp_path):
    """Speed options: left out of the config hash (so a run of an older version, without the keys, resumes too) and
    free to change on resume. On one process they change nothing: the eager run's losses, bit for bit."""
    from crossdistill.config import config_hash, prepare_run_dir, to_dict

    folder, cfg = cross_runs
    tuned = _cfg(cfg, ddp_comm_hook="fp16", ddp_bucket_mb=1, ddp_static_graph=True, ddp_grad_as_bucket_view=True,
                 ddp_broadcast_buffers=False, ddp_split_graphs=True)  # fmt: skip
    assert config_hash(tuned, distill.DISTILL_RESUME_SAFE) == config_hash(cfg, distill.DISTILL_RESUME_SAFE)
    older = tmp_path / "older"  # config.json of a version without the keys
    prepare_run_dir(older, cfg, resume_safe=distill.DISTILL_RESUME_SAFE)
    saved = to_dict(cfg)
    for key in (*distill.DDP_KEYS, "ddp_split_graphs"):
        del saved["train"][key]
    (older / "config.json").write_text(json.dumps(saved))
    prepare_run_dir(older, tuned, resume_safe=distill.DISTILL_RESUME_SAFE)

    run = tmp_path / "run"
    assert DistillTrainer(_cfg(tuned, max_steps=2), run).train() == 2
    assert DistillTrainer(cfg, run).train() == 4  # resumed with the options back at their defaults
    _assert_losses_close(_losses(run), _losses(folder / "eager"), rtol=0, atol=0)


def test_first_compiled_step_says_what_inductor_compiled_and_took_from_its_cache(caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    before = {"fxgraph_cache_miss": 2, "fxgraph_cache_hit": 1, "autograd_cache_miss": 1}
    after = {"fxgraph_cache_miss": 9, "fxgraph_cache_hit": 4, "fxgraph_cache_bypass": 1, "autograd_cache_miss": 3}
    fx = {k: v for k, v in after.items() if k.startswith("fxgraph")}
    monkeypatch.setattr("torch._dynamo.utils.counters", {"inductor": fx, "aot_autograd": {"autograd_cache_miss": 3}})
    assert compile_cache_counts() == after
    counts = compile_cache_counts(since=before)  # what moved, by how much
    assert counts == {"fxgraph_cache_miss": 7, "fxgraph_cache_hit": 3, "fxgraph_cache_bypass": 1,
                      "autograd_cache_miss": 2}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="crossdistill.train.perf"):
        log_first_compiled_step(241.6, counts)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("first compiled step: 242 s; inductor compiled 8 graphs and took 3 from its cache (")
    assert str(tmp_path / "inductor") in line and "TORCHINDUCTOR_CACHE_DIR" in line
