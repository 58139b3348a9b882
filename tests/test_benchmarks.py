"""The benchmark scripts run end to end at their tiniest settings (smoke tests: nothing here is timed)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cogvideox.config import TransformerConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_MODULES = [
    *[
        "--widths",
        "tiny",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--layers",
        "1",
        "--frames",
        "2",
        "--latent-height",
        "4",
        "--latent-width",
        "6",
        "--text-len",
        "8",
        "--vae-frames",
        "3",
        "--vae-height",
        "4",
        "--vae-width",
        "6",
    ]
]


def run_module(module: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_bench_modules_checks_outputs_and_prints_ratios(tmp_path):
    proc = run_module("benchmarks.bench_modules", *TINY_MODULES, "--out", tmp_path / "modules.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio transformer: ours/diffusers = " in proc.stdout
    assert "ratio vae_decode: ours/diffusers = " in proc.stdout
    assert "| transformer | B=2, layers=1, 20 tokens |" in proc.stdout
    results = json.loads((tmp_path / "modules.json").read_text())["results"]
    for name in ("transformer", "vae_decode"):
        assert results[name]["max_abs_diff"] <= 1e-4
        assert results[name]["ratio"] > 0


def test_bench_modules_fails_loudly_when_outputs_differ():
    # No tolerance can be met by a non-negative difference: the gate must turn that into a failing exit.
    proc = run_module("benchmarks.bench_modules", *TINY_MODULES, "--only", "transformer", "--tolerance", "-1")
    assert proc.returncode == 1
    assert "OUTPUTS DIFFER: transformer" in proc.stderr


def test_bench_pipeline_cpu_path_runs_end_to_end(tmp_path):
    proc = run_module(
        *[
            "benchmarks.bench_pipeline",
            "--device",
            "cpu",
            "--size",
            "tiny",
            "--frames",
            "9",
            "--height",
            "64",
            "--width",
            "96",
            "--steps",
            "2",
            "--modes",
            "resident,model",
            "--peak-tflops",
            "1",
            "--threads",
            "1",
            "--ckpt",
        ],
        tmp_path / "ckpt",
        "--out",
        tmp_path / "pipeline.json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio resident: ours/diffusers s/step " in proc.stdout
    assert "attention kernel ours resident: FLASH_ATTENTION" in proc.stdout
    assert "| diffusers | model | skipped: diffusers offloads to an accelerator only |" in proc.stdout
    data = json.loads((tmp_path / "pipeline.json").read_text())
    runs = {(r["impl"], r["mode"]): r for r in data["runs"]}
    assert set(runs) == {(i, m) for i in ("ours", "diffusers") for m in ("resident", "model")}
    for key in [("ours", "resident"), ("ours", "model"), ("diffusers", "resident")]:
        run = runs[key]
        assert run["skipped"] is None
        assert len(run["step_times"]) == 2
        assert run["max_pixel_diff"] <= 2  # same video as diffusers, whatever the memory mode
        assert set(run["peak_gib"]) == {"text", "denoise", "decode"}
        assert 0 < run["flop_fraction"] < 1
    assert (tmp_path / "ckpt" / "benchmark_checkpoint.json").is_file()  # kept for reuse


def test_flop_count_is_the_issues_figure():
    from benchmarks.bench_pipeline import transformer_flops

    flops, tokens = transformer_flops(TransformerConfig(), 49, 480, 720, batch=2)
    assert tokens == 17_776
    assert flops == pytest.approx(2.4e14, rel=0.01)


def test_bench_memory_predicts_every_stage_and_mode(tmp_path):
    # 48x64 pixels (6x8 latents): 4 default tiles and 24 half tiles, as many rules as at 64x96 (9 and 48 tiles),
    # which traced each tile op by op for most of this test's time.
    size = ["--size", "tiny", "--frames", "5", "--height", "48", "--width", "64"]
    proc = run_module("benchmarks.bench_memory", *size, "--out", tmp_path / "memory.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PREDICTION (meta tensors on the CPU, no GPU ran), " in proc.stdout
    assert "Allowance for what tensors do not show: 1.5 GiB" in proc.stdout
    decodes = ("untiled", "tiled", "tiled half")
    for stage in ("text", "denoise", *(f"decode {d}" for d in decodes)):
        assert f"| {stage} | " in proc.stdout
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["prediction"] is True
    stages = data["stages_gib"]
    assert set(stages["ours"]) == {"text", "denoise", *(f"decode {d}" for d in decodes)}
    assert set(stages["diffusers"]) == {"text", "denoise", "decode untiled", "decode tiled"}
    assert all(s["peak"] > 0 for impl in stages.values() for s in impl.values())
    assert all(w["all"] > 0 for impl in data["weights_gib"].values() for w in impl.values())
    rows = {(r["impl"], r["mode"], r["decode"]): r for r in data["modes"]}
    assert set(rows) == {("ours", m, d) for m in ("resident", "model", "sequential") for d in decodes} | {
        ("diffusers", m, d) for m in ("resident", "model") for d in decodes[:2]
    }
    for d in decodes:
        peak = {m: rows[("ours", m, d)]["peak"] for m in ("resident", "model", "sequential")}
        assert 0 < peak["sequential"] <= peak["model"] <= peak["resident"]
        # Streaming blocks shrinks the transformer's stage (the VAE moves whole in both offload modes).
        assert rows[("ours", "sequential", d)]["denoise"] < rows[("ours", "model", d)]["denoise"]
        assert rows[("ours", "resident", d)]["peak_with_allowance"] == pytest.approx(peak["resident"] + 1.5)
    work = data["step_work"]
    # The same matmuls (ours also runs the patch embedding as one, diffusers as a convolution).
    assert work["ours"]["gemm_tflop"] == pytest.approx(work["diffusers"]["gemm_tflop"], rel=0.01)
    assert work["ours"]["attention_tflop"] == pytest.approx(work["diffusers"]["attention_tflop"])
    assert (
        0 < work["ours"]["other_gb"] < work["diffusers"]["other_gb"]
    )  # fused QKV, in-place adaLN and residuals
    # Tiling exists to bound the decode's working memory.
    assert stages["ours"]["decode tiled"]["peak"] < stages["ours"]["decode untiled"]["peak"]


GPU_CHECK_SECTIONS = {"decode_oom", "offload", "attention", "pinned", "quantize", "compile", "v15"}


def test_gpu_check_runs_every_section_at_toy_sizes_on_the_cpu(tmp_path):
    out = tmp_path / "check" / "gpu_check.json"
    proc = run_module(
        *[
            "benchmarks.gpu_check",
            "--device",
            "cpu",
            "--tiny",
            "--threads",
            "1",
            "--steps",
            "2",
            "--compile-shapes",
            "3",
            "--out",
        ],
        out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    sections = data["sections"]
    assert set(sections) == GPU_CHECK_SECTIONS
    # CogVideoX 1.5's section runs the released weights only, never downloaded here (tests/test_benchmarks15.py)
    assert sections.pop("v15")["status"] == "skipped"
    assert all(s["status"] == "ok" and s["verdict"] for s in sections.values()), sections
    assert "commit" in data["git"] and data["source_digest"] and data["device"]["type"] == "cpu"
    assert data["next_step"].endswith(
        "-m benchmarks.bench_pipeline --device cuda --modes resident "
        "--ckpt /tmp/cogvideox-2b-random --out cuda-resident.json"
    )
    # What needs CUDA says so instead of a number.
    decode, offload, pinned = sections["decode_oom"], sections["offload"], sections["pinned"]
    assert decode["memory_limit"].startswith("skipped: needs CUDA")
    assert offload["peak_memory"].startswith("skipped: needs CUDA") and "peak_vs_prediction" not in offload
    assert pinned["comparison"].startswith("skipped: needs CUDA") and "pinned_over_weights" not in pinned
    # The real code paths ran: the pipeline's decode, the sequential offloader, the picker, compiled blocks.
    assert decode["attempts"][0]["kwargs"] == {"tiled": False} and decode["latents_unchanged"]
    assert decode["frames_shape"] == decode["expected_frames_shape"] == [9, 64, 96, 3]
    assert offload["max_abs_diff"] == 0 and len(offload["sequential"]["step_times"]) == 2
    assert len(sections["attention"]["picks"]) == 3
    compiled = sections["compile"]
    assert compiled["backend"] == "eager" and [len(r["shape"]) for r in compiled["shapes"]] == [4] * 4
    assert compiled["verdict"] == "pass" and compiled["unique_graphs"] >= 1
    assert compiled["attention_kernel"] == "FLASH_ATTENTION"  # the pipeline's pick on a CPU, for every size
    assert set(compiled["attention_kernels"].values()) == {"FLASH_ATTENTION"}
    assert pinned["weight_bytes"] > 0 and pinned["generation"]["frames_shape"] == [1, 64, 96, 3]
    quantized = sections["quantize"]["modes"]  # 16-bit vs int8 vs fp8 (issue 25); no fp8 matmul on a CPU
    eight = ("int8", "fp8") if importlib.util.find_spec("torchao") else ("fp8",)  # int8 needs torchao
    assert [quantized[m]["weights_ratio"] < 0.55 for m in eight] == [True] * len(eight), quantized
    assert quantized["fp8"]["psnr_db"] > 30 and not quantized["fp8"]["fp8_matmul"]
    md = out.with_suffix(".md").read_text()
    assert "| section | status | verdict | seconds | result |" in md
    for header in (
        "attempt kwargs",
        "s/step (median)",
        "max abs diff vs efficient",
        "unique graphs",
        "state-dict bytes",
    ):
        assert f"| {header} |" in md
    assert md in proc.stdout  # the summary is printed too


def test_gpu_check_skips_what_the_budget_leaves_no_time_for(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_module("benchmarks.gpu_check", "--device", "cpu", "--budget-s", "0", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert set(sections) == GPU_CHECK_SECTIONS
    assert all(s["status"] == "skipped" and "budget" in s["reason"] for s in sections.values())


def test_gpu_check_records_a_failing_or_hung_section_and_runs_the_next(tmp_path, monkeypatch):
    import time

    import torch

    from benchmarks import gpu_check

    run = gpu_check.Run(gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path / "g.json")]))
    monkeypatch.setitem(gpu_check.SECTION_CAPS, "offload", 1)  # seconds

    def out_of_memory(run):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    run.section("decode_oom", out_of_memory)
    run.section("offload", lambda run: time.sleep(30))
    run.section("attention", lambda run: {"verdict": "pass", "summary": "ran"})
    sections = json.loads((tmp_path / "g.json").read_text())["sections"]
    assert sections["decode_oom"]["status"] == "error"
    assert sections["decode_oom"]["error"] == "OutOfMemoryError"
    assert "simulated" in sections["decode_oom"]["traceback"]
    assert sections["offload"]["error"] == "SectionTimeout" and sections["offload"]["seconds"] < 5
    assert sections["attention"]["status"] == "ok"
    assert "| decode_oom | error | n/a |" in (tmp_path / "g.md").read_text()


def test_gpu_check_compiles_and_runs_under_the_pipelines_kernel_pick(tmp_path, monkeypatch):
    # A pick no CPU kernel serves (cuDNN): the compiled blocks, traced and run under the pipeline's pick, fail with
    # it; run beside the pick (the pipeline's default kernel choice), they would pass.
    from torch.nn.attention import SDPBackend

    from benchmarks import gpu_check, gpu_sections
    from cogvideox import pipeline

    picks = []
    monkeypatch.setattr(
        pipeline, "fastest_sdpa_backend", lambda *a: picks.append(a) or SDPBackend.CUDNN_ATTENTION
    )
    argv = ["--device", "cpu", "--compile-shapes", "2", "--out", str(tmp_path / "g.json")]
    run = gpu_check.Run(gpu_check.parse_args(argv))
    try:
        out = gpu_sections.check_compile(run)
    finally:
        run.cleanup()
    assert (
        len(picks) == 1 and out["attention_kernel"] == "CUDNN_ATTENTION"
    )  # picked once: the first pick stands
    refused = "_scaled_dot_product_cudnn_attention"  # the picked kernel's op, called by name: none on a CPU
    assert refused in out["eager_error"]
    assert [len(r["shape"]) for r in out["shapes"]] == [4] * 3
    assert all(refused in r["error_detail"] for r in out["shapes"]), out["shapes"]
    assert out["verdict"] == "fail"


def test_gpu_check_reads_whatever_the_kernel_picker_returns():
    from benchmarks.gpu_check import call_picker

    def plain(shape, dtype, device):
        return "FLASH"

    def pair(shape, dtype, device):
        return "CUDNN", {"CUDNN": 1.0}

    def filling(shape, dtype, device, timings=None):
        timings["EFFICIENT"] = 2.0
        return "EFFICIENT"

    assert call_picker(plain, (1,), None, None) == ("FLASH", None)
    assert call_picker(pair, (1,), None, None) == ("CUDNN", {"CUDNN": 1.0})
    assert call_picker(filling, (1,), None, None) == ("EFFICIENT", {"EFFICIENT": 2.0})


# -- bench_parallel's driver (no process launched: `launch` is recorded) ------------------------------------------


def fake_launch(calls, out_file=None):
    """bench_parallel.launch, recorded: the layout's world size, and what --out held when it started; 2-process
    layouts crash as a rank on a missing GPU does."""
    import numpy as np

    def launch(world, jobs, out, threads=1, device="cpu"):
        calls.append(
            {"world": world, "device": device, "saved": out_file.read_text() if out_file.exists() else None}
        )
        if world > 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
        np.save(Path(out) / f"{jobs[0]['name']}.npy", np.zeros((1, 2, 2, 3), np.uint8))
        return {jobs[0]["name"]: [{"step_s": [0.5], "bytes_per_step": 0}]}

    return launch


def test_bench_parallel_on_one_gpu_runs_the_layouts_it_holds_and_refuses_the_rest(
    tmp_path, monkeypatch, capsys
):
    import torch

    from benchmarks import bench_parallel

    calls, out = [], tmp_path / "parallel.json"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(bench_parallel, "launch", fake_launch(calls, out))
    ckpt = ["--size", "tiny", "--steps", "1", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]
    assert bench_parallel.main(["--device", "cuda", *ckpt]) == 0  # the documented command, default layouts
    assert [c["world"] for c in calls] == [1] and calls[0]["device"] == "cuda"
    assert "layouts 2x1, 1x2, 2x2 need more and are not run" in capsys.readouterr().err
    assert [r["layout"] for r in json.loads(out.read_text())["measured"]] == ["1x1"]
    # Asked for by name, a layout needing more GPUs than there are is an error before any process starts.
    calls.clear()
    assert bench_parallel.main(["--device", "cuda", "--layouts", "1x1,2x1", *ckpt]) == 2
    assert (
        capsys.readouterr().err == "error: --layouts 2x1 needs 2 GPUs; this machine has 1\n" and calls == []
    )
    with pytest.raises(SystemExit):
        bench_parallel.parse_args(["--layouts", "2by1"])


def test_bench_parallel_writes_each_layout_as_it_completes(tmp_path, monkeypatch):
    from benchmarks import bench_parallel

    calls, out = [], tmp_path / "parallel.json"
    monkeypatch.setattr(bench_parallel, "launch", fake_launch(calls, out))
    argv = [
        *["--size", "tiny", "--steps", "1", "--layouts", "1x1,2x1", "--ckpt"],
        str(tmp_path / "ckpt"),
        "--out",
        out,
    ]
    assert bench_parallel.main(list(map(str, argv))) == 1  # a layout crashed
    assert calls[0]["saved"] is None and [r["layout"] for r in json.loads(calls[1]["saved"])["measured"]] == [
        "1x1"
    ]
    measured = json.loads(out.read_text())["measured"]
    assert measured[0]["layout"] == "1x1" and measured[0]["step_s"] == [0.5]
    assert measured[1] == {
        "layout": "2x1",
        "error": "RuntimeError: CUDA error: invalid device ordinal",
        "crashed": True,
    }


def test_bench_parallel_forward_check_feeds_the_model_its_device_and_dtype(tiny_2b, tmp_path):
    import torch

    from benchmarks.bench_parallel import forward_check
    from cogvideox import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(
        tiny_2b, device="cpu", dtype=torch.bfloat16
    )  # CUDA's FP16 stand-in
    pipe.load()
    seen, model = [], pipe.transformer

    def transformer(*inputs):
        seen.append([(x.device.type, x.dtype) for x in inputs[:2]])
        return model(*inputs)

    pipe.transformer = transformer
    layout = type("One", (), {"split_cfg": staticmethod(lambda f: f), "shard": staticmethod(lambda f: f)})
    call = dict(num_frames=9, height=64, width=96)
    record = forward_check(pipe, layout, call, tmp_path / "unused.npy")
    assert seen == [[("cpu", torch.bfloat16)] * 2] * 2
    assert record["max_abs_diff"] == 0 and record["max_abs"] > 0
