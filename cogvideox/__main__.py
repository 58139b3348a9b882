"""python -m cogvideox --model PATH_OR_ID --prompt TEXT --output out.mp4"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path

from . import __version__

# Known without a model, so bad values fail in milliseconds: torch and the pipeline are imported only to generate.
# Equal to the library's limits (cogvideox/pipeline.py; a test keeps them in step).
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SIZE = 4096
MAX_SEED = 2**32
TINY_RANDOM = "tiny-random"

# The library's argument names -> ours, for its ValueError messages ("num_frames must be 8N+1 ...").
CLI_NAMES = {
    "num_inference_steps": "--steps",
    "num_frames": "--frames",
    "guidance_scale": "--guidance",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "device": "--device",
    "dtype": "--dtype",
    "memory_mode": "--memory-mode",
    "scheduler": "--scheduler",
    "step_cache": "--step-cache",
}
_LIBRARY_NAME = re.compile(rf"(?<![\w./-])({'|'.join(CLI_NAMES)})(?= must\b)")


def in_cli_terms(message: str) -> str:
    """A library error message with its argument names replaced by the CLI's flags."""
    return _LIBRARY_NAME.sub(lambda m: CLI_NAMES[m.group(1)], message)


def integer(low: int, high: int | None = None, multiple: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high) or value % multiple:
            what = f"a multiple of {multiple} in" if multiple > 1 else "in"
            raise argparse.ArgumentTypeError(f"must be {what} [{low}, {high or 'inf'}], got {value}")
        return value

    return parse


def guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and 1 <= value <= MAX_GUIDANCE):
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_GUIDANCE:g}], got {text}")
    return value


STEP_CACHE_PRESETS = ("quality", "fast")  # cogvideox.cache's names (not imported here: it pulls in torch)


def step_cache(text: str) -> str | float | None:
    """--step-cache: off, a preset name, or a threshold (0 computes every step)."""
    if text in ("off", "none"):
        return None
    if text in STEP_CACHE_PRESETS:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be off, quality, fast or a number >= 0, got {text!r}"
        ) from None
    if not (math.isfinite(value) and 0 <= value <= 10):
        raise argparse.ArgumentTypeError(f"must be off, quality, fast or a number in [0, 10], got {text}")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")  # one line, like every other error of the CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m cogvideox", description="CogVideoX text-to-video")
    p.add_argument(
        "--model",
        default="THUDM/CogVideoX-2b",
        help=f"checkpoint folder, Hub repo id, or {TINY_RANDOM} (random weights, offline: 96x64, 17 frames)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--output", default="output.mp4", type=Path, help="an .mp4 path (its .json sidecar goes beside)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output (and its .json) if they exist")
    p.add_argument("--seed", type=integer(0, MAX_SEED - 1), help="default: random (printed and saved)")
    p.add_argument("--steps", type=integer(1, MAX_STEPS), help="default: 50")
    p.add_argument("--guidance", type=guidance, help="default: 6.0")
    p.add_argument("--frames", type=integer(1), help="8N+1; default: the model's (49)")
    size = integer(16, MAX_SIZE, multiple=16)
    p.add_argument("--height", type=size, help="a multiple of 16; default: the model's (480)")
    p.add_argument("--width", type=size, help="a multiple of 16; default: the model's (720)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: the model's")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--memory-mode", choices=["resident", "model", "sequential"], default=None)
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default=None, help="default: the checkpoint's")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--step-cache", type=step_cache, default=None, metavar="off|quality|fast|THRESHOLD",
                   help="skip transformer passes on steps that change little (TeaCache): quality 0.1, fast 0.2; "
                   "default off (every step computed)")  # fmt: skip
    p.add_argument("--version", action="version", version=f"cogvideox {__version__}")
    return p.parse_args(argv)


def check_output(path: Path, overwrite: bool) -> str | None:
    """Why `path` cannot take the video (checked before any loading), or None. Leaves nothing behind."""
    if path.suffix.lower() != ".mp4":
        return "--output must end in .mp4"
    for target in (path, path.with_suffix(".json")):
        if target.is_dir():
            return f"{target} is a folder"
        if target.exists() and not overwrite:
            return f"{target} already exists; choose another --output or pass --overwrite"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        return f"cannot write to {path.parent}: {e.strerror or e}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if problem := check_output(args.output, args.overwrite):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return generate(args)
    except ValueError as e:
        print(f"error: {in_cli_terms(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no video was written", file=sys.stderr)
        return 130
    except OSError as e:  # the disk filled up, the folder went away
        print(f"error: could not write {args.output}: {e}", file=sys.stderr)
        return 1


def generate(args: argparse.Namespace) -> int:
    from .pipeline import CogVideoXPipeline, GenerationCancelled, check_device
    from .testing import tiny_random_checkpoint
    from .video import write_mp4, write_sidecar

    model = args.model
    if model == TINY_RANDOM:
        check_device(args.device)  # before spending seconds on writing a model
        try:
            model = tiny_random_checkpoint()
        except OSError as e:
            print(f"error: could not write the {TINY_RANDOM} model: {e}", file=sys.stderr)
            return 1
    pipe = CogVideoXPipeline.from_pretrained(
        model,
        device=args.device,
        dtype=args.dtype,
        memory_mode=args.memory_mode,
        scheduler=args.scheduler,
        compile=args.compile,
    )
    d = pipe.defaults
    kwargs = dict(
        negative_prompt=args.negative_prompt,
        num_frames=d["num_frames"] if args.frames is None else args.frames,
        height=d["height"] if args.height is None else args.height,
        width=d["width"] if args.width is None else args.width,
        num_inference_steps=d["num_inference_steps"] if args.steps is None else args.steps,
        guidance_scale=d["guidance_scale"] if args.guidance is None else args.guidance,
        seed=args.seed,
    )
    pipe.validate(args.prompt, **kwargs, step_cache=args.step_cache)  # the model's limits, before any weights
    if args.model == TINY_RANDOM:
        print(f"note: {TINY_RANDOM} has random weights, so its video is noise ({d['width']}x{d['height']}, "
              f"at most {pipe.max_frames} frames; kept in {model})", file=sys.stderr)  # fmt: skip
    count = pipe.count_tokens(args.prompt)
    if count.dropped_tokens:
        print(f"warning: prompt is {count.n_tokens} tokens; {count.dropped_tokens} beyond {count.max_tokens} "
              f"are dropped: {count.dropped_text!r}", file=sys.stderr)  # fmt: skip
    start = stage_start = time.perf_counter()

    def progress(step: int, total: int) -> None:
        eta = (time.perf_counter() - stage_start) / step * (total - step)
        bar = "#" * (30 * step // total)
        end = "\n" if step == total else ""
        print(f"\r  [{bar:<30}] {step}/{total}  ETA {eta:5.1f}s", end=end, file=sys.stderr, flush=True)

    def stage(name: str) -> None:
        nonlocal stage_start
        stage_start = time.perf_counter()
        print(f"{name}...", file=sys.stderr, flush=True)

    try:
        result = pipe(args.prompt, callback=progress, on_stage=stage, step_cache=args.step_cache, **kwargs)
    except GenerationCancelled as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Each file is written beside its final name and renamed: an interrupted write leaves no partial file.
    write_mp4(result.frames, args.output, fps=result.fps)
    # The model as asked for: "tiny-random" says more than the temp folder it was written to.
    sidecar = write_sidecar(args.output, {**result.settings, "model": args.model, "timings": result.timings})
    if "steps_computed" in result.timings:
        print(f"step cache: {result.timings['steps_computed']} of {kwargs['num_inference_steps']} steps computed",
              file=sys.stderr)  # fmt: skip
    print(f"wrote {args.output} ({len(result.frames)} frames, seed {result.seed}) and {sidecar} "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
