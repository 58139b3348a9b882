"""8-bit weights (issue 25): memory, video and speed of `quantize="int8"` and `"fp8"` against 16 bits.

On the CPU benchmark checkpoint with the released 2B layer widths (`--size widths`: the 2B transformer's and
T5-XXL's widths, 4 blocks each, random weights; benchmarks/random_checkpoint.py), each setting in its own
process, so no setting sees memory another one left:

- weights: the resident set size that loading adds (the pipeline loaded in BF16, as on a GPU), and its peak
  while loading; the transformer's and T5's stored bytes (`offload.module_bytes`);
- the video: PSNR of the 8-bit video against the 16-bit one, same seed (FP32 activations: the CPU's dtype);
- speed: seconds per denoising step (CFG, batch 2), the fastest of `--steps` after a warm-up call.

    python -m benchmarks.bench_quantize --threads 2 --ckpt /tmp/bench/ckpt-widths --out quantize.json
    python -m benchmarks.bench_quantize --size widths-12 --tasks load --threads 2   # 12 blocks each: memory only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, source_digest, write_report

PROMPT = "A detailed wooden toy ship with carved masts glides over a plush blue carpet that mimics the sea"
SIZES = {"tiny": (9, 64, 96), "widths": (9, 128, 192), "widths-12": (9, 128, 192)}  # frames, height, width
TASKS = ("load", "run")
MODES = ("16-bit", "int8", "fp8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="widths")
    p.add_argument("--ckpt", default=None, help="checkpoint folder: written if missing, reused if present")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="load: memory only (BF16 weights; widths-12 needs ~7 GB); run: the video and s/step (FP32)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", nargs=4, metavar=("TASK", "MODE", "CKPT", "FRAMES_NPY"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> dict:
    """One setting in this process: "load" (BF16, RSS) or "run" (FP32, the video and its step times)."""
    import torch

    from cogvideox import CogVideoXPipeline
    from cogvideox.offload import module_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    task, mode, ckpt, frames_npy = args.child
    quantize = None if mode == "16-bit" else mode
    dtype = torch.bfloat16 if task == "load" else torch.float32
    pipe = CogVideoXPipeline.from_pretrained(ckpt, device="cpu", dtype=dtype, quantize=quantize)
    if quantize:
        from cogvideox import quantize as q

        q.quantize_weight(torch.ones(16, 16), quantize)  # imports torchao before the baseline
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    pipe.load()
    load_s = time.perf_counter() - t0
    result = {"mode": mode, "task": task, "load_s": load_s}
    if task == "load":
        result["rss_gib"] = (_status_kib("VmRSS") - before) / 2**20
        result["peak_gib"] = (_status_kib("VmHWM") - before) / 2**20
        result["stored_gib"] = sum(module_bytes(m) for m in (pipe.transformer, pipe.text_encoder)) / 2**30
        return result
    frames, height, width = SIZES[args.size]
    call = dict(num_frames=frames, height=height, width=width, guidance_scale=6.0)
    pipe(PROMPT, num_inference_steps=1, seed=0, **call)  # warm-up
    marks = []
    out = pipe(
        PROMPT,
        num_inference_steps=args.steps,
        seed=args.seed,
        callback=lambda i, n: marks.append(time.perf_counter()),
        **call,
    )
    result["step_s"] = [b - a for a, b in itertools.pairwise(marks)]
    np.save(frames_npy, out.frames)
    return result


def run_child(args, task: str, mode: str, ckpt: Path, frames_npy: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_quantize", "--size", args.size, "--steps", str(args.steps)]
    cmd += ["--seed", str(args.seed), "--child", task, mode, str(ckpt), str(frames_npy)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{task} {mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{task} {mode}: {json.dumps(result)}", flush=True)
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * math.log10(255**2 / max(mse, 1e-12))


def table(loads: dict, runs: dict, videos: dict) -> str:
    """One row per mode; the memory columns from `loads`, the video and speed ones from `runs` (either may be
    empty: --tasks)."""

    def vs(value: float, base: float, digits: int = 3) -> str:
        return f"{value:.{digits}f} ({value / base:.2f}x)"

    headers, rows = ["weights"], [[mode] for mode in (loads or runs)]
    if loads:
        headers += ["load RSS GiB (BF16)", "peak RSS while loading", "transformer+T5 stored GiB"]
        base = loads["16-bit"]
        for row in rows:
            load = loads[row[0]]
            row += [vs(load[k], base[k]) for k in ("rss_gib", "peak_gib", "stored_gib")]
    if runs:
        headers += ["video PSNR dB vs 16-bit (FP32)", "s/step (FP32 activations)"]
        base_step = min(runs["16-bit"]["step_s"])
        for row in rows:
            mode = row[0]
            row.append("—" if mode == "16-bit" else f"{psnr(videos[mode], videos['16-bit']):.1f}")
            row.append(vs(min(runs[mode]["step_s"]), base_step))
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    from benchmarks.random_checkpoint import write_random_checkpoint

    digest = source_digest()
    modes, tasks = args.modes.split(","), set(args.tasks.split(","))
    if modes[0] != "16-bit" or not tasks or not tasks <= set(TASKS):
        raise SystemExit(f"error: --modes must start with 16-bit (the baseline), --tasks be some of {TASKS}")
    loads, runs, videos = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="cogvideox-bench-") as tmp:
        ckpt = write_random_checkpoint(Path(args.ckpt or Path(tmp) / "ckpt"), args.size)
        for mode in modes:
            npy = Path(tmp) / f"{mode}.npy"
            if "load" in tasks:
                loads[mode] = run_child(args, "load", mode, ckpt, npy)
            if "run" in tasks:
                runs[mode] = run_child(args, "run", mode, ckpt, npy)
                videos[mode] = np.load(npy)
    frames, height, width = SIZES[args.size]
    print(
        f"\n{args.size} checkpoint, {frames} frames {width}x{height}, {args.steps} steps, CFG 6, "
        f"{args.threads or 'default'} threads; load {os.getloadavg()[0]:.2f} at the end\n"
    )
    print(table(loads, runs, videos))
    if args.out:
        write_report(args.out, args, {"loads": loads, "runs": runs}, digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
