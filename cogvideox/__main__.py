"""python -m cogvideox --model PATH_OR_ID --prompt TEXT --output out.mp4"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import __version__
from .config import (
    LORA_MAX_SCALE,
    RELEASE_DEFAULTS,
)  # torch-free: --help and bad flags answer in milliseconds

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
    "quantize": "--quantize",
    "scheduler": "--scheduler",
    "step_cache": "--step-cache",
    "parallel": "--parallel",
    "strength": "--strength",
    "video": "--video",
    "image": "--image",
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


def number(low: float, high: float, low_open: bool = False):
    """A float in [low, high] ((low, high] with low_open), finite."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {text}"
            )
        return value

    return parse


guidance = number(1, MAX_GUIDANCE)
strength = number(0, 1, low_open=True)


def input_file(text: str) -> Path:
    """--video / --image: an existing file (what it holds is checked once the generation size is known)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{'is not a file' if path.exists() else 'no such file'}: {text}")
    return path


def lora_flag(text: str) -> tuple[str, float]:
    """--lora SOURCE[:SCALE]: the scale is what follows the last ':' when it reads as a number (else the ':' is
    part of the path); 1 when left out."""
    source, colon, tail = text.rpartition(":")
    try:
        scale = float(tail)
    except ValueError:
        colon = ""
    if not colon:
        return text, 1.0
    if not (math.isfinite(scale) and abs(scale) <= LORA_MAX_SCALE):
        raise argparse.ArgumentTypeError(
            f"scale must be in [-{LORA_MAX_SCALE:g}, {LORA_MAX_SCALE:g}], got {tail}"
        )
    if not source:
        raise argparse.ArgumentTypeError(
            f"needs a file, folder or Hub repo id before the scale, got {text!r}"
        )
    return source, scale


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
    p = Parser(prog="python -m cogvideox", description="CogVideoX: text, video or image to video")
    add_generation_flags(p)
    add_input_and_run_flags(p)
    p.add_argument("--version", action="version", version=f"cogvideox {__version__}")
    args = p.parse_args(argv)
    if args.strength is not None and args.video is None:
        p.error("--strength applies to --video only: pass --video too")
    if args.video is not None and args.image is not None:
        p.error("pass either --video or --image, not both")
    return args


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """The model, the prompt, the output, the sampling settings and where it runs."""
    d = RELEASE_DEFAULTS
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
    p.add_argument("--steps", type=integer(1, MAX_STEPS), help=f"default: {d.num_inference_steps}")
    p.add_argument("--guidance", type=guidance, help=f"default: {d.guidance_scale}")
    p.add_argument(
        "--frames",
        type=integer(1),
        help=f"8N+1 (16N+1 for CogVideoX 1.5); default: the model's ({d.num_frames})",
    )
    size = integer(16, MAX_SIZE, multiple=16)
    p.add_argument("--height", type=size, help=f"a multiple of 16; default: the model's ({d.height})")
    p.add_argument("--width", type=size, help=f"a multiple of 16; default: the model's ({d.width})")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: the model's")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--memory-mode", choices=["resident", "model", "sequential"], default=None)
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default=None, help="default: the checkpoint's")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument(
        "--quantize",
        choices=["int8", "fp8"],
        default=None,
        help="store the transformer's and T5's Linear weights in 8 bits (int8 needs torchao)",
    )


def add_input_and_run_flags(p: argparse.ArgumentParser) -> None:
    """The step cache, the start video or image, smoothing and torchrun's parallel modes."""
    p.add_argument(
        "--step-cache",
        type=step_cache,
        default=None,
        metavar="off|quality|fast|THRESHOLD",
        help="skip transformer passes on steps that change little (TeaCache): quality 0.1, fast 0.2; "
        "default off (every step computed)",
    )
    p.add_argument(
        "--video",
        type=input_file,
        metavar="PATH",
        help="video to video: an MP4, MOV, WebM, MKV, AVI or GIF, center-cropped to the size, resampled to "
        "8 fps and cut to 8N+1 frames (--frames defaults to its length, at most the model's)",
    )
    p.add_argument(
        "--strength",
        type=strength,
        metavar="S",
        help="with --video: how much of it is redrawn, in (0, 1]; default 0.8",
    )
    p.add_argument(
        "--image",
        type=input_file,
        metavar="PATH",
        help="image to video (image-to-video models): a PNG, JPEG, WebP or GIF, center-cropped to the size",
    )
    p.add_argument(
        "--smooth",
        action="store_true",
        help="motion-interpolated frames between the generated ones: 2T-1 frames written at twice the model's "
        "fps (16, or 32 for CogVideoX 1.5), the same duration",
    )
    p.add_argument(
        "--lora",
        type=lora_flag,
        action="append",
        default=[],
        metavar="SOURCE[:SCALE]",
        help="a LoRA: a .safetensors file (diffusers/PEFT, kohya or SAT layout), a folder holding one or a Hub repo "
        f"id, at SCALE in [-{LORA_MAX_SCALE:g}, {LORA_MAX_SCALE:g}] (default 1); repeat for several. The sidecar "
        "records each one's name, SHA-256 and scale",
    )
    p.add_argument(
        "--parallel",
        choices=["cfg", "sp", "cfg,sp"],
        default=None,
        help="under torchrun (torchrun --nproc-per-node N -m cogvideox ...), one clip on all N processes: "
        "cfg runs the two CFG passes on 2 of them (with --guidance > 1), sp splits the video tokens over "
        "the rest (the heads, 30 for 2B and 48 for 5B, must divide by it); rank 0 writes the output",
    )


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
    if args.parallel and os.environ.get("RANK", "0") != "0":
        # torchrun's other ranks: rank 0 checks the output, prints and writes for all; a crash still shows.
        with (
            open(os.devnull, "w") as quiet,
            contextlib.redirect_stderr(quiet),
            contextlib.redirect_stdout(quiet),
        ):
            return run(args, main_rank=False)
    return run(args)


def run(args: argparse.Namespace, main_rank: bool = True) -> int:
    if main_rank and (problem := check_output(args.output, args.overwrite)):
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
    from .pipeline import GenerationCancelled
    from .video import save_result

    # 1. The pipeline (configs only) and the call's arguments, checked before any weights load
    pipe, model = open_pipeline(args)
    if pipe is None:
        return 1
    kwargs, inputs = call_arguments(args, pipe)
    for source, scale in args.lora:  # read and checked now, folded into the weights as they load
        name = pipe.load_lora(source, scale)
        print(f"LoRA {name} at scale {scale:g}", file=sys.stderr)
    # 2. A parallel run's process group (and every rank's weights)
    parallel, load_s = start_parallel(args, pipe, kwargs)
    warn_before_run(args, pipe, model)
    # 3. The run, with a progress bar
    report = Progress()
    try:
        run = dict(callback=report.step, on_stage=report.stage, step_cache=args.step_cache, parallel=parallel)
        result = pipe(args.prompt, **run, **inputs, **kwargs)
    except GenerationCancelled as e:
        if report.interrupted:  # Ctrl-C, its KeyboardInterrupt lost in a finalizer: stopped at the next step
            raise KeyboardInterrupt from e
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        report.close()
    if result.frames is None:  # a parallel run's other ranks: rank 0 decodes and writes
        return 0
    # 4. The MP4 and its sidecar
    if args.smooth:
        report.stage("smoothing")
    saved = save_result(
        result,
        args.output,
        smooth=args.smooth,
        extra=sidecar_extra(args),
        timings=None if load_s is None else {"load": load_s},
        on_smooth_error=lambda e: print(
            f"warning: --smooth failed, writing the clip unsmoothed: {e}", file=sys.stderr
        ),
    )
    if "steps_computed" in result.timings:
        steps = result.timings["steps_computed"]
        print(f"step cache: {steps} of {kwargs['num_inference_steps']} steps computed", file=sys.stderr)
    print(
        f"wrote {args.output} ({saved.frames} frames at {saved.fps} fps, seed {result.seed}) and {saved.sidecar} "
        f"in {time.perf_counter() - report.start:.1f}s",
        file=sys.stderr,
    )
    return 0


def open_pipeline(args: argparse.Namespace):
    """The pipeline (configs and tokenizer only) and the model folder it reads; (None, None) after an error line."""
    from .pipeline import CogVideoXPipeline, check_device
    from .testing import tiny_random_checkpoint

    model = args.model
    if model == TINY_RANDOM:
        check_device(args.device)  # before spending seconds on writing a model
        try:
            model = tiny_random_checkpoint()
        except OSError as e:
            print(f"error: could not write the {TINY_RANDOM} model: {e}", file=sys.stderr)
            return None, None
    device = args.device
    if args.parallel:
        from .parallel import torchrun_device

        device = torchrun_device(args.device)  # cuda:LOCAL_RANK or cpu; an error outside torchrun
    pipe = CogVideoXPipeline.from_pretrained(
        model,
        device=device,
        dtype=args.dtype,
        memory_mode=args.memory_mode,
        scheduler=args.scheduler,
        compile=args.compile,
        quantize=args.quantize,
    )
    return pipe, model


def call_arguments(args: argparse.Namespace, pipe) -> tuple[dict, dict]:
    """The pipeline's keyword arguments (the model's defaults where a flag is left out) and its inputs (video= or
    image=, read at the generation size), all checked against the model: a ValueError before any weights."""
    import numpy as np

    from .video import MIN_INTERPOLATE_SIZE

    d = {**pipe.defaults, **image_size(args, pipe)}
    kwargs = dict(
        negative_prompt=args.negative_prompt,
        num_frames=d["num_frames"] if args.frames is None else args.frames,
        height=d["height"] if args.height is None else args.height,
        width=d["width"] if args.width is None else args.width,
        num_inference_steps=d["num_inference_steps"] if args.steps is None else args.steps,
        guidance_scale=d["guidance_scale"] if args.guidance is None else args.guidance,
        seed=args.seed,
    )
    # The model's limits, before any weights; an image-to-video model's checks with a stand-in for --image.
    size = kwargs["height"], kwargs["width"]
    stand_in = {"image": np.zeros((*size, 3), np.uint8)} if pipe.needs_image else {}
    pipe.validate(args.prompt, **kwargs, step_cache=args.step_cache, **stand_in)
    inputs = load_inputs(args, pipe, kwargs)  # may set num_frames: the video's length
    if inputs:
        pipe.validate(args.prompt, **kwargs, step_cache=args.step_cache, **inputs)
    if args.video is not None:
        print(
            f"--video: {kwargs['num_frames']} frames at 8 fps of {size[1]}x{size[0]} (center crop) from {args.video}",
            file=sys.stderr,
        )
    if args.smooth and kwargs["num_frames"] < 2:
        raise ValueError("--smooth needs 9 frames or more: it adds frames between the generated ones")
    if args.smooth and min(size) < MIN_INTERPOLATE_SIZE:
        raise ValueError(f"--smooth needs --height and --width of at least {MIN_INTERPOLATE_SIZE}")
    return kwargs, inputs


def image_size(args: argparse.Namespace, pipe) -> dict:
    """CogVideoX 1.5 image to video without --height/--width: the size from --image's shape (cogvideox.arguments.
    image_video_size: short side 768, long side up to 1360, multiples of 16); else nothing (the model's)."""
    from .arguments import image_video_size, size_follows_image
    from .media import image_size as read_size

    shape = (
        read_size(args.image)
        if args.image is not None and size_follows_image(pipe.transformer_config)
        else None
    )
    if shape is None or 0 in shape or (args.height, args.width) != (None, None):
        return {}
    height, width = image_video_size(pipe.transformer_config, pipe.vae_config, *shape)
    print(f"--image: {shape[1]}x{shape[0]}, made at {width}x{height} (its shape)", file=sys.stderr)
    return {"height": height, "width": width}


def start_parallel(args: argparse.Namespace, pipe, kwargs: dict):
    """--parallel: the degrees checked against the model, then the process group, then the weights on every rank;
    (the Parallel, seconds to load) or (None, None)."""
    if not args.parallel:
        return None, None
    from .parallel import start_from_torchrun

    t = time.perf_counter()
    size = kwargs["num_frames"], kwargs["height"], kwargs["width"]
    parallel = start_from_torchrun(
        args.parallel,
        pipe,
        *size,
        kwargs["guidance_scale"],
        on_load=lambda: print("loading model...", file=sys.stderr, flush=True),
    )
    return parallel, time.perf_counter() - t  # every rank's load, before the first collective of the run


def warn_before_run(args: argparse.Namespace, pipe, model) -> None:
    """What the user should know before waiting: tiny-random makes noise, and words past the prompt limit."""
    if args.model == TINY_RANDOM:
        d = pipe.defaults
        print(
            f"note: {TINY_RANDOM} has random weights, so its video is noise ({d['width']}x{d['height']}, at most "
            f"{pipe.max_frames} frames; kept in {model})",
            file=sys.stderr,
        )
    count = pipe.count_tokens(args.prompt)
    if count.dropped_tokens:
        print(
            f"warning: prompt is {count.n_tokens} tokens; {count.dropped_tokens} beyond {count.max_tokens} are "
            f"dropped: {count.dropped_text!r}",
            file=sys.stderr,
        )


def sidecar_extra(args: argparse.Namespace) -> dict:
    """What the sidecar says beyond the pipeline's settings: the model as asked for ("tiny-random" says more than
    the temporary folder it was written to) and the input files."""
    extra = {"model": args.model}
    for flag in ("video", "image"):
        if getattr(args, flag) is not None:
            extra[f"input_{flag}"] = str(getattr(args, flag))
    return extra


class Progress:
    """The CLI's stage lines and per-step progress bar with an ETA, on stderr; and Ctrl-C, seen for sure.

    A Ctrl-C raises KeyboardInterrupt wherever the main thread is, which can be inside a finalizer (a tensor's or a
    buffer's), where Python prints it and goes on. So the handler also sets `interrupted`, and the next step stops
    the run (the caller then exits 130 as for the KeyboardInterrupt itself)."""

    def __init__(self):
        self.start = self.stage_start = time.perf_counter()
        self.interrupted, self._before = False, None
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored
            self._before = signal.signal(signal.SIGINT, self._ctrl_c)

    def close(self) -> None:
        """Ctrl-C as it was (the run is over)."""
        if self._before is not None:
            signal.signal(signal.SIGINT, self._before)
            self._before = None

    def _ctrl_c(self, signum, frame):
        self.interrupted = True
        raise KeyboardInterrupt

    def step(self, step: int, total: int) -> bool:
        if self.interrupted:
            return False
        eta = (time.perf_counter() - self.stage_start) / step * (total - step)
        bar = "#" * (30 * step // total)
        end = "\n" if step == total else ""
        print(f"\r  [{bar:<30}] {step}/{total}  ETA {eta:5.1f}s", end=end, file=sys.stderr, flush=True)
        return True

    def stage(self, name: str) -> None:
        self.stage_start = time.perf_counter()
        print(f"{name}...", file=sys.stderr, flush=True)


def load_inputs(args: argparse.Namespace, pipe, kwargs: dict) -> dict:
    """--video / --image as the pipeline's video= (with strength=) / image= at the generation size, or a
    ValueError naming the flag; a video sets kwargs["num_frames"] to its length. Before any weights load."""
    from .arguments import takes_video
    from .media import load_image, load_video

    if pipe.needs_image and args.image is None:
        raise ValueError(f"{args.model} is an image-to-video model: pass --image")
    if args.image is not None and not pipe.needs_image:
        raise ValueError(
            f"--image needs an image-to-video model (like THUDM/CogVideoX-5b-I2V); {args.model} is text to video"
        )
    if args.video is not None and not takes_video(pipe.transformer_config):
        raise ValueError(
            f"--video needs a CogVideoX 1.0 text-to-video model (like THUDM/CogVideoX-2b); {args.model} "
            + (
                "starts from --image"
                if pipe.needs_image
                else "is CogVideoX 1.5, which does not start from a video"
            )
        )
    size = kwargs["height"], kwargs["width"]
    if args.image is not None:
        try:
            return {"image": load_image(args.image, *size)}
        except ValueError as e:
            raise ValueError(f"--image: {e}") from None
    if args.video is None:
        return {}
    try:
        video = load_video(args.video, *size, max_frames=args.frames or pipe.max_frames)
    except ValueError as e:
        raise ValueError(f"--video: {e}") from None
    if args.frames is not None and len(video) < args.frames:
        raise ValueError(
            f"--frames {args.frames} is more than {args.video.name} gives at 8 fps ({len(video)} "
            f"frames): pass fewer or leave --frames out to use its length"
        )
    kwargs["num_frames"] = len(video)
    return {"video": video, "strength": args.strength}


if __name__ == "__main__":
    sys.exit(main())
