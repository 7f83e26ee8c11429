"""The benchmark scripts still run end to end (tiny configs, CPU), so they do not rot between GPU sessions.

Not timed tests: only that each script finishes and writes a report with the rows it promises (~45 s in all).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout: int = 600) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / script), "--tiny", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_infer_one_step_tiny(tmp_path):
    run_bench("infer_one_step.py", "--out", str(tmp_path), "--iters", "2")
    report = json.loads((tmp_path / "infer_one_step.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert rows, "no variant ran"
    assert "error" not in rows["default + subpixel_upsample"]
    assert "error" not in rows["default without fuse_qkv"]
    assert "notes" not in report  # the default list runs one cudnn_benchmark_limit
    baseline = report["results"][0]
    assert baseline["name"].startswith("eager")
    for b in ("1", "8"):
        assert math.isfinite(baseline["batches"][b]["ms"]) and baseline["batches"][b]["finite"]
    assert set(report["split"]) >= {"unet", "decode"}
    assert (tmp_path / "infer_one_step.md").read_text().startswith("# One-step SD 1.5 inference")


def test_gan_pass_flops_tiny(tmp_path):
    run_bench("gan_pass_flops.py", "--out", str(tmp_path))
    r = json.loads((tmp_path / "gan_pass_flops.json").read_text())
    assert r["feature_block"] == 2 and r["blocks"] == 4  # the middle of four blocks
    assert 0 < r["forward_after_feature_block_tflop"] < r["forward_tflop"]  # block 3
    assert r["forward_to_feature_block_tflop"] + r["forward_after_feature_block_tflop"] == pytest.approx(
        r["forward_tflop"]
    )
    assert r["feature_pass_weight_grad_tflop"] > 0
    assert r["skipped_per_critic_update_tflop"] == r["forward_after_feature_block_tflop"]
    assert r["skipped_per_generator_update_tflop"] == pytest.approx(
        r["forward_after_feature_block_tflop"] + r["feature_pass_weight_grad_tflop"]
    )
    assert "skipped by the stop, per critic update" in (tmp_path / "gan_pass_flops.md").read_text()


def test_conv_shapes_tiny_lists_every_conv_and_sums_the_faster_choice(tmp_path):
    run_bench("conv_shapes.py", "--out", str(tmp_path))
    report = json.loads((tmp_path / "conv_shapes.json").read_text())
    assert not report["timed"]  # CPU: shapes only
    rows = report["rows"]
    assert {r["part"] for r in rows} == {"unet", "decode"}
    out_conv = [r for r in rows if r["part"] == "decode" and r["weight"][0] == 3]  # the decoder's conv_out
    assert len(out_conv) == 1 and out_conv[0]["count"] == 1 and out_conv[0]["names"] == ["decoder.conv_out"]
    n, cin, h, w = out_conv[0]["input"]
    assert out_conv[0]["gflop"] == pytest.approx(2 * n * 3 * h * w * cin * 9 / 1e9)
    assert "| part | input | weight |" in (tmp_path / "conv_shapes.md").read_text()

    sys.path.insert(0, str(ROOT / "bench"))
    from conv_shapes import totals

    timed = [
        {"part": "decode", "count": 2, "cudnn_us": 10.0, "triton_us": 6.0},
        {"part": "decode", "count": 1, "cudnn_us": 5.0, "triton_error": "NoValidChoicesError"},
        {"part": "decode", "count": 3, "skipped": "time budget"},
    ]
    t = totals(timed)["decode"]
    assert t == {"shapes": 2, "calls": 3, "cudnn_us": 25.0, "best_us": 17.0, "triton_wins": 1}


def test_norm_study_tiny(tmp_path):
    run_bench("norm_study.py", "--out", str(tmp_path))
    report = json.loads((tmp_path / "norm_study.json").read_text())
    assert report["gn_micro"] and all(r["chstats_nhwc"]["max_err"] < 0.1 for r in report["gn_micro"])
    parts = report["parts"]
    assert set(parts) == {"decode | stock", "decode | channel_stats_norm", "decode | wide_head_attention",
                          "decode | channel_stats_norm + wide_head_attention", "unet | stock",
                          "unet | channel_stats_norm"}  # fmt: skip
    assert not any("error" in row for row in parts.values())
    assert math.isfinite(parts["decode | channel_stats_norm"]["8"]["rel_err_vs_first"])
    assert "| decode | stock |" in (tmp_path / "norm_study.md").read_text()


def test_bridge_study_tiny(tmp_path):
    run_bench("bridge_study.py", "--variants", "regional", "regional_cl_csn_wide", "--out", str(tmp_path))
    report = json.loads((tmp_path / "bridge_study.json").read_text())
    first, second = report["results"]
    assert "error" not in first and "error" not in second
    assert first["fwd_ms"] > 0 and first["bwd_ms"] > 0 and first["rel_err_grad"] == 0.0 and first["grad_norm"] > 0
    # channels_last + per-channel GroupNorm statistics: the same Bridge, output and input gradient (float32 on CPU)
    assert second["rel_err_out"] < 1e-4 and second["rel_err_grad"] < 1e-4
    assert "| regional compile, NCHW |" in (tmp_path / "bridge_study.md").read_text()


def test_train_step_tiny(tmp_path):
    run_bench("train_step.py", "--parts", "step", "--variants", "eager", "fused", "same_eager", "--out", str(tmp_path))
    report = json.loads((tmp_path / "train_step.json").read_text())
    assert not report.get("errors"), report.get("errors")
    names = [r["name"] for r in report["steps"]]
    assert len(names) == 3 and "same space" in names[2]
    for row in report["steps"]:
        assert row["tflop"] > 0 and row["ms"] > 0 and 0 < row["mfu"]
    # the cross-space step does more arithmetic than the same-space one (SD3 Teacher + Bridge)
    assert report["steps"][0]["tflop"] > report["steps"][2]["tflop"]


def test_train_scaling_two_cpu_processes(tmp_path):
    """DDP through `accelerate launch` with two gloo processes: the world size reaches the step."""
    cmd = [sys.executable, str(ROOT / "bench" / "train_scaling.py"), "--tiny", "--cpu", "--procs", "1", "2",
           "--variants", "fused", "--out", str(tmp_path), "--timeout-s", "300"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = json.loads((tmp_path / "train_scaling.json").read_text())["rows"]
    assert [r["world_size"] for r in rows] == [1, 2]
    assert rows[1]["samples_per_s"] > 0


def test_trainer_step_tiny(tmp_path):
    """The real DistillTrainer, built from a preset on injected spaces, times both updates and counts their FLOPs."""
    run_bench("trainer_step.py", "--variants", "preset", "--iters", "1", "--profile", "--out", str(tmp_path))
    row = json.loads((tmp_path / "trainer_step.json").read_text())["rows"][0]
    assert "error" not in row, row.get("error")
    assert row["generator_update"]["ms"] > 0 and row["critic_update"]["ms"] > 0
    assert row["generator_tflop"] > row["critic_tflop"] > 0  # the generator update runs real + fake score and more
    assert row["critic_steps_per_generator_step"] == 10  # the preset's, not overridden
    # --profile ran one update of each kind under the profiler; a CPU has no kernels, and the report says so
    none = {"kernels": 0, "calls": 1}
    assert row["profile"] == {"generator update": none, "critic update": none}
    assert "| preset | critic update | no GPU kernels recorded |" in (tmp_path / "trainer_step.md").read_text()


def test_trainer_step_writes_reals_for_the_gan(tmp_path):
    """With the GAN on and no data.real_images (the GPU machines have no image set), --reals random images serve."""
    run_bench("trainer_step.py", "--variants", "preset", "--iters", "1", "--set", "train.gan_weight=1e-3",
              "--reals", "3", "--out", str(tmp_path))  # fmt: skip
    row = json.loads((tmp_path / "trainer_step.json").read_text())["rows"][0]
    assert "error" not in row, row.get("error")
    assert row["train"]["gan_weight"] == 1e-3 and row["train"]["gradient_checkpointing"]  # the preset's
    assert row["generator_update"]["ms"] > 0 and row["critic_update"]["ms"] > 0


def test_ddp_graph_split_tiny(tmp_path):
    """Two gloo processes count the graphs of each backbone with DDP's graph split on and off, and the order of the
    all-reduces against the blocks' backward with it off."""
    run_bench("ddp_graph_split.py", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "ddp_graph_split.json").read_text())["rows"]
    assert [(r["backbone"], r["ddp_split_graphs"]) for r in rows] == [
        ("sd35m", True), ("sd35m", False), ("sd15", True), ("sd15", False)]  # fmt: skip
    for split, whole in (rows[:2], rows[2:]):
        assert whole["compiled_blocks"] == split["compiled_blocks"] > 0
        assert 0 < whole["graphs"] <= split["graphs"] and len(whole["ops_per_graph"]) == whole["graphs"]
        assert whole["all_reduce_total"] >= 1 and whole["all_reduce_before_last_block_done"] is not None
    assert "| sd15 |" in (tmp_path / "ddp_graph_split.md").read_text()


@pytest.mark.slow
def test_ddp_compile_cache_reports_every_launch(tmp_path):
    """Five launches in fresh processes on one inductor cache (inductor's C++ backend on CPU, ~1-2 min): the first
    (one process) misses the cache, and DDP with the split off hits what it left, AOTAutograd's cache included; with
    the split on AOTAutograd's cache is bypassed."""
    cmd = [sys.executable, str(ROOT / "bench" / "ddp_compile_cache.py"), "--out", str(tmp_path), "--width", "256"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "ddp_compile_cache.json").read_text())["rows"]
    assert [r["launch"] for r in rows][0] == "one process" and len(rows) == 5
    assert rows[0]["counters"].get("fxgraph_cache_miss", 0) > 0 and not rows[0]["counters"].get("fxgraph_cache_hit")
    for split_off in rows[1:3]:  # the one-process graphs are the split-off DDP graphs
        assert split_off["counters"].get("autograd_cache_hit", 0) > 0 and not split_off["counters"].get(
            "fxgraph_cache_miss"
        ), split_off
    assert rows[4]["counters"].get("autograd_cache_bypass", 0) > 0  # split on


@pytest.mark.slow
def test_trainer_step_one_process_compile_warms_split_off_ddp(tmp_path):
    """The compiled trainer (tiny spaces, inductor on CPU, ~5 min): a one-process run fills the compile caches, and
    DDP with ``train.ddp_split_graphs=false`` then finds every graph there, on both ranks: its graphs are the
    one-process graphs. (On CUDA rank r's keys hold cuda:r, so there only rank 0 would find them.)"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",  # the C++ kernels' keys hold threads
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # fmt: skip
    bench = [str(ROOT / "bench" / "trainer_step.py"), "--tiny", "--variants", "preset_compiled", "--iters", "1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    runs = {"one": [sys.executable, *bench], "ddp": [*launch, *bench, "--set", "train.ddp_split_graphs=false"]}
    rows = {}
    for name, cmd in runs.items():
        proc = subprocess.run([*cmd, "--out", str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True,
                              timeout=1200, env=env)  # fmt: skip
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        rows[name] = json.loads((tmp_path / name / "trainer_step.json").read_text())["rows"][0]
        assert "error" not in rows[name], rows[name]["error"]
    cold = rows["one"]["compile_cache"]
    assert cold.get("fxgraph_cache_miss", 0) > 0 and not cold.get("fxgraph_cache_hit"), cold
    assert len(rows["ddp"]["compile_cache_per_rank"]) == 2
    for rank in rows["ddp"]["compile_cache_per_rank"]:
        assert rank.get("fxgraph_cache_hit") == cold["fxgraph_cache_miss"] and not rank.get("fxgraph_cache_miss")
        assert rank.get("autograd_cache_hit", 0) > 0 and not rank.get("autograd_cache_miss"), rank
    assert "rank 1: autograd_cache_hit" in (tmp_path / "ddp" / "trainer_step.md").read_text()


def test_trainer_step_under_accelerate_launch_counts_every_process(tmp_path):
    """The trainer bench on two gloo processes (DDP): samples/s over both batches, a peak per rank, no FLOP count;
    DDP options from --set, recorded in the report (fp16: this CPU build of torch refuses the bf16 hook)."""
    sets = ["--set", "train.ddp_comm_hook=fp16", "--set", "train.ddp_static_graph=true"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "bench" / "trainer_step.py"), "--tiny", "--variants", "preset", "--iters", "1", "--profile",
           "--out", str(tmp_path), *sets]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((tmp_path / "trainer_step.json").read_text())
    row = report["rows"][0]
    assert "error" not in row, row.get("error")
    assert row["world_size"] == 2 and row["distributed_type"] == "MULTI_CPU"
    assert report["set"] == row["set"] == ["train.ddp_comm_hook=fp16", "train.ddp_static_graph=true"]
    assert "--set train.ddp_comm_hook=fp16" in report["command"]
    assert row["train"]["ddp_comm_hook"] == "fp16" and row["train"]["ddp_static_graph"] is True
    md = (tmp_path / "trainer_step.md").read_text()
    assert "train.ddp_comm_hook=fp16" in md
    header, _, line = [x for x in md.splitlines() if x.startswith("|")][:3]
    assert line.count("|") == header.count("|") and line.endswith("|"), "per-rank peaks must stay inside the cells"
    assert "(ranks: " in line
    assert len(row["peak_gb_per_rank"]) == 2 and "generator_tflop" not in row
    assert row["compile_cache_per_rank"] == [{}, {}]  # one entry per rank; eager, so no compile-cache traffic
    assert "Compile caches" not in md
    assert set(row["profile"]) == {"generator update", "critic update"}  # every rank ran the profiled updates
    assert row["samples_per_s_generator"] == pytest.approx(2 * 4 / (row["cycle_ms"] * 1e-3))

    # trainer_scaling.py pairs this DDP report with a one-process run of the same preset, batch and variant
    run_bench("trainer_step.py", "--variants", "preset", "--iters", "1", "--out", str(tmp_path / "one"))
    one = json.loads((tmp_path / "one" / "trainer_step.json").read_text())["rows"][0]
    ddp_json, one_json = str(tmp_path / "trainer_step.json"), str(tmp_path / "one" / "trainer_step.json")
    scaling = [sys.executable, str(ROOT / "bench" / "trainer_scaling.py"), "--out", str(tmp_path / "scaling"),
               "--pair", "b4 gloo", ddp_json, one_json]  # fmt: skip
    proc = subprocess.run(scaling, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (pair,) = json.loads((tmp_path / "scaling" / "trainer_scaling.json").read_text())["rows"]
    assert pair["speedup"] == pytest.approx(row["samples_per_s_generator"] / one["samples_per_s_generator"])
    assert pair["ddp_options"] == report["set"] and pair["processes"] == 2
    assert f"**{pair['speedup']:.2f}x**" in (tmp_path / "scaling" / "trainer_scaling.md").read_text()
    one["batch"] = 8  # another batch per GPU: refused, naming it
    (tmp_path / "one8.json").write_text(json.dumps({"env": report["env"], "rows": [one]}))
    scaling[-1] = str(tmp_path / "one8.json")
    proc = subprocess.run(scaling, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "does not compare like with like: batch 4 and 8" in proc.stderr


def test_profile_counts_inductor_kernels_named_after_a_conv_as_triton():
    """inductor names a conv's fused epilogue "triton_..._convolution_...": it is Triton work, not a cuDNN conv."""
    sys.path.insert(0, str(ROOT / "bench"))
    from common import kernel_kind

    assert kernel_kind("triton_per_fused_clone_convolution_native_group_norm_silu_194").startswith("Triton fused")
    assert kernel_kind("triton_tem_fused_convolution_3").startswith("Triton template")
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv (cuDNN)"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kernel_kind("nvjet_sm90_tst_64x64_64x13_4x2_h_bz_TNT") == "GEMM (cuBLAS)"


def test_timeline_summary_separates_exposed_communication_from_overlapped():
    """Kernels of one update on two streams: the NCCL time a compute kernel overlaps is hidden, the rest exposed."""
    sys.path.insert(0, str(ROOT / "bench"))
    from common import covered, merge_intervals, overlap, timeline_summary

    assert merge_intervals([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert covered([(0, 2), (1, 3), (10, 11)]) == 4
    assert overlap([(0, 10)], [(2, 3), (5, 7), (9, 12)]) == 1 + 2 + 1
    kernels = [  # (name, start us, end us)
        ("triton_poi_fused_add_0", 0, 1000),  # compute
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 600, 1600),  # 400 us under the kernel above...
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 1000, 1200),  # ...200 us under this GEMM: 400 us exposed
        ("Memcpy DtoD (Device -> Device)", 2000, 2500),  # after a 400 us gap with nothing running
    ]
    s = timeline_summary(kernels)
    assert s["kernels"] == 4
    assert s["wall_ms"] == pytest.approx(2.5) and s["busy_ms"] == pytest.approx(2.1)
    assert s["idle_ms"] == pytest.approx(0.4)
    assert s["comm_ms"] == pytest.approx(1.0) and s["comm_exposed_ms"] == pytest.approx(0.4)
    assert s["compute_ms"] == pytest.approx(1.2 + 0.5)
    assert s["by_kind_ms"]["NCCL (communication)"] == pytest.approx(1.0)
    assert s["by_kind_ms"]["copy / fill"] == pytest.approx(0.5)
    assert s["top"][0]["name"].startswith("triton_poi") and s["top"][0]["kind"].startswith("Triton fused")
    two = timeline_summary(kernels + [(n, a + 3000, b + 3000) for n, a, b in kernels], calls=2)
    assert two["kernels"] == 4 and two["comm_exposed_ms"] == pytest.approx(0.4)  # per call
    assert timeline_summary([]) == {"kernels": 0}


def test_device_kernels_leave_out_the_annotations_the_profiler_mirrors_onto_the_gpu():
    """record_function ranges (DDP's forward, the optimiser step, NCCL's op) come back as CUDA events spanning the
    kernels inside them: counted as kernels they doubled those kernels' time and made the gaps between them busy (the
    first two-GPU profiles, 2026-11-26). Only kernels, copies and fills remain; CPU events and empty spans go too."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "bench"))
    from common import device_kernels, timeline_summary

    def event(name, start, end, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))  # fmt: skip

    events = [
        event("DistributedDataParallel.forward", 0, 3000, annotation=True),  # spans the forward's kernels and gaps
        event("triton_poi_fused_add_0", 0, 1000),
        event("sm90_xmma_gemm_bf16bf16_bf16f32", 2000, 3000),
        event("nccl:all_reduce", 3000, 3500, annotation=True),
        event("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 3000, 3500),
        event("aten::mm", 0, 900, device=DeviceType.CPU),  # the CPU side of the same run
        event("Memset (Device)", 3600, 3600),  # no duration
    ]
    kernels = device_kernels(events)
    assert [k[0] for k in kernels] == ["triton_poi_fused_add_0", "sm90_xmma_gemm_bf16bf16_bf16f32",
                                       "ncclDevKernel_AllReduce_Sum_f32_RING_LL"]  # fmt: skip
    s = timeline_summary(kernels)
    assert s["busy_ms"] == pytest.approx(2.5) and s["idle_ms"] == pytest.approx(1.0)  # the 1 ms gap stays idle
    assert s["by_kind_ms"]["NCCL (communication)"] == pytest.approx(0.5)  # once, not twice
    assert s["comm_exposed_ms"] == pytest.approx(0.5)


def test_infer_bench_restore_gives_every_variant_the_stock_modules():
    """A variant's in-place module swaps must not leak into the next variant's runner (the bench shares modules)."""
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_fast_path import tiny_models

    from crossdistill.export.fast import FastPathOptions, OneStepRunner
    from infer_one_step import restore

    unet, vae = tiny_models()
    stock = {n: type(m) for n, m in (*unet.named_modules(), *vae.named_modules())}
    processors = {type(p) for p in (*unet.attn_processors.values(), *vae.attn_processors.values())}
    options = FastPathOptions(dtype="float32", channels_last=False, compile=None, cuda_graphs=False,
                              subpixel_upsample=True, pad_narrow_convs=True)  # fmt: skip
    OneStepRunner(unet, vae, options=options)
    assert {n: type(m) for n, m in (*unet.named_modules(), *vae.named_modules())} != stock
    assert {type(p) for p in (*unet.attn_processors.values(), *vae.attn_processors.values())} != processors
    import torch

    torch.backends.cudnn.benchmark_limit = 3  # as a runner on CUDA sets it
    restore(unet, vae)
    assert {n: type(m) for n, m in (*unet.named_modules(), *vae.named_modules())} == stock
    assert {type(p) for p in (*unet.attn_processors.values(), *vae.attn_processors.values())} == processors
    assert torch.backends.cudnn.benchmark_limit != 3
    assert not any(name.startswith("_padded") for name, _ in (*unet.named_buffers(), *vae.named_buffers()))


def test_infer_bench_eager_baseline_switches_off_every_option_that_changes_what_runs():
    """New fast-path options default on: the baseline must name each one, or plain diffusers stops being plain."""
    from dataclasses import fields

    sys.path.insert(0, str(ROOT / "bench"))
    from crossdistill.export.fast import FastPathOptions
    from infer_one_step import EAGER

    options = FastPathOptions(**EAGER)
    kept = {"dtype", "cudnn_benchmark", "inductor_tuning", "inductor_config", "decode_inductor_config"}
    changed = {f.name: getattr(options, f.name) for f in fields(options) if f.name not in kept}
    assert changed["compile"] is None and changed["cudnn_benchmark_limit"] is None
    assert not any(v for k, v in changed.items() if k not in ("compile", "cudnn_benchmark_limit")), changed
    assert not options.inductor_tuning and not options.inductor_config and not options.decode_inductor_config
