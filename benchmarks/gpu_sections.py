"""The GPU check's sections, one function each (`CHECKS`), run by `gpu_check.py` on a random-weight model: what
each measures is in that file's docstring. A section takes the `Run` (device, dtype, arguments, log, temporary
folder: `gpu_helpers.SectionRun`) and returns its record, with a `verdict` and a one-line `summary`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import statistics
import time
from itertools import pairwise
from pathlib import Path

import torch

from benchmarks.common import GiB, sync
from benchmarks.gpu_helpers import (
    SectionRun,
    SectionTimeout,
    allocated,
    error_record,
    free_memory,
    gib,
    is_cuda,
    jsonable,
    needs_cuda,
    patched,
    peak_bytes,
    reset_peak,
    short_error,
    state_dict_bytes,
    tensor_bytes,
    timed_calls,
)

TEXT_LEN = 226


# -- (a) decode out of memory, then the tiled retry ---------------------------------------------------------


def check_decode_oom(run: SectionRun) -> dict:
    from cogvideox import CogVideoXPipeline, offload
    from cogvideox.config import VAEConfig
    from cogvideox.vae import CogVideoXVAE

    dev, cuda = run.device, is_cuda(run.device)
    pipe = CogVideoXPipeline.from_pretrained(
        run.scaffold(), device=dev, dtype=run.dtype, memory_mode="resident"
    )
    if not run.args.tiny:
        pipe.vae_config = VAEConfig()  # the released 2B VAE (the scaffold's config is the tiny one)
    with torch.device(dev):
        pipe.vae = CogVideoXVAE(pipe.vae_config).to(run.dtype).eval()
    frames, height, width = (9, 64, 96) if run.args.tiny else (49, 480, 720)
    s, c = pipe.vae_config.spatial_compression, pipe.vae_config.latent_channels
    # (b f c h w), as the sampler hands them over; the pipeline passes (b c f h w) to the VAE.
    shape = (1, (frames - 1) // 4 + 1, c, height // s, width // s)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0)).to(dev, run.dtype)
    before = latents.clone()
    out = {"latent_shape": shape, "weights_gib": gib(tensor_bytes(pipe.vae))}
    out["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    attempts, recording_decode = recorded(pipe.vae.decode, dev)
    if cuda:
        free_memory(dev)
        total = torch.cuda.get_device_properties(dev).total_memory
        limit = torch.cuda.memory_reserved(dev) + int(run.args.headroom_gib * GiB)
        out.update(memory_limit_gib=limit / GiB, memory_fraction=limit / total, total_gib=total / GiB)
        torch.cuda.set_per_process_memory_fraction(limit / total, dev)
    else:
        out["memory_limit"] = needs_cuda("set_per_process_memory_fraction")
    run.log(f"decode_oom: decoding latents {list(shape)} (b f c h w)")
    t = time.perf_counter()
    try:  # free memory reported huge, so the offloader really tries the untiled decode first
        with (
            patched(offload, "free_device_memory", lambda device: 1 << 50),
            patched(pipe.vae, "decode", recording_decode),
            torch.inference_mode(),
        ):
            out["frames_shape"] = list(pipe.decode(latents).shape)
    except Exception as e:
        out["decode_error"] = error_record(e)
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
    out["decode_s"] = time.perf_counter() - t
    out["attempts"] = attempts
    logged = getattr(pipe.offloader, "decode_attempts", None)
    out["offloader_decode_attempts"] = "absent (Offloader.decode_attempts)" if logged is None else logged
    out["expected_frames_shape"] = [frames, height, width, 3]
    out["latents_unchanged"] = bool(torch.equal(latents, before))
    out["error_classes"] = sorted({a["error_class"] for a in attempts if a["error"]})
    out["verdict"] = decode_verdict(out, attempts) if cuda else "n/a (no out-of-memory forced on a CPU)"
    out["summary"] = (
        f"attempts {[a['kwargs'] for a in attempts]}, errors {out['error_classes'] or 'none'}, "
        f"frames {out.get('frames_shape')}, latents unchanged {out['latents_unchanged']}"
    )
    return out


def recorded(decode, dev) -> tuple[list[dict], object]:
    """A VAE decode that records each attempt (its kwargs, error, seconds, peak memory), and the records."""
    from cogvideox import offload

    is_oom = getattr(offload, "is_out_of_memory", lambda e: isinstance(e, torch.OutOfMemoryError))
    attempts = []

    def recording_decode(z, **kwargs):
        record = {"kwargs": dict(kwargs), "error": None}
        attempts.append(record)
        reset_peak(dev)
        t = time.perf_counter()
        try:
            video = decode(z, **kwargs)
            sync(dev)
            return video
        except Exception as e:  # strings only: the failed attempt's tensors must be freed for the retry
            record.update(error=short_error(e), error_class=type(e).__name__, out_of_memory=is_oom(e))
            raise
        finally:
            record.update(seconds=time.perf_counter() - t, peak_gib=gib(peak_bytes(dev)))

    return attempts, recording_decode


def decode_verdict(out: dict, attempts: list[dict]) -> str:
    """pass: the untiled decode ran out of memory, a tiled retry returned the whole video, the latents intact."""
    first, last = (attempts[0], attempts[-1]) if attempts else ({"kwargs": {}}, {"kwargs": {}})
    untiled_failed = first["kwargs"].get("tiled") is False and bool(first.get("error"))
    tiled_ok = bool(last["kwargs"].get("tiled")) and last.get("error") is None
    shape_ok = out.get("frames_shape") == out["expected_frames_shape"]
    return "pass" if untiled_failed and tiled_ok and shape_ok and out["latents_unchanged"] else "fail"


# -- (b) resident vs sequential -----------------------------------------------------------------------------


def model_config(run: SectionRun, layers: int):
    from cogvideox.config import PRESETS
    from cogvideox.testing import tiny_configs

    base = tiny_configs()[0] if run.args.tiny else PRESETS["2b"]["transformer"]
    return dataclasses.replace(base, num_layers=layers)


def transformer_inputs(cfg, batch: int, latent: tuple[int, int, int], device, dtype):
    """latents (B, F, C, h, w), text embeddings (B, 226, D), timesteps (B,)."""
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(batch, latent[0], cfg.in_channels, latent[1], latent[2], generator=g)
    embeds = torch.randn(batch, TEXT_LEN, cfg.text_embed_dim, generator=g)
    return x.to(device, dtype), embeds.to(device, dtype), torch.full((batch,), 999, device=device)


def check_offload(run: SectionRun) -> dict:
    from cogvideox.offload import Offloader
    from cogvideox.transformer import CogVideoXTransformer

    dev, cuda, steps = run.device, is_cuda(run.device), run.args.steps
    cfg = model_config(run, run.args.layers)
    with torch.device(dev):
        model = CogVideoXTransformer(cfg).to(run.dtype).eval()
    inputs = transformer_inputs(cfg, 2, (3, 8, 12) if run.args.tiny else (13, 60, 90), dev, run.dtype)
    block, weights = tensor_bytes(model.transformer_blocks[0]), tensor_bytes(model)
    non_block = weights - cfg.num_layers * block
    out = {"layers": cfg.num_layers, "latent_shape": inputs[0].shape, "text_len": TEXT_LEN}
    out.update(weights_gib=gib(weights), block_gib=gib(block), non_block_gib=gib(non_block))

    with torch.inference_mode():
        model(*inputs)  # warm-up (kernels, the position-embedding cache)
        base = allocated(dev)
        reset_peak(dev)
        resident_times, y_resident = timed_calls(lambda: model(*inputs), steps, dev)
        resident_peak = peak_bytes(dev)
        run.log(f"offload: resident {statistics.median(resident_times):.4f} s/step; now sequential")
        offloader = Offloader(dev, "sequential")
        offloader.place({"transformer": model})
        free_memory(dev)
        seq_base = allocated(dev)
        reset_peak(dev)
        with offloader.use(model):
            model(*inputs)  # warm-up: block 0 is not prefetched on the first pass
            seq_times, y_seq = timed_calls(lambda: model(*inputs), steps, dev)
        seq_peak = peak_bytes(dev)

    out["max_abs_diff"] = (y_resident.float() - y_seq.float()).abs().max().item()
    out["finite"] = bool(torch.isfinite(y_resident).all())
    out["resident"] = {"step_times": resident_times, "s_per_step": statistics.median(resident_times)}
    out["sequential"] = {"step_times": seq_times, "s_per_step": statistics.median(seq_times)}
    ratio = out["sequential_over_resident"] = out["sequential"]["s_per_step"] / out["resident"]["s_per_step"]
    out["summary"] = (
        f"max abs diff {out['max_abs_diff']:.3g}, s/step resident {out['resident']['s_per_step']:.4f}, "
        f"sequential {out['sequential']['s_per_step']:.4f} ({ratio:.3f}x)"
    )
    if not cuda:
        out["peak_memory"] = needs_cuda("max_memory_allocated")
        out["overlap"] = "n/a on a CPU: no copy stream, the 'device' copies are CPU copies"
        out["verdict"] = "pass" if out["max_abs_diff"] == 0 else "fail"
        return out
    activations = resident_peak - base  # the resident step's peak above what was allocated before it
    predicted = non_block + 3 * block + activations
    out["resident"].update(peak_gib=gib(resident_peak), base_gib=gib(base))
    out["sequential"].update(peak_gib=gib(seq_peak), base_gib=gib(seq_base))
    out.update(activations_gib=gib(activations), predicted_peak_above_base_gib=gib(predicted))
    out["measured_peak_above_base_gib"] = gib(seq_peak - seq_base)
    out["peak_vs_prediction"] = (seq_peak - seq_base) / predicted
    checks = [out["max_abs_diff"] == 0, ratio <= 1.05, 0.9 <= out["peak_vs_prediction"] <= 1.1]
    out["verdict"] = "pass" if all(checks) else "fail"
    out["summary"] += (
        f", sequential peak above inputs {out['measured_peak_above_base_gib']:.3f} GiB, predicted "
        f"{gib(predicted):.3f} (non-block {gib(non_block):.3f} + 3 x block {gib(block):.3f} + activations "
        f"{gib(activations):.3f})"
    )
    return out


# -- (c) the attention kernel pick --------------------------------------------------------------------------


def call_picker(fn, shape, dtype, device) -> tuple[object, object]:
    """(backend, whatever else the picker exposes). Its signature is being reworked: adapt to what is there."""
    params = inspect.signature(fn).parameters
    timing = [n for n, p in params.items() if "tim" in n.lower() and p.default in (None, False)]
    if timing:
        sink = {} if params[timing[0]].default is None else True
        try:
            result = fn(shape, dtype, device, **{timing[0]: sink})
        except TypeError:
            pass
        else:
            return (result, sink) if isinstance(sink, dict) else _split(result)
    return _split(fn(shape, dtype, device))


def _split(result) -> tuple[object, object]:
    if isinstance(result, tuple) and result:
        return result[0], (result[1] if len(result) == 2 else result[1:]) if len(result) > 1 else None
    return result, None


def check_attention(run: SectionRun) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cogvideox import layers

    dev, cuda = run.device, is_cuda(run.device)
    shape = (2, 2, TEXT_LEN + 24, 16) if run.args.tiny else (2, 30, 17_776, 64)
    fn = layers.fastest_sdpa_backend
    out = {"shape": shape, "dtype": str(run.dtype), "signature": str(inspect.signature(fn)), "picks": []}
    for _ in range(3):
        t = time.perf_counter()
        backend, extra = call_picker(fn, shape, run.dtype, dev)
        pick = {"backend": jsonable(backend), "exposed": jsonable(extra), "seconds": time.perf_counter() - t}
        out["picks"].append(pick)
    winners = [p["backend"] for p in out["picks"]]
    out["stable"], winner = len(set(winners)) == 1, winners[-1]
    run.log(f"attention: picks {winners}")

    g = torch.Generator(dev).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device=dev, dtype=run.dtype) for _ in range(3))
    flops = 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3]  # QK^T and PV
    fused = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
    outputs, kernels = {}, []
    for backend in getattr(layers, "SDPA_CANDIDATES", fused):
        name, attend = jsonable(backend), lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
        row = {"backend": name}
        try:
            with sdpa_kernel(backend), torch.inference_mode():
                outputs[name] = attend()
                times, _ = timed_calls(attend, 5, dev)
            row.update(ms=1e3 * statistics.median(times), tflops=flops / statistics.median(times) / 1e12)
        except RuntimeError as e:
            row["error"] = short_error(e)
        kernels.append(row)
    reference = outputs.get("EFFICIENT_ATTENTION")
    for row in kernels:
        if reference is not None and row["backend"] in outputs:
            diff = (outputs[row["backend"]].float() - reference.float()).abs().max().item()
            row["max_abs_diff_vs_efficient"] = diff
    out["kernels"] = kernels
    diff = next((r.get("max_abs_diff_vs_efficient") for r in kernels if r["backend"] == winner), None)
    out["winner"], out["winner_vs_efficient_max_abs_diff"] = winner, diff
    if reference is None:
        out["winner_vs_efficient"] = "the memory-efficient kernel did not run here"
    ok = out["stable"] and winner is not None and (diff is None or diff <= 1e-2)  # 1e-2: fp16 rounding scale
    out["verdict"] = ("pass" if ok else "fail") + ("" if cuda else " (CPU: times not meaningful)")
    out["summary"] = f"picks {winners}, winner vs memory-efficient max abs diff {diff}"
    return out


# -- (d) compiled blocks over many shapes -------------------------------------------------------------------


def compile_shapes(tiny: bool) -> list[tuple[int, int, int, int]]:
    """(batch, latent frames, latent height, latent width), 10 distinct: the largest first (the full 720x480 grid
    except in tiny mode; checked against eager, and run again at the end, where it must not compile again), then
    frames 1..49 in 8N+1 steps with CFG, batch 1, and a middle size."""
    frames = [(n - 1) // 4 + 1 for n in range(1, 50, 8)]  # 1, 3, 5, ..., 13
    largest = (2, 13, 12, 18) if tiny else (2, 13, 60, 90)
    return [largest, *[(2, f, 8, 12) for f in frames], (1, 13, 8, 12), (2, 13, 16, 24)]


def compile_pipeline(run: SectionRun, model, cfg):
    """A pipeline around `model` (the scaffold's scheduler; the released VAE's compression, for the latent sizes):
    its `denoise` picks the attention kernel and runs the transformer under it, as a generation does."""
    from cogvideox import CogVideoXPipeline
    from cogvideox.config import VAEConfig

    pipe = CogVideoXPipeline.from_pretrained(
        run.scaffold(), device=run.device, dtype=run.dtype, memory_mode="resident"
    )
    pipe.transformer, pipe.transformer_config, pipe.vae_config = model, cfg, VAEConfig()
    return pipe


def denoised(pipe, shape: tuple[int, int, int, int], steps: int = 2) -> tuple[list[float], torch.Tensor]:
    """`pipe.denoise` at latent `shape` (batch 2: CFG on; 1: off): seconds per step, and the latents."""
    batch, frames, h, w = shape
    s, dev = pipe.vae_config.spatial_compression, pipe.device
    g = torch.Generator("cpu").manual_seed(0)
    embeds = torch.randn(batch, TEXT_LEN, pipe.transformer_config.text_embed_dim, generator=g).to(
        dev, pipe.dtype
    )
    marks = [time.perf_counter()]

    def step(i: int, total: int) -> None:
        sync(dev)
        marks.append(time.perf_counter())

    with torch.inference_mode():
        latents = pipe.denoise(
            embeds, 0, 4 * (frames - 1) + 1, h * s, w * s, steps, 6.0 if batch == 2 else 1.0, step
        )
    return [b - a for a, b in pairwise(marks)], latents


def check_compile(run: SectionRun) -> dict:
    """Compiled blocks traced and run through the pipeline's `denoise`, so under the attention kernel it picks
    (with compile, the first pick stands for every size: the graphs keep the kernel they were traced under)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from cogvideox.transformer import CogVideoXTransformer

    dev, backend = run.device, run.args.compile_backend
    cfg = model_config(run, run.args.compile_layers)
    with torch.device(dev):
        model = CogVideoXTransformer(cfg).to(run.dtype).eval()
    pipe = compile_pipeline(run, model, cfg)
    shapes = compile_shapes(run.args.tiny)[: run.args.compile_shapes]
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    out = {"layers": cfg.num_layers, "width": cfg.inner_dim, "backend": backend, "recompile_limit": limit}
    torch._dynamo.reset()
    counters.clear()
    eager = None
    try:  # the reference, and the pipeline's kernel pick at the first (largest) shape
        eager = denoised(pipe, shapes[0])[1].float()
    except Exception as e:
        out["eager_error"] = short_error(e)
    pipe.compile = True  # what from_pretrained(compile=True) sets: later sizes keep the first pick
    compile_model(model, backend)
    out["shapes"] = rows = compiled_rows(run, pipe, shapes, eager)
    out["attention_kernels"] = {str(list(k)): jsonable(v) for k, v in pipe.attention_backends.items()}
    out["attention_kernel"] = next(iter(out["attention_kernels"].values()), None)
    out["counters"] = {name: dict(values) for name, values in counters.items() if values}
    failed = [r for r in rows if "error" in r]
    out["distinct_shapes_run"] = len({tuple(r["shape"]) for r in rows if "first_s" in r})
    out["unique_graphs"] = counters["stats"].get("unique_graphs")
    passed = not failed and "eager_error" not in out and out["distinct_shapes_run"] == len(shapes)
    out["verdict"] = "pass" if passed else "fail"
    first_error = f" ({failed[0]['error'][:120]})" if failed else ""
    out["summary"] = (
        f"{backend} under the pipeline's kernel pick {out['attention_kernel']}: {out['distinct_shapes_run']}/"
        f"{len(shapes)} shapes ran, {len(failed)} calls failed{first_error}, unique graphs {out['unique_graphs']}"
    )
    return out


def compile_model(model, backend: str) -> None:
    """`model.compile_blocks()` with the torch.compile backend `backend`."""
    if "backend" in inspect.signature(model.compile_blocks).parameters:
        model.compile_blocks(backend=backend)
    else:  # a compile_blocks() without the parameter: its torch.compile gets the backend
        with patched(torch, "compile", functools.partial(torch.compile, backend=backend)):
            model.compile_blocks()


def compiled_rows(run: SectionRun, pipe, shapes: list[tuple], eager: torch.Tensor | None) -> list[dict]:
    """Each shape, then the first again (it must not compile again): two denoising steps, timed, and the graphs
    compiled so far; the first shape's latents against eager. Stops when a budget is spent or the alarm fires."""
    from torch._dynamo.utils import counters

    rows, t_section = [], time.perf_counter()
    for shape in [*shapes, shapes[0]]:
        row = {"shape": list(shape), "frames": 4 * (shape[1] - 1) + 1}
        rows.append(row)
        if time.perf_counter() - t_section > run.args.compile_budget_s or run.elapsed() > run.args.budget_s:
            row["skipped"] = "section or global budget spent"
            continue
        try:
            times, latents = denoised(pipe, shape)
            row.update(first_s=times[0], later_s=times[1])
            if shape == shapes[0] and eager is not None:
                row["max_abs_diff_vs_eager"] = (latents.float() - eager).abs().max().item()
        except SectionTimeout as e:  # keep the rows so far (the alarm fires once)
            row["error"] = short_error(e)
            break
        except Exception as e:  # dynamo's errors name the failing op and its own error past the first line
            row.update(error=short_error(e), error_detail=" ".join(str(e).split())[:600])
        row["unique_graphs"] = counters["stats"].get("unique_graphs")
        status = row.get("error") or "first {first_s:.2f} s, later {later_s:.3f} s".format(**row)
        run.log(f"compile {row['shape']}: {status}, unique graphs {row['unique_graphs']}")
    return rows


# -- (e) page-locked bytes vs weight bytes, then one short sequential generation ----------------------------


def host_memory() -> dict:
    """PyTorch's pinned-allocator bytes (pin_memory(); not cudaHostRegister) and the kernel's VmLck/VmPin/VmRSS."""
    stats = {}
    try:
        raw = torch.cuda.host_memory_stats() if torch.cuda.is_available() else {}
        stats = {k: v for k, v in raw.items() if "bytes" in k and k.endswith((".current", ".peak"))}
    except (AttributeError, RuntimeError):
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmLck:", "VmPin:", "VmRSS:")):
                stats[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return stats


def check_pinned(run: SectionRun) -> dict:
    from benchmarks.random_checkpoint import write_random_checkpoint
    from cogvideox import CogVideoXPipeline

    dev, cuda = run.device, is_cuda(run.device)
    path = Path(run.args.ckpt) if run.args.ckpt else run.tmp / "ckpt"
    t = time.perf_counter()
    write_random_checkpoint(path, "tiny" if run.args.tiny else "full", small_t5=True, device=dev)
    out = {"checkpoint": str(path), "checkpoint_s": time.perf_counter() - t}
    run.log(f"pinned: checkpoint ready in {out['checkpoint_s']:.1f} s")
    pipe = CogVideoXPipeline.from_pretrained(path, device=dev, dtype=run.dtype, memory_mode="sequential")
    weights, place = {}, pipe.offloader.place

    # The weights as loaded (T5's `wo` in FP32), before they move home
    def recording_place(modules, **kwargs):
        for name, module in modules.items():
            weights[name] = {
                "state_dict": state_dict_bytes(module),
                "params_and_buffers": tensor_bytes(module),
            }
        return place(modules, **kwargs)

    before, t = host_memory(), time.perf_counter()
    with patched(pipe.offloader, "place", recording_place):
        pipe.load()
    out["load_s"], after = time.perf_counter() - t, host_memory()
    run.log(f"pinned: sequential pipeline loaded in {out['load_s']:.1f} s")
    out["weights"], out["weight_bytes"] = weights, sum(w["state_dict"] for w in weights.values())
    out["params_and_buffers_bytes"] = sum(w["params_and_buffers"] for w in weights.values())
    pinned = getattr(pipe.offloader, "pinned_bytes", None)
    pinned = pinned() if callable(pinned) else pinned
    out["pinned_bytes"] = "absent (Offloader.pinned_bytes)" if pinned is None else pinned
    out["home_bytes"] = getattr(pipe.offloader, "home_bytes", None)  # the host copies, pinned or not
    out["host_memory_before"], out["host_memory_after"] = before, after
    out["host_memory_delta"] = {k: after[k] - before.get(k, 0) for k in after}
    allocator = out["host_memory_delta"].get("allocated_bytes.current")
    if cuda:
        measured = pinned if isinstance(pinned, int) else allocator or 0
        out["pinned_over_weights"] = measured / out["weight_bytes"]
        out["pinned_allocator_over_weights"] = allocator / out["weight_bytes"] if allocator else None
        out["verdict"] = "pass" if 0.99 <= out["pinned_over_weights"] <= 1.05 else "fail"
    else:
        out["comparison"] = needs_cuda("page-locked memory")
        out["verdict"] = "n/a (CPU)"
    try:  # the same pipeline end to end: T5 and transformer streamed, the VAE moved whole, a tiled decode
        out["generation"] = sequential_generation(run, pipe)
    except Exception as e:
        out["generation"] = error_record(e)
    gen = out["generation"].get("summary") or out["generation"].get("error")
    out["summary"] = (
        f"weights {out['weight_bytes'] / GiB:.3f} GiB, pinned_bytes {jsonable(pinned)}, PyTorch pinned "
        f"allocator {allocator}; generation {gen}"
    )
    return out


def sequential_generation(run: SectionRun, pipe) -> dict:
    dev = run.device
    frames, height, width, steps = (1, 64, 96, 1) if run.args.tiny else (49, 480, 720, 2)
    free_memory(dev)
    reset_peak(dev)
    result = pipe(
        "a toy ship", num_frames=frames, height=height, width=width, num_inference_steps=steps, seed=0
    )
    sync(dev)
    gen = {"frames": frames, "height": height, "width": width, "steps": steps, "timings": result.timings}
    gen.update(frames_shape=result.frames.shape, peak_gib=gib(peak_bytes(dev)))
    gen["attention"] = list(pipe.attention_backends.values())
    if is_cuda(dev):
        gen["reserved_peak_gib"] = torch.cuda.max_memory_reserved(dev) / GiB
    peak = "" if gen["peak_gib"] is None else f", peak {gen['peak_gib']:.2f} GiB"
    gen["summary"] = f"{frames}x{width}x{height}, {steps} steps: {result.timings['total']:.1f} s{peak}"
    return gen


# -- (f) 8-bit weights: s/step and peak memory, 16-bit vs int8 vs fp8 (issue 25) ----------------------------


def check_quantize(run: SectionRun) -> dict:
    """A random 2B (small T5) resident, loaded once per weight format: the transformer's and T5's bytes, one
    short generation's s/step and peak memory, and its video's PSNR against the 16-bit one (same seed)."""
    import numpy as np

    from benchmarks.random_checkpoint import write_random_checkpoint
    from cogvideox import CogVideoXPipeline
    from cogvideox.offload import module_bytes
    from cogvideox.quantize import fp8_matmul

    dev = run.device
    path = Path(run.args.ckpt) if run.args.ckpt else run.tmp / "ckpt"
    write_random_checkpoint(path, "tiny" if run.args.tiny else "full", small_t5=True, device=dev)
    frames, height, width, steps = (9, 64, 96, 2) if run.args.tiny else (49, 480, 720, 3)
    out, videos = {"modes": {}}, {}
    for mode in (None, "int8", "fp8"):
        name = mode or "16-bit"
        try:
            pipe = CogVideoXPipeline.from_pretrained(
                path, device=dev, dtype=run.dtype, memory_mode="resident", quantize=mode
            )
            pipe.load()
            stored = sum(module_bytes(m) for m in (pipe.transformer, pipe.text_encoder))
            free_memory(dev)
            reset_peak(dev)
            marks = []
            size = {"num_frames": frames, "height": height, "width": width, "num_inference_steps": steps}
            result = pipe(
                "a toy ship",
                seed=0,
                callback=lambda i, n, marks=marks: marks.append(time.perf_counter()),
                **size,
            )
            sync(dev)
            videos[name] = result.frames
            scaled_mm = mode == "fp8" and fp8_matmul(torch.device(dev))
            out["modes"][name] = {
                "weights_gib": stored / GiB,
                "s_per_step": min(b - a for a, b in pairwise(marks)),
                "peak_gib": gib(peak_bytes(dev)),
                "fp8_matmul": scaled_mm,
            }
            del pipe
        except Exception as e:
            out["modes"][name] = error_record(e)
        run.log(f"quantize: {name}: {out['modes'][name]}")
    base = out["modes"].get("16-bit", {})
    for name, video in videos.items():
        mse = float(((video.astype(np.float64) - videos["16-bit"].astype(np.float64)) ** 2).mean())
        out["modes"][name]["psnr_db"] = 10 * np.log10(255**2 / max(mse, 1e-12))
        if "weights_gib" in base:
            out["modes"][name]["weights_ratio"] = out["modes"][name]["weights_gib"] / base["weights_gib"]
    ratios = [m.get("weights_ratio", 9) for n, m in out["modes"].items() if n != "16-bit"]
    out["verdict"] = "pass" if ratios and max(ratios) <= 0.55 else "fail"
    out["summary"] = "; ".join(
        f"{n}: {m.get('weights_gib', 0):.2f} GiB, {m.get('s_per_step', 0):.3f} s/step, peak {m.get('peak_gib')}, "
        f"PSNR {m.get('psnr_db', 0):.1f} dB"
        if "error" not in m
        else f"{n}: {m['error']}"
        for n, m in out["modes"].items()
    )
    return out


CHECKS = {
    "quantize": check_quantize,
    "decode_oom": check_decode_oom,
    "offload": check_offload,
    "attention": check_attention,
    "compile": check_compile,
    "pinned": check_pinned,
}
