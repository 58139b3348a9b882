"""Step cache (TeaCache) and previews (issue 13): what they cost per step and what the cache saves.

On the CPU benchmark checkpoint (`--size small`, random weights in the released layout, see
benchmarks/random_checkpoint.py; `--size tiny` is the smoke test's):

- end to end, `--steps` steps (default 50) with the cache off, at threshold 0, at each preset and with a
  preview every step: denoising s/step (all steps, skipped ones included), steps computed, the median time of
  a computed and of a skipped step, and the video's max pixel difference from the uncached one;
- per call, in isolation: the cache decision (relative L1 of the timestep embedding, the polynomial, the
  sum; one device sync), the residual bookkeeping of a computed step (a copy of the tokens and a
  subtraction), and a preview (the latent -> RGB matmul, uint8, to the host); the preview map's fit, once.

Random weights make the timings representative but not the decisions: which steps the cache skips depends
on the trained timestep embedding, so the "steps computed" here say nothing about the released models.

    python -m benchmarks.bench_cache --threads 2 --ckpt /tmp/bench/ckpt-small --out cache.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, markdown_table, source_digest, write_report
from benchmarks.random_checkpoint import write_random_checkpoint
from cogvideox.cache import PRESETS, StepCache

PROMPT = "A detailed wooden toy ship with carved masts glides over a plush blue carpet that mimics the sea"
SIZES = {"tiny": (9, 64, 96), "small": (9, 128, 192)}  # frames, height, width
SETTINGS = ("off", "0", *PRESETS, "off+preview")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="small")
    p.add_argument("--ckpt", default=None, help="checkpoint folder: written if missing, reused if present")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=1, help="end-to-end runs per setting (interleaved)")
    p.add_argument("--calls", type=int, default=200, help="calls per microbenchmark")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _ms(fn, calls: int) -> tuple[float, float]:
    """(min, median) milliseconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), 1e3 * statistics.median(times)


def _run(pipe, setting: str, args, size) -> dict:
    """One generation; per-step times split by whether the blocks ran (a hook on the first block)."""
    frames, height, width = size
    ran, marks = [], [time.perf_counter()]
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: ran.append(len(marks)))
    kwargs = {"step_cache": None if setting.startswith("off") else PRESETS.get(setting, 0.0)}
    if setting.endswith("+preview"):
        kwargs["preview"] = lambda *_: None
    try:
        result = pipe(
            PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            num_frames=frames,
            height=height,
            width=width,
            callback=lambda *_: marks.append(time.perf_counter()),
            **kwargs,
        )
    finally:
        hook.remove()
    steps = [b - a for a, b in itertools.pairwise(marks)]
    return {
        "denoise_s": result.timings["denoise"],
        "s_per_step": result.timings["denoise"] / args.steps,
        "steps_computed": result.timings.get("steps_computed", args.steps),
        "pattern": "".join("X" if i in ran else "." for i in range(1, args.steps + 1)),
        "computed_steps_s": [t for i, t in enumerate(steps, 1) if i in ran],
        "skipped_steps_s": [t for i, t in enumerate(steps, 1) if i not in ran],
        "frames": result.frames,
    }


def indicator(pipe, args) -> dict:
    """The cache's indicator over this checkpoint's `--steps` schedule: the relative L1 change of the timestep
    embedding from step to step, before and after TeaCache's polynomial (it depends on the timesteps alone)."""
    from cogvideox.layers import timestep_embedding

    c, batch = pipe.transformer_config, 2 if args.guidance > 1 else 1
    cache = StepCache.for_model(0.0, c, args.steps)
    with torch.inference_mode():
        embs = [
            pipe.transformer.time_embedding(
                timestep_embedding(torch.full((batch,), t), c.inner_dim, c.flip_sin_to_cos, c.freq_shift)
            ).float()
            for t in pipe.scheduler.timesteps(args.steps).tolist()
        ]
    change = [((e - p).abs().mean() / p.abs().mean()).item() for p, e in itertools.pairwise(embs)]
    rescaled = [float(np.polyval(cache.coefficients, x)) for x in change]
    return {"change": change, "rescaled": rescaled}


def microbenchmarks(pipe, args, size) -> dict:
    """Per-call costs in isolation, on the tensors one step of this run handles."""
    frames, height, width = size
    c, v = pipe.transformer_config, pipe.vae_config
    batch = 2 if args.guidance > 1 else 1
    latent = (
        1,
        (frames - 1) // v.temporal_compression_ratio + 1,
        c.in_channels,
        height // v.spatial_compression,
        width // v.spatial_compression,
    )
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        emb = torch.randn(batch, c.time_embed_dim, generator=g)
        cache = StepCache.for_model(PRESETS["quality"], c, num_steps=3)
        cache.should_compute(emb)

        def decide():
            cache.step = 1  # a middle step: the indicator is computed
            cache.should_compute(emb * 1.01)

        tokens = torch.randn(batch, _sequence(c, latent), c.inner_dim, generator=g)

        def bookkeeping():
            before = tokens.clone()
            torch.sub(tokens, before, out=before)

        x0 = torch.randn(latent, generator=g)
        t0 = time.perf_counter()
        preview = pipe.latent_preview()
        fit_s = time.perf_counter() - t0
        return {
            "decision_ms": _ms(decide, args.calls),
            "bookkeeping_ms": _ms(bookkeeping, args.calls),
            "preview_ms": _ms(lambda: preview(x0), args.calls),
            "preview_fit_s": fit_s,
            "tokens": tuple(tokens.shape),
            "latents": latent,
        }


def _sequence(c, latent: tuple) -> int:
    _, f, _, h, w = latent
    return c.max_text_seq_length + f * (h // c.patch_size) * (w // c.patch_size)


def measure(args, size: tuple) -> tuple[dict, dict, dict[str, list[dict]]]:
    """On a random checkpoint: the per-call microbenchmarks, the cache's indicator per step, and each setting's
    runs, interleaved (A B, B A, ...) so the shared machine's drift hits every setting alike."""
    from cogvideox import CogVideoXPipeline

    with tempfile.TemporaryDirectory(prefix="cogvideox-bench-") as tmp:
        path = write_random_checkpoint(Path(args.ckpt or tmp), args.size)
        pipe = CogVideoXPipeline.from_pretrained(
            path, device="cpu", dtype=torch.float32, memory_mode="resident"
        )
        pipe.load()
        micro = microbenchmarks(pipe, args, size)  # also fits the preview map, outside the timed runs
        signal = indicator(pipe, args)
        frames, height, width = size
        pipe(PROMPT, num_inference_steps=1, seed=0, num_frames=frames, height=height, width=width)  # warm-up
        runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for r in range(args.repeats):
            for setting in SETTINGS if r % 2 == 0 else reversed(SETTINGS):
                runs[setting].append(_run(pipe, setting, args, size))
                print(f"{setting}: {runs[setting][-1]['s_per_step']:.3f} s/step", flush=True)
    return micro, signal, runs


def settings_table(runs: dict[str, list[dict]], args) -> str:
    """One row per setting: steps computed, wall time, step times, the speed-up and the pixel difference."""

    def steps_of(setting: str, key: str) -> list[float]:
        return [t for r in runs[setting] for t in r[key]]

    def fastest(setting: str, key: str) -> float:
        """The fastest step of a kind over all runs: on a shared machine, the one least disturbed."""
        return min(steps_of(setting, key), default=0.0)

    def estimate(setting: str) -> float:
        """s/step from the fastest computed and skipped step (the shared machine's stalls left out)."""
        n = runs[setting][0]["steps_computed"]
        computed, skipped = fastest(setting, "computed_steps_s"), fastest(setting, "skipped_steps_s")
        return (n * computed + (args.steps - n) * skipped) / args.steps

    def both(setting: str, key: str) -> str:
        values = steps_of(setting, key)
        return f"{min(values):.3g} / {statistics.median(values):.3g}" if values else "n/a"

    rows = []
    for s in SETTINGS:
        first = runs[s][0]
        diff = int(np.abs(first["frames"].astype(int) - runs["off"][0]["frames"]).max())
        threshold = "off" if s.startswith("off") else PRESETS.get(s, 0.0)
        wall = statistics.median(r["denoise_s"] for r in runs[s])
        steps = [both(s, "computed_steps_s"), both(s, "skipped_steps_s"), estimate(s)]
        rows.append(
            [
                s,
                threshold,
                first["steps_computed"],
                wall,
                *steps,
                f"{estimate('off') / estimate(s):.2f}x",
                diff,
            ]
        )
    headers = [
        "setting",
        "threshold",
        "steps computed",
        "denoise s (wall, median)",
        "computed step s (min / median)",
    ]
    headers += ["skipped step s (min / median)", "s/step (from min)", "speed-up", "max px diff"]
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    digest = source_digest()
    print(f"machine: {machine()}; cogvideox/*.py sha256 {digest}; load {os.getloadavg()[0]:.2f}", flush=True)
    size = SIZES[args.size]
    micro, signal, runs = measure(args, size)
    step = min(t for r in runs["off"] for t in r["computed_steps_s"])  # an uncached step, at its fastest
    per_call = [
        [name, *micro[key], 100 * micro[key][0] / 1e3 / step]
        for name, key in [
            ("cache decision", "decision_ms"),
            ("residual bookkeeping (computed step)", "bookkeeping_ms"),
            ("preview (map + uint8 + host copy)", "preview_ms"),
        ]
    ]
    print(
        f"\n{size[0]} frames {size[2]}x{size[1]}, {args.steps} steps, CFG {args.guidance}, fp32, {args.size} model, "
        f"tokens {micro['tokens']}, latents {micro['latents']}; load {os.getloadavg()[0]:.2f} at the end\n"
    )
    print(settings_table(runs, args) + "\n")
    headers = ["per call", "min ms", "median ms", "% of an uncached step (min / min)"]
    print(markdown_table(headers, per_call) + "\n")
    print(f"preview map fit (once per pipeline): {micro['preview_fit_s']:.3f} s")
    for name, values in signal.items():
        q = np.quantile(values, [0, 0.5, 1])
        print(f"indicator {name} per step: min {q[0]:.3g}, median {q[1]:.3g}, max {q[2]:.3g}")
    for s in SETTINGS:
        print(f"pattern {s}: {runs[s][0]['pattern']}")
    if args.out:
        kept = {s: [{k: v for k, v in r.items() if k != "frames"} for r in rs] for s, rs in runs.items()}
        write_report(args.out, args, {"micro": micro, "indicator": signal, "runs": kept}, digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
