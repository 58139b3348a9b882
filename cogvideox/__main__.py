"""python -m cogvideox --model PATH_OR_ID --prompt TEXT --output out.mp4"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import __version__
from .pipeline import CogVideoXPipeline, GenerationCancelled
from .video import write_mp4, write_sidecar


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cogvideox", description="CogVideoX text-to-video")
    p.add_argument("--model", default="THUDM/CogVideoX-2b", help="checkpoint folder or Hub repo id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--output", default="output.mp4", type=Path, help="an .mp4 path (its .json sidecar goes beside)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output (and its .json) if they exist")
    p.add_argument("--seed", type=int, default=None, help="default: random (printed and saved)")
    p.add_argument("--steps", type=int, default=None, help="default: 50")
    p.add_argument("--guidance", type=float, default=None, help="default: 6.0")
    p.add_argument("--frames", type=int, default=None, help="8N+1; default: the model's (49)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: the model's")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--memory-mode", choices=["resident", "model", "sequential"], default=None)
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default=None, help="default: the checkpoint's")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
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
    except (ValueError, GenerationCancelled) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no video was written", file=sys.stderr)
        return 130
    except OSError as e:  # the disk filled up, the folder went away
        print(f"error: could not write {args.output}: {e}", file=sys.stderr)
        return 1


def generate(args: argparse.Namespace) -> int:
    pipe = CogVideoXPipeline.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        memory_mode=args.memory_mode,
        scheduler=args.scheduler,
        compile=args.compile,
    )
    kwargs = dict(
        negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height, width=args.width,
        num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
    )  # fmt: skip
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

    result = pipe(args.prompt, callback=progress, on_stage=stage, **kwargs)
    # Each file is written beside its final name and renamed: an interrupted write leaves no partial file.
    write_mp4(result.frames, args.output, fps=result.fps)
    sidecar = write_sidecar(args.output, {**result.settings, "timings": result.timings})
    print(f"wrote {args.output} ({len(result.frames)} frames, seed {result.seed}) and {sidecar} "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
