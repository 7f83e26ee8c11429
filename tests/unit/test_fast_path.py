"""The one-step fast path computes exactly what the plain diffusers calls compute (CPU, tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from crossdistill.errors import ConfigError
from crossdistill.export.fast import FastPathOptions, OneStepRunner, inductor_options, scaled_linear_alpha_bar

CPU_FP32 = FastPathOptions(dtype="float32", channels_last=False, compile=None, cuda_graphs=False)
# fuse_qkv alone: every attention fused, the cross-attentions' keys and values too
CPU_FUSED = FastPathOptions(dtype="float32", channels_last=False, compile=None, cuda_graphs=False, fuse_qkv=True,
                            shared_cross_kv=False)  # fmt: skip


def tiny_models(seed: int = 0, **unet_config) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """A tiny SD-shaped UNet and VAE; ``unet_config`` adds settings to the UNet's config."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
        **unet_config,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    return unet.eval(), vae.eval()


@torch.no_grad()
def reference_images(unet, vae, embeds, noise, prediction_type: str, timestep: int = 999) -> torch.Tensor:
    """Written independently of the runner, with a diffusers scheduler's ᾱ and its own x0 formulas."""
    ab = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod[timestep]
    out = unet(noise, timestep, encoder_hidden_states=embeds).sample
    if prediction_type == "epsilon":
        x0 = (noise - (1 - ab).sqrt() * out) / ab.sqrt()
    else:
        x0 = ab.sqrt() * noise - (1 - ab).sqrt() * out
    return vae.decode(x0 / 0.18215).sample.clamp(-1, 1)


def test_alpha_bar_matches_diffusers_scheduler():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for t in (0, 500, 999):
        assert math.isclose(scaled_linear_alpha_bar(t), float(sched.alphas_cumprod[t]), rel_tol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_runner_equals_eager_diffusers(prediction_type, channels_last):
    unet, vae = tiny_models()
    embeds, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, prediction_type)
    options = FastPathOptions(dtype="float32", channels_last=channels_last, compile=None, cuda_graphs=False)
    runner = OneStepRunner(unet, vae, prediction_type=prediction_type, options=options)
    images = runner(embeds, noise)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert (images - expected).abs().max().item() < 1e-5
    # The image depends on the prompt: a wrong wiring of the embeddings would not change it.
    assert (runner(torch.randn(2, 5, 16), noise) - images).abs().max().item() > 1e-3


def test_cuda_only_options_warn_and_are_ignored_on_cpu():
    unet, vae = tiny_models()
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    options = FastPathOptions(dtype="float32", channels_last=False, compile="default", cuda_graphs=True,
                              cudnn_benchmark_limit=0)  # fmt: skip
    limit = torch.backends.cudnn.benchmark_limit
    with pytest.warns(UserWarning, match=r"compile, cuda_graphs ignored \(CUDA only\)$"):
        runner = OneStepRunner(unet, vae, options=options)
    # cuDNN's settings are left alone off CUDA, without a warning (the default limit is set; it means nothing there)
    assert torch.backends.cudnn.benchmark_limit == limit
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError):
        FastPathOptions(dtype="int8")
    with pytest.raises(ConfigError):
        FastPathOptions(compile="reduce-overhead", cuda_graphs=True)
    for limit in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="cudnn_benchmark_limit must be an integer >= 0"):
            FastPathOptions(cudnn_benchmark_limit=limit)
    with pytest.raises(ConfigError, match="needs cudnn_benchmark=True"):
        FastPathOptions(cudnn_benchmark=False, cudnn_benchmark_limit=0)
    assert FastPathOptions(cudnn_benchmark_limit=0).cudnn_benchmark_limit == 0
    unet, vae = tiny_models()
    runner = OneStepRunner(unet, vae, options=CPU_FP32)
    with pytest.raises(ConfigError):
        runner(torch.randn(2, 5, 16), torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fuse_qkv_gives_the_same_images(channels_last):
    unet, vae = tiny_models()
    embeds, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    options = FastPathOptions(dtype="float32", channels_last=channels_last, compile=None, cuda_graphs=False,
                              fuse_qkv=True, shared_cross_kv=False)  # fmt: skip
    runner = OneStepRunner(unet, vae, options=options)
    # The fused processors are really in use (self-attention q/k/v and cross-attention k/v are one Linear each).
    for module in (unet, vae):
        kinds = {type(p).__name__ for p in module.attn_processors.values()}
        assert kinds == {"FusedAttnProcessor2_0"}
    assert any(hasattr(m, "to_qkv") for m in unet.modules()) and any(hasattr(m, "to_kv") for m in unet.modules())
    assert any(hasattr(m, "to_qkv") for m in vae.modules())
    assert not any(p.requires_grad for p in (*unet.parameters(), *vae.parameters()))
    images = runner(embeds, noise)
    assert (images - expected).abs().max().item() < 1e-5
    assert (runner(torch.randn(2, 5, 16), noise) - images).abs().max().item() > 1e-3
    # A second runner on the already fused modules keeps them fused and computes the same images.
    assert (OneStepRunner(unet, vae, options=options)(embeds, noise) - images).abs().max().item() < 1e-6


def test_fuse_qkv_really_uses_the_fused_weights():
    """Corrupting the fused weights changes the image: the fused path is what runs, not the old projections."""
    unet, vae = tiny_models()
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    runner = OneStepRunner(unet, vae, options=CPU_FUSED)
    before = runner(embeds, noise)
    with torch.no_grad():
        next(m for m in unet.modules() if hasattr(m, "to_qkv")).to_qkv.weight.mul_(3.0)
    assert (runner(embeds, noise) - before).abs().max().item() > 1e-4


def test_fuse_qkv_leaves_modules_it_would_change_alone():
    """Custom processors would be replaced, and a module without diffusers' fusion API cannot be fused: a warning that
    names the reason, the module as it was, and still diffusers' images."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    unet, vae = tiny_models()
    unet.set_attn_processor(SlicedAttnProcessor(slice_size=1))
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    with pytest.warns(UserWarning, match="fuse_qkv ignored for the UNet2DConditionModel: .*SlicedAttnProcessor"):
        runner = OneStepRunner(unet, vae, options=CPU_FUSED)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"SlicedAttnProcessor"}
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5
    _, vae = tiny_models()
    with pytest.warns(UserWarning) as caught:  # the time-embedding option warns too: a Conv2d has none
        OneStepRunner(torch.nn.Conv2d(4, 4, 1), vae, options=CPU_FUSED)
    messages = [str(w.message) for w in caught]
    assert "fuse_qkv ignored for the Conv2d: it has no diffusers fuse_qkv_projections()" in messages, messages


def test_default_options_keep_a_peft_lora_on_the_attention_projections():
    """A peft LoRA wraps to_q/to_k/to_v: fusing or sharing their base weights would drop the LoRA's delta, so the
    default options leave those projections alone, with warnings, and the images are the LoRA model's."""
    from peft import LoraConfig

    unet, vae = tiny_models()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    unet.disable_adapters()
    assert (reference_images(unet, vae, embeds, noise, "epsilon") - expected).abs().max().item() > 1e-3
    unet.enable_adapters()
    with pytest.warns(UserWarning) as caught:
        runner = OneStepRunner(unet, vae, options=CPU_FP32)
    messages = " | ".join(str(w.message) for w in caught)
    assert "fuse_qkv ignored for the UNet2DConditionModel: its q/k/v projections are ['peft." in messages
    assert "shared_cross_kv ignored" in messages
    assert runner._cross_kv is None and not any(hasattr(m, "to_qkv") for m in unet.modules())
    assert any(hasattr(m, "to_qkv") for m in vae.modules())  # the VAE has no LoRA: fused
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5


def test_inductor_tuning_needs_compile_and_names_real_inductor_options():
    with pytest.raises(ConfigError, match="needs compile"):
        FastPathOptions(compile=None, cuda_graphs=False, inductor_tuning=True)
    FastPathOptions(compile="default", inductor_tuning=True)  # valid
    opts = inductor_options("max-autotune-no-cudagraphs", tuning=True)
    assert opts["max_autotune"] is True and opts["conv_1x1_as_mm"] is True and opts["epilogue_fusion"] is False
    assert inductor_options("default", tuning=False) == {}
    # torch.compile validates option names and types when it builds its backend: a typo or a removed setting
    # in this torch version raises here (nothing is compiled until the first call).
    for mode in ("default", "max-autotune-no-cudagraphs"):
        torch.compile(lambda x: x + 1, options=inductor_options(mode, tuning=True), dynamic=False)
    with pytest.raises(RuntimeError):
        torch.compile(lambda x: x + 1, options={"no_such_inductor_setting": True})


def test_inductor_tuning_is_ignored_with_a_warning_on_cpu():
    unet, vae = tiny_models()
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    options = FastPathOptions(dtype="float32", channels_last=False, compile="default", cuda_graphs=False,
                              inductor_tuning=True)  # fmt: skip
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    with pytest.warns(UserWarning, match="compile, inductor_tuning ignored"):
        runner = OneStepRunner(unet, vae, options=options)
    assert runner._step == runner._eager_step  # nothing compiled on CPU
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("timestep", [999, 500])
def test_constant_time_embedding_gives_the_same_images(timestep):
    """Each ResNet block's time projection returns its recorded output at the runner's timestep: the same images as
    diffusers computes at that timestep, for any prompt and noise; a state dict without new keys; switched back."""
    from crossdistill.models.constant_time import ConstantTimeProjection, disable_constant_time_projection

    unet, vae = tiny_models()
    keys = set(unet.state_dict())
    embeds, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon", timestep=timestep)
    # without the other options that switch the UNet: fused Linears add state-dict keys, and the shared keys/values
    # would refuse the raw UNet calls below
    options = FastPathOptions(dtype="float32", channels_last=True, compile=None, cuda_graphs=False,
                              constant_time_embedding=True, fuse_qkv=False, shared_cross_kv=False)  # fmt: skip
    runner = OneStepRunner(unet, vae, options=options, timestep=timestep)
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert len(resnets) == 8 and all(type(r.time_emb_proj) is ConstantTimeProjection for r in resnets)
    assert set(unet.state_dict()) == keys
    images = runner(embeds, noise)
    assert (images - expected).abs().max().item() < 1e-5
    assert (runner(torch.randn(2, 5, 16), noise) - images).abs().max().item() > 1e-3
    # the constants are the timestep's: recorded at another one, the images differ
    other = reference_images(unet, vae, embeds, noise, "epsilon", timestep=999 if timestep != 999 else 500)
    assert (images - other).abs().max().item() > 1e-3
    assert disable_constant_time_projection(unet) == 8
    assert all(type(r.time_emb_proj) is torch.nn.Linear and not hasattr(r.time_emb_proj, "_constant") for r in resnets)
    assert (reference_images(unet, vae, embeds, noise, "epsilon", timestep=timestep) - expected).abs().max() < 1e-5


def linear_ops_in_compiled_step(**options) -> int:
    """The linear ops in the graphs torch.compile hands its backend for the tiny runner's step, after FX's dead-code
    elimination (which inductor runs on the graph it gets)."""
    captured = []

    def backend(gm, _inputs):
        gm.graph.eliminate_dead_code()
        captured.append(sum(n.op == "call_function" and "linear" in str(n.target) for n in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    try:
        unet, vae = tiny_models()
        runner = OneStepRunner(unet, vae, options=FastPathOptions(dtype="float32", channels_last=False, compile=None,
                                                                  cuda_graphs=False, **options))  # fmt: skip
        torch.compile(runner._eager_step, backend=backend)(torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8))
    finally:
        torch._dynamo.reset()
    return sum(captured)


def test_constant_time_embedding_leaves_the_time_mlp_out_of_the_compiled_graph():
    """Under torch.compile the time MLP's result feeds nothing: the step holds 10 linear ops fewer, 2 in the time MLP
    and 1 per ResNet block."""
    off, on = (linear_ops_in_compiled_step(constant_time_embedding=c) for c in (False, True))
    assert off - on == 10, (off, on)


def test_constant_time_embedding_leaves_a_unet_with_other_time_inputs_alone():
    """A time embedding that also depends on class labels (or SDXL's added embedding) is not constant: a warning,
    and the modules stay as they were."""
    from crossdistill.models.constant_time import enable_constant_time_projection

    unet, vae = tiny_models(class_embed_type="timestep")
    assert enable_constant_time_projection(unet, torch.tensor([999])) == 0
    options = FastPathOptions(dtype="float32", channels_last=False, compile=None, cuda_graphs=False,
                              constant_time_embedding=True)  # fmt: skip
    with pytest.warns(UserWarning, match="constant_time_embedding ignored"):
        OneStepRunner(unet, vae, options=options)
    assert not any(type(m).__name__ == "ConstantTimeProjection" for m in unet.modules())


def test_shared_cross_kv_gives_the_same_images():
    """Every cross-attention reads its keys and values from one projection of the prompt: the images diffusers
    computes; a raw call to the switched UNet is refused with the fix; switched back, the stock processors."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from crossdistill.models.cross_kv import PrecomputedKVAttnProcessor, disable_shared_cross_kv

    unet, vae = tiny_models()
    embeds, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    options = FastPathOptions(dtype="float32", channels_last=True, compile=None, cuda_graphs=False,
                              shared_cross_kv=True)  # fmt: skip
    runner = OneStepRunner(unet, vae, options=options)
    cross = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert len(cross) == 4 and all(type(m.processor) is PrecomputedKVAttnProcessor for m in cross)
    assert runner._cross_kv.weight.shape == (sum(2 * m.to_k.weight.shape[0] for m in cross), 16)
    images = runner(embeds, noise)
    assert (images - expected).abs().max().item() < 1e-5
    assert (runner(torch.randn(2, 5, 16), noise) - images).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="takes the shared key/value projection .* got 16: compute it"):
        unet(noise, 999, encoder_hidden_states=embeds)
    assert disable_shared_cross_kv(unet) == 4 and all(type(m.processor) is AttnProcessor2_0 for m in cross)
    assert (reference_images(unet, vae, embeds, noise, "epsilon") - expected).abs().max().item() < 1e-5


def test_shared_cross_kv_makes_one_projection_of_the_prompt_in_the_compiled_graph():
    """The 4 cross-attentions' 8 key and value projections become one linear op in the graph torch.compile gets."""
    off, on = (linear_ops_in_compiled_step(constant_time_embedding=False, fuse_qkv=False, shared_cross_kv=s)
               for s in (False, True))  # fmt: skip
    assert off - on == 7, (off, on)


def test_fuse_qkv_beside_shared_cross_kv_fuses_the_self_attentions_only():
    """With both options the self-attentions run fused q/k/v, the cross-attentions read the shared keys/values: the
    images are diffusers'; corrupting a fused weight changes them (the fused path runs); unfusing restores the stock
    processors."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from crossdistill.models.cross_kv import PrecomputedKVAttnProcessor

    unet, vae = tiny_models()
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    options = FastPathOptions(dtype="float32", channels_last=False, compile=None, cuda_graphs=False, fuse_qkv=True,
                              shared_cross_kv=True)  # fmt: skip
    runner = OneStepRunner(unet, vae, options=options)
    attns = [m for m in unet.modules() if isinstance(m, Attention)]
    selfs, cross = [a for a in attns if not a.is_cross_attention], [a for a in attns if a.is_cross_attention]
    assert len(selfs) == len(cross) == 4 and runner._cross_kv is not None
    assert all(type(a.processor).__name__ == "FusedAttnProcessor2_0" and hasattr(a, "to_qkv") for a in selfs)
    assert all(type(a.processor) is PrecomputedKVAttnProcessor and not hasattr(a, "to_kv") for a in cross)
    images = runner(embeds, noise)
    assert (images - expected).abs().max().item() < 1e-5
    with torch.no_grad():
        selfs[0].to_qkv.weight.mul_(3.0)
    assert (runner(embeds, noise) - images).abs().max().item() > 1e-4
    unet.unfuse_qkv_projections()
    assert all(type(a.processor) is AttnProcessor2_0 for a in selfs)


def test_fuse_qkv_beside_shared_cross_kv_makes_one_linear_op_per_self_attention():
    """On top of the shared keys/values, fuse_qkv turns the 4 UNet and 1 VAE self-attentions' 3 projections into 1."""
    shared, both = (linear_ops_in_compiled_step(shared_cross_kv=True, fuse_qkv=f) for f in (False, True))
    assert shared - both == 10, (shared, both)


def test_runners_alternating_fuse_qkv_with_and_without_shared_cross_kv():
    """Runners on the same modules: fuse_qkv alone after fuse_qkv + shared keys/values fuses everything; then both
    options find the cross-attentions fused and leave shared_cross_kv off, with a warning. Images stay diffusers'."""
    unet, vae = tiny_models()
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    both = FastPathOptions(dtype="float32", channels_last=False, compile=None, cuda_graphs=False, fuse_qkv=True,
                           shared_cross_kv=True)  # fmt: skip
    assert (OneStepRunner(unet, vae, options=both)(embeds, noise) - expected).abs().max().item() < 1e-5
    assert (OneStepRunner(unet, vae, options=CPU_FUSED)(embeds, noise) - expected).abs().max().item() < 1e-5
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    with pytest.warns(UserWarning, match="shared_cross_kv ignored"):
        runner = OneStepRunner(unet, vae, options=both)
    assert runner._cross_kv is None
    assert (runner(embeds, noise) - expected).abs().max().item() < 1e-5


def test_a_second_runner_on_the_same_modules_starts_from_the_stock_ones():
    """Every option that switches modules in place, twice on the same modules (as a second runner would): the second
    runner records its constants from the stock modules, and its images are still diffusers'."""
    unet, vae = tiny_models()
    embeds, noise = torch.randn(1, 5, 16), torch.randn(1, 4, 8, 8)
    expected = reference_images(unet, vae, embeds, noise, "epsilon")
    options = FastPathOptions(dtype="float32", channels_last=True, compile=None, cuda_graphs=False,
                              shared_cross_kv=True, subpixel_upsample=True, pad_narrow_convs=True)  # fmt: skip
    OneStepRunner(unet, vae, options=options)
    assert (OneStepRunner(unet, vae, options=options)(embeds, noise) - expected).abs().max().item() < 1e-5
