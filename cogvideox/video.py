"""Frames to browser-playable H.264 MP4 or looping GIF, plus a JSON sidecar with the generation settings."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
from PIL import Image

# Visually lossless for generated 480p clips at a few MB; x264's default preset.
CRF = 18
# Convert with the BT.709 matrix and tag it: untagged H.264 leaves browsers guessing 601 vs 709.
BT709 = (
    "scale=out_color_matrix=bt709:out_range=tv,"
    "setparams=range=tv:color_primaries=bt709:color_trc=bt709:colorspace=bt709"
)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3) with T > 0, got {frames.dtype} {frames.shape}")
    return frames


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` (same suffix, so encoders pick the format) renamed to `path` on success and
    removed on any failure, Ctrl-C included: `path` is either the whole new file or untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames as H.264 / yuv420p (BT.709) MP4 with the index up front.

    yuv420p needs even width and height: an odd size is padded by one replicated row/column, so the video
    is then one pixel larger than the frames.
    """
    frames = _check_frames(frames)
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    path = Path(path)
    with _atomic(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            size=(frames.shape[2], frames.shape[1]),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,  # we padded to even sizes; don't let imageio rescale to multiples of 16
            output_params=["-vf", BT709, "-crf", str(CRF), "-movflags", "+faststart"],
        )
        writer.send(None)
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        except BaseException:
            with suppress(Exception):  # ffmpeg may be gone already (Ctrl-C reaches it too)
                writer.close()
            raise
        writer.close()
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode a video to (T, H, W, 3) uint8 RGB frames."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    width, height = next(reader)["size"]
    frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
    return np.stack(frames)


def write_gif(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Save frames as a GIF that loops forever; each frame shows for 1/fps s (GIF stores 10 ms units)."""
    frames = _check_frames(frames)
    path = Path(path)
    images = [Image.fromarray(frame) for frame in frames]
    with _atomic(path) as tmp:
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def write_sidecar(path: str | Path, settings: dict[str, Any]) -> Path:
    """Write `settings` as JSON next to the video at `path` (same stem, `.json`)."""
    out = Path(path).with_suffix(".json")
    # default=str keeps values such as dtypes or paths readable instead of failing the whole save.
    text = json.dumps(settings, indent=2, default=str) + "\n"
    with _atomic(out) as tmp:
        tmp.write_text(text)
    return out
