"""The whole pipeline, ours beside diffusers', per memory mode: time and peak memory per stage, same video.

CUDA (issue 4): the released 2B architecture at 720x480x49, 50 steps, FP16, with random weights written once
in the released layout (T5-XXL-shaped text encoder included, so each memory mode holds what it would hold):

    python -m benchmarks.bench_pipeline --device cuda --ckpt /tmp/cogvideox-2b-random --modes resident --out r.json

CPU: `--size small`, every layer kind of the release at reduced widths, FP32, 9 frames at 192x128;
`--size tiny` is the smoke test's. Stages are timed inside each call with a device sync at each boundary
(text encoding, every denoising step, decoding); memory is the peak per stage: the CUDA allocator's peak
(absolute, weights included) on CUDA, the resident-set peak above the stage's start on the CPU."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import GiB, PeakMemory, machine, markdown_table, source_digest, sync, write_report
from benchmarks.random_checkpoint import SIZES, write_random_checkpoint
from cogvideox.config import TransformerConfig

PROMPT = "A detailed wooden toy ship with carved masts glides over a plush blue carpet that mimics the sea"
NEGATIVE = "blurry, low quality"
# The warm-up uses other prompts: our pipeline caches prompt embeddings, and the timed call must encode both.
WARMUP_PROMPT, WARMUP_NEGATIVE = "a snowy forest road", ""
DEFAULTS = {  # (num_frames, height, width, steps) per model size
    "tiny": (9, 64, 96, 2),
    "small": (9, 128, 192, 4),
    "full": (49, 480, 720, 50),
}
MODES = ("resident", "model", "sequential")
STAGES = ("text", "denoise", "decode")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--size", choices=SIZES, default=None, help="model widths (default: full on CUDA, small on CPU)"
    )
    p.add_argument("--small-t5", action="store_true", help="full size: a 2-layer T5 instead of T5-XXL")
    p.add_argument("--ckpt", default=None, help="checkpoint folder: written if missing, reused if present")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: fp16 CUDA, fp32 CPU"
    )
    p.add_argument("--modes", help="comma list of resident,model,sequential (default: all; CPU: resident)")
    p.add_argument("--impls", default="diffusers,ours", help="comma list of ours,diffusers")
    p.add_argument(
        "--compile", action="store_true", help="also run resident with torch.compile'd transformers"
    )
    p.add_argument("--vae-tiling", action="store_true", help="tiled VAE decode in both pipelines")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of an untimed call first (0: none)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per run (stage times: their median)")
    p.add_argument(
        "--peak-tflops", type=float, help="device peak (default: 989, H100 dense FP16; none on CPU)"
    )
    p.add_argument(
        "--max-pixel-diff", type=int, default=None, help="fail above (default: 2 in FP32, else report)"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.size = args.size or ("full" if args.device.type == "cuda" else "small")
    frames, height, width, steps = DEFAULTS[args.size]
    args.frames, args.height = args.frames or frames, args.height or height
    args.width, args.steps = args.width or width, args.steps or steps
    args.dtype = args.dtype or ("fp16" if args.device.type == "cuda" else "fp32")
    args.modes = (args.modes or (",".join(MODES) if args.device.type == "cuda" else "resident")).split(",")
    args.impls = args.impls.split(",")
    if not set(args.modes) <= set(MODES) or not set(args.impls) <= {"ours", "diffusers"}:
        p.error(f"modes must be among {MODES}, impls among ours, diffusers")
    if args.compile:
        args.modes.append("resident+compile")
    if args.peak_tflops is None and args.device.type == "cuda":
        args.peak_tflops = 989.0
    if args.max_pixel_diff is None and args.dtype == "fp32":
        args.max_pixel_diff = 2
    return args


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def transformer_flops(
    cfg: TransformerConfig, frames: int, height: int, width: int, batch: int
) -> tuple[int, int]:
    """(FLOPs of one transformer call, tokens per sample): per layer and sample, 24·S·d² for the q/k/v/out and
    feed-forward matmuls plus 4·S²·d for the attention scores and their product with v (2 FLOPs a multiply-add).
    The released 2B at 49x480x720 with CFG (batch 2): S = 17,776, 2.4e14 FLOPs per step."""
    p, latent_frames = cfg.patch_size, (frames - 1) // cfg.temporal_compression_ratio + 1
    s = cfg.max_text_seq_length + latent_frames * (height // 8 // p) * (width // 8 // p)
    d = cfg.inner_dim
    return cfg.num_layers * batch * (24 * s * d * d + 4 * s * s * d), s


@dataclasses.dataclass
class Run:
    impl: str
    mode: str
    skipped: str | None = None
    load_s: float | None = None
    warmup_s: float | None = None
    text_s: float | None = None
    step_s: float | None = None  # median over the steps
    denoise_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    peak_gib: dict = dataclasses.field(default_factory=dict)  # per stage
    reserved_gib: float | None = None  # CUDA: the allocator's highest reservation over all stages
    step_times: list = dataclasses.field(default_factory=list)
    flop_fraction: float | None = None
    max_pixel_diff: int | None = None
    attention: str | None = (
        None  # the SDPA kernel(s) ours picked by timing them (diffusers: PyTorch's default)
    )
    frames: np.ndarray | None = dataclasses.field(default=None, repr=False)


class StageClock:
    """Stage boundaries inside one call, each behind a device sync, with the memory peak of every stage.

    Both pipelines are instrumented the same way: their text-encoding and decoding methods are wrapped, and
    the per-step callback marks step ends. Denoising runs from the end of text encoding to the start of
    decoding. Memory bookkeeping happens between marks, outside every stage's time."""

    def __init__(self, device: torch.device):
        self.device, self.memory = device, PeakMemory(device)
        self.begin()

    def _mark(self, name: str) -> None:
        sync(self.device)
        self.marks[name] = time.perf_counter()

    def _close(self, stage: str) -> None:
        peak = self.memory.peak()
        self.peaks[stage] = None if peak is None else peak / GiB
        reserved = self.memory.peak_reserved()
        if reserved is not None:
            self.reserved = max(self.reserved or 0.0, reserved / GiB)
        self.memory.reset()

    def begin(self) -> None:
        self.marks: dict[str, float] = {}
        self.steps: list[float] = []
        self.peaks: dict[str, float | None] = {}
        self.reserved: float | None = None
        self._mark("start")

    def wrap(self, stage: str, fn):
        def wrapped(*args, **kwargs):
            if stage == "decode":
                self._mark("denoise_end")
                self._close("denoise")
            else:
                self.memory.reset()
            self._mark(f"{stage}_start")
            out = fn(*args, **kwargs)
            self._mark(f"{stage}_end")
            self._close(stage)
            if stage == "text":
                self._mark("denoise_start")
            return out

        return wrapped

    def step(self) -> None:
        sync(self.device)
        self.steps.append(time.perf_counter())

    def result(self) -> dict:
        self._mark("end")
        m = self.marks
        return {
            "step_times": [b - a for a, b in itertools.pairwise([m["denoise_start"], *self.steps])],
            "text_s": m["text_end"] - m["text_start"],
            "denoise_s": m["denoise_end"] - m["denoise_start"],
            "decode_s": m["decode_end"] - m["decode_start"],
            "total_s": m["end"] - m["start"],
            "peak_gib": dict(self.peaks),
            "reserved_gib": self.reserved,
        }


def _measure(run: Run, clock: StageClock, call, args) -> None:
    """Warm up, then time `args.repeats` calls: per stage the median, per step the median of all steps,
    memory the highest peak. call(prompt, negative, steps, seed, on_step) -> uint8 frames (T, H, W, 3)."""
    # Compiled transformers: compilation happens in the first call(s); warm up with at least two steps.
    warmup = max(args.warmup_steps, 2) if run.mode.endswith("+compile") else args.warmup_steps
    if warmup:
        t0 = time.perf_counter()
        call(WARMUP_PROMPT, WARMUP_NEGATIVE, warmup, 0, None)
        run.warmup_s = time.perf_counter() - t0
    takes = []
    for i in range(args.repeats):
        # New prompts each take: our pipeline caches prompt embeddings, and every timed call must encode both.
        suffix = f", take {i + 1}" if i else ""
        clock.begin()
        frames = call(PROMPT + suffix, NEGATIVE + suffix, args.steps, args.seed, clock.step)
        takes.append(clock.result())
        if i == 0:
            run.frames = frames
    for key in ("text_s", "denoise_s", "decode_s", "total_s"):
        setattr(run, key, statistics.median(t[key] for t in takes))
    run.step_times = [x for t in takes for x in t["step_times"]]
    run.step_s = statistics.median(run.step_times)
    peaks = [t["peak_gib"].get(stage) for t in takes for stage in STAGES]
    reserved = [t["reserved_gib"] for t in takes if t["reserved_gib"] is not None]
    run.reserved_gib = max(reserved) if reserved else None
    run.peak_gib = {
        stage: None if None in peaks else max(t["peak_gib"][stage] for t in takes) for stage in STAGES
    }


def _call_kwargs(args) -> dict:
    return dict(num_frames=args.frames, height=args.height, width=args.width, guidance_scale=args.guidance)


def run_ours(path: Path, mode: str, args) -> Run:
    from cogvideox import CogVideoXPipeline

    run, clock = Run("ours", mode), StageClock(args.device)
    t0 = time.perf_counter()
    memory_mode = mode.removesuffix("+compile")
    dtype = DTYPES[args.dtype]
    pipe = CogVideoXPipeline.from_pretrained(path, device=args.device, dtype=dtype, memory_mode=memory_mode)
    pipe.load()
    sync(args.device)
    run.load_s = time.perf_counter() - t0
    if mode.endswith("+compile"):
        pipe.transformer.compile_blocks()  # what `compile=True` does
    if args.vae_tiling:  # our pipeline picks tiling from free memory: force the choice made for diffusers
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z, **kw: decode(z, **{**kw, "tiled": True})
    pipe.encode_prompts = clock.wrap("text", pipe.encode_prompts)
    pipe.decode = clock.wrap("decode", pipe.decode)

    def call(prompt, negative, steps, seed, on_step):
        callback = None if on_step is None else (lambda step, total: on_step())
        kwargs = _call_kwargs(args)
        return pipe(
            prompt, negative, num_inference_steps=steps, seed=seed, callback=callback, **kwargs
        ).frames

    _measure(run, clock, call, args)
    run.attention = ", ".join(
        sorted({str(b).removeprefix("SDPBackend.") for b in pipe.attention_backends.values()})
    )
    return run


def run_diffusers(path: Path, mode: str, args) -> Run:
    run = Run("diffusers", mode)
    memory_mode = mode.removesuffix("+compile")
    if memory_mode != "resident" and args.device.type != "cuda":
        run.skipped = "diffusers offloads to an accelerator only"
        return run
    if memory_mode != "resident" and importlib.util.find_spec("accelerate") is None:
        run.skipped = "needs `pip install accelerate`"
        return run
    import diffusers

    clock = StageClock(args.device)
    t0 = time.perf_counter()
    pipe = diffusers.CogVideoXPipeline.from_pretrained(path, dtype=DTYPES[args.dtype])
    if memory_mode == "resident":
        pipe.to(args.device)
    elif memory_mode == "model":
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.enable_sequential_cpu_offload(device=args.device)
    sync(args.device)
    run.load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    if mode.endswith("+compile"):
        pipe.transformer.compile()
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.encode_prompt = clock.wrap("text", pipe.encode_prompt)
    pipe.decode_latents = clock.wrap("decode", pipe.decode_latents)

    def call(prompt, negative, steps, seed, on_step):
        video = pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            output_type="pt",
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=None if on_step is None else (lambda *_: on_step() or {}),
            **_call_kwargs(args),
        ).frames  # (1, T, 3, H, W) in [0, 1]
        return (video[0].permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy()

    _measure(run, clock, call, args)
    if memory_mode != "resident":
        pipe.remove_all_hooks()
    return run


def free(device: torch.device) -> str:
    gc.collect()
    if device.type != "cuda":
        return ""
    torch.cuda.empty_cache()
    return f" (still allocated after freeing: {torch.cuda.memory_allocated(device) / GiB:.2f} GiB)"


def report(runs: list[Run], args) -> tuple[str, list[str]]:
    memory = PeakMemory(args.device).label
    headers = [
        "impl",
        "mode",
        "load s",
        "text s",
        "s/step",
        "denoise s",
        "decode s",
        "total s",
        "FLOP util",
        f"{memory}: text",
        "denoise",
        "decode",
        "reserved max",
        "max px diff",
    ]
    rows = []
    for r in runs:
        if r.skipped:
            rows.append([r.impl, r.mode, f"skipped: {r.skipped}", *[""] * 11])
            continue
        util = None if r.flop_fraction is None else f"{100 * r.flop_fraction:.1f}%"
        peaks = [r.peak_gib.get(s) for s in STAGES]
        rows.append(
            [
                r.impl,
                r.mode,
                r.load_s,
                r.text_s,
                r.step_s,
                r.denoise_s,
                r.decode_s,
                r.total_s,
                util,
                *peaks,
                r.reserved_gib,
                r.max_pixel_diff,
            ]
        )
    ratios = []
    by_key = {(r.impl, r.mode): r for r in runs if not r.skipped}
    for mode in args.modes:
        ours, ref = by_key.get(("ours", mode)), by_key.get(("diffusers", mode))
        if ours is None or ref is None:
            continue
        line = f"ratio {mode}: ours/diffusers s/step {ours.step_s / ref.step_s:.2f}x"
        line += f", total {ours.total_s / ref.total_s:.2f}x"
        peaks = [list(r.peak_gib.values()) for r in (ours, ref)]
        if None not in peaks[0] + peaks[1]:
            line += f", peak memory {max(peaks[0]) / max(peaks[1]):.2f}x"
        ratios.append(line)
    return markdown_table(headers, rows), ratios


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    digest = source_digest()  # before anything runs: another process may edit the package meanwhile
    print(f"machine: {machine()}; cogvideox/*.py sha256 {digest}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cogvideox-bench-") as tmp:
        path = Path(args.ckpt or tmp)
        t0 = time.perf_counter()
        write_random_checkpoint(path, args.size, args.small_t5, args.device)
        print(f"checkpoint {path} ({args.size}) ready in {time.perf_counter() - t0:.1f} s", flush=True)
        cfg = TransformerConfig.from_json(path / "transformer" / "config.json")
        batch = 2 if args.guidance > 1 else 1
        flops, tokens = transformer_flops(cfg, args.frames, args.height, args.width, batch)
        runs = []
        for mode in args.modes:
            for impl in args.impls:
                try:
                    run = (run_ours if impl == "ours" else run_diffusers)(path, mode, args)
                except torch.OutOfMemoryError:  # keep the other modes' results; the table says what failed
                    run = Run(impl, mode, skipped="out of memory")
                if not run.skipped and args.peak_tflops:
                    run.flop_fraction = flops / run.step_s / (args.peak_tflops * 1e12)
                runs.append(run)
                status = run.skipped or f"total {run.total_s:.2f} s, {run.step_s:.3f} s/step"
                print(f"{impl} {mode}: {status}{free(args.device)}", flush=True)

    problems = compare(runs, args.max_pixel_diff)
    table, ratios = report(runs, args)
    print(
        f"\n{args.frames} frames {args.width}x{args.height}, {args.steps} steps, CFG {args.guidance}, "
        f"{args.dtype}, {args.size} model, VAE tiling {'on' if args.vae_tiling else 'off'}; "
        f"{tokens} tokens, {flops:.3g} transformer FLOPs per step"
        + (f", FLOP util against {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else "")
        + "; max px diff against the first diffusers run\n"
    )
    print(table + "\n")
    print("\n".join(ratios))
    for r in runs:
        if r.attention:
            print(f"attention kernel {r.impl} {r.mode}: {r.attention} (fastest of those timed at load)")
    if args.out:
        kept = [dataclasses.asdict(dataclasses.replace(r, frames=None)) for r in runs]
        write_report(args.out, args, {"tokens": tokens, "flops_per_step": flops, "runs": kept}, digest)
    if problems:
        print("VIDEOS DIFFER: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


def compare(runs: list[Run], limit: int | None) -> list[str]:
    """Fill each run's max pixel difference against the first diffusers run; return what is out of bounds."""
    done = [r for r in runs if not r.skipped]
    reference = next((r for r in done if r.impl == "diffusers"), done[0] if done else None)
    problems = []
    for r in done:
        if r.frames.shape != reference.frames.shape:
            problems.append(f"{r.impl} {r.mode} video {r.frames.shape} != {reference.frames.shape}")
            continue
        r.max_pixel_diff = int(np.abs(r.frames.astype(np.int16) - reference.frames.astype(np.int16)).max())
        if limit is not None and r.max_pixel_diff > limit:
            problems.append(f"{r.impl} {r.mode} max pixel diff {r.max_pixel_diff} > {limit}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
