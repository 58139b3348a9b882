"""From decoded frames to a playable clip: `write_mp4` (what the page waits for) against `write_gif` (made only
when someone asks for one), at the release size 720x480x49.

    python -m benchmarks.bench_video [--frames 49 --height 480 --width 720 --repeats 3 --content random]

Random uint8 frames (the default) are the encoders' worst case: nothing to predict or compress. `--content smooth`
moves soft gradients and a little noise across the frames, nearer a generated clip.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cogvideox.video import write_gif, write_mp4


def seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def make_frames(content: str, t: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if content == "random":
        return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(t):  # three drifting waves, one per channel, plus sensor-like noise
        waves = [np.sin((x * (1 + c) + y * (2 - c) + 9 * i) / (40 + 15 * c)) for c in range(3)]
        image = 127.5 + 100 * np.stack(waves, axis=-1) + rng.normal(0, 6, (h, w, 3))
        frames[i] = image.clip(0, 255).astype(np.uint8)
    return frames


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--content", choices=("random", "smooth"), default="random")
    args = p.parse_args(argv)
    frames = make_frames(args.content, args.frames, args.height, args.width)
    shape = f"{args.width}x{args.height}x{args.frames}, {args.content} uint8, {os.cpu_count()} CPUs"
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = seconds(lambda: write_mp4(frames, Path(tmp) / "clip.mp4", fps=args.fps), args.repeats)
        gif = seconds(lambda: write_gif(frames, Path(tmp) / "clip.gif", fps=args.fps), args.repeats)
        sizes = {name: (Path(tmp) / f"clip.{name}").stat().st_size / 2**20 for name in ("mp4", "gif")}
    print(
        f"frames -> playable MP4 ({shape}): median {statistics.median(mp4):.2f} s of {args.repeats} "
        f"({sizes['mp4']:.1f} MiB): what the page waits for"
    )
    print(
        f"frames -> GIF          ({shape}): median {statistics.median(gif):.2f} s of {args.repeats} "
        f"({sizes['gif']:.1f} MiB): only when asked for"
    )


if __name__ == "__main__":
    main()
