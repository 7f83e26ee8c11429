"""The trainer's speed options (issue 7): regional compile, fused AdamW, channels_last, text-encoder offload.

Each option must leave what a step computes unchanged (up to rounding) and checkpoints interchangeable. The
compile tests here trace with dynamo's ``eager`` backend (graph capture, guards and recompiles, no C++ codegen);
the inductor runs that compile real kernels on the CPU take minutes and are marked slow.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from crossdistill.models.sd3 import SD3Space
from crossdistill.models.sd15 import SD15Space
from crossdistill.train import distill
from crossdistill.train.distill import DistillTrainer
from crossdistill.train.perf import compile_blocks, is_convolutional, make_adamw, to_channels_last
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
    assert t.subpixel_upsample is False and t.offload_idle_vaes is True
    assert main(["distill", "--preset", "emoji_shared", "--print-config"]) == 0
    out = capsys.readouterr().out
    for key in ("compile", "fused_optimizer", "channels_last", "offload_text_encoders", "offload_idle_vaes",
                "subpixel_upsample"):  # fmt: skip
        assert f'"{key}"' in out


def test_compile_traces_the_step_modules_and_checkpoints_load_without_compile(cross_runs, tmp_path, monkeypatch):
    folder, cfg = cross_runs
    compiled: list[nn.Module] = []

    def spy(module, **kwargs):
        compiled.append(module)
        return compile_blocks(module, backend="eager", **kwargs)  # dynamo graph capture, no C++ build

    monkeypatch.setattr(distill, "compile_blocks", spy)
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
