"""The GPU check's CogVideoX 1.5 section (issue 23): the released CogVideoX1.5-5B itself, when its weights are
already in the Hugging Face cache or a folder (`--v15-model`; nothing is downloaded), else one line saying so.

Per memory mode (`--v15-modes`, default model,sequential): the pipeline loads the checkpoint and makes one clip of
`--v15-steps` steps (default 2) at 1360x768 and `--v15-frames` frames (default 81; 161 is the 10 s clip), recording
load, text, per-step and decode seconds and the peak memory of each stage: measurements, to set against
benchmarks/memory15.py's prediction and the published timings. The 50-step time is extrapolated from the steps run
(text + 50 x median step + decode) and labelled so. With `--tiny` (a CPU) the same path runs at 1 frame of 32x48.
"""

from __future__ import annotations

import statistics
import time
from itertools import pairwise
from pathlib import Path

from benchmarks.gpu_helpers import SectionRun, free_memory, gib, is_cuda, needs_cuda, peak_bytes, reset_peak

V15_MODEL = "THUDM/CogVideoX1.5-5B"
PROMPT = (
    "A red fox trots through fresh snow at dawn, its breath steaming, the camera following at ground level"
)
RELEASE_STEPS = 50


def find_checkpoint(model: str) -> Path | None:
    """The checkpoint folder, from a path or the local Hugging Face cache only; None unless every component's
    weights are there."""
    path = Path(model).expanduser()
    if not path.is_dir():
        if str(model).count("/") != 1:
            return None
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(model), local_files_only=True))
        except Exception:  # not cached (LocalEntryNotFoundError), or a cache that cannot be read
            return None
    parts = ("transformer", "vae", "text_encoder")
    return path if all(any((path / p).glob("*.safetensors")) for p in parts) else None


def check_v15(run: SectionRun) -> dict:
    args = run.args
    root = find_checkpoint(args.v15_model)
    if root is None:
        from huggingface_hub import constants

        reason = (
            f"{args.v15_model} is not downloaded (Hugging Face cache {constants.HF_HUB_CACHE}); fetch it with "
            f"`huggingface-cli download {V15_MODEL}` or pass --v15-model FOLDER to measure CogVideoX 1.5"
        )
        run.log(f"v15: {reason}")
        return {"status": "skipped", "reason": reason, "verdict": "n/a"}
    frames, height, width = (
        (1, 32, 48) if args.tiny else (args.v15_frames, 768, 1360)
    )  # 1: padded to 2 latents
    out = {"model": str(root), "frames": frames, "height": height, "width": width, "steps": args.v15_steps}
    modes = [m for m in args.v15_modes.split(",") if m]
    out["modes"] = {mode: generation(run, root, mode, (frames, height, width)) for mode in modes}
    made = all(
        r["frames_shape"] == [frames, height, width, 3] and r["fps"] == 16 for r in out["modes"].values()
    )
    out["verdict"] = "pass" if made else "fail"
    out["summary"] = "; ".join(
        f"{m}: {r['s_per_step']:.2f} s/step, peak {r['peak_gib']} GiB, 50 steps ~{r['extrapolated_50_steps_s']:.0f} s"
        for m, r in out["modes"].items()
    )
    return out


def generation(run: SectionRun, root: Path, mode: str, size: tuple[int, int, int]) -> dict:
    """One clip in `mode`: seconds and peak memory per stage (the pipeline's `on_stage` marks the stages)."""
    from cogvideox import CogVideoXPipeline

    dev, (frames, height, width) = run.device, size
    free_memory(dev)
    reset_peak(dev)
    peaks, steps, current = {}, [time.perf_counter()], ["start"]

    def on_stage(name: str) -> None:
        peaks[current[0]] = gib(peak_bytes(dev))
        reset_peak(dev)
        current[0] = name

    t = time.perf_counter()
    pipe = CogVideoXPipeline.from_pretrained(root, device=dev, memory_mode=mode)
    run.log(f"v15: {mode} mode, {frames} frames {width}x{height}, {run.args.v15_steps} steps")
    result = pipe(
        PROMPT,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=run.args.v15_steps,
        seed=0,
        callback=lambda i, n: steps.append(time.perf_counter()),
        on_stage=on_stage,
    )
    on_stage("done")
    # Between callbacks: the first step's start (kernel pick, warm-up) is not timed apart, so it is left out
    step_s = [b - a for a, b in pairwise(steps[1:])] or [result.timings["denoise"]]
    timings = result.timings
    per_step = statistics.median(step_s)
    record = {
        "seconds": time.perf_counter() - t,
        "timings": timings,
        "step_s": step_s,
        "s_per_step": per_step,
        "extrapolated_50_steps_s": timings["text"] + RELEASE_STEPS * per_step + timings["decode"],
        "frames_shape": list(result.frames.shape),
        "fps": result.fps,
        "dtype": str(pipe.dtype),
        "decode_attempts": pipe.offloader.decode_attempts,
        "stage_peaks_gib": peaks if is_cuda(dev) else needs_cuda("max_memory_allocated"),
        "peak_gib": max(v for v in peaks.values() if v is not None) if is_cuda(dev) else None,
    }
    del pipe, result
    free_memory(dev)
    return record
