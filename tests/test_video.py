"""MP4 / GIF writers: decode what was written and inspect the container."""

import json
import re
import struct
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from cogvideox.video import read_mp4, write_gif, write_mp4, write_sidecar


def smooth_frames(t: int = 9, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Random low-frequency colour fields drifting over time: compressible like real footage."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    freq, phase = rng.uniform(0.3, 1.0, size=(3, 2)), rng.uniform(0, 2 * np.pi, size=3)
    frames = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        for c in range(3):
            field = np.sin(2 * np.pi * (freq[c, 0] * x + freq[c, 1] * y) + phase[c] + 0.3 * i)
            frames[i, :, :, c] = np.round(127.5 + 100 * field)
    return frames


def ffmpeg_stream_info(path: Path) -> str:
    """The `Stream #0:0 ... Video: ...` line ffmpeg prints for an input file."""
    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True
    )
    return next(line for line in proc.stderr.decode().splitlines() if "Video:" in line)


def top_level_boxes(path: Path) -> list[str]:
    data, boxes, pos = path.read_bytes(), [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:  # 64-bit size follows
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        boxes.append(kind.decode("latin-1"))
        if size == 0:  # box runs to end of file
            break
        pos += size
    return boxes


def test_mp4_round_trip(tmp_path):
    frames = smooth_frames()
    path = write_mp4(frames, tmp_path / "out" / "clip.mp4", fps=8)
    assert path == tmp_path / "out" / "clip.mp4"

    decoded = read_mp4(path)
    assert decoded.shape == frames.shape
    err = np.abs(decoded.astype(np.float64) - frames).mean()
    assert err < 6, err

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    assert meta["fps"] == 8
    assert meta["codec"] == "h264"

    info = ffmpeg_stream_info(path)
    assert re.search(r"Video: h264\b", info), info
    assert "yuv420p(tv, bt709" in info, info
    assert "64x48" in info, info

    boxes = top_level_boxes(path)
    assert "moov" in boxes and "mdat" in boxes, boxes
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # faststart: index before media


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = smooth_frames(t=5, h=27, w=35)
    path = write_mp4(frames, tmp_path / "odd.mp4")
    assert "36x28" in ffmpeg_stream_info(path)
    decoded = read_mp4(path)
    assert decoded.shape == (5, 28, 36, 3)
    assert np.abs(decoded[:, :27, :35].astype(np.float64) - frames).mean() < 6


def test_mp4_flat_colours_survive(tmp_path):
    """Saturated flat colours come back within a few levels: RGB↔YUV matrix and range agree both ways."""
    colours = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 50, 100]])
    frames = np.broadcast_to(colours[:, None, None, :], (6, 32, 32, 3)).astype(np.uint8)
    decoded = read_mp4(write_mp4(frames, tmp_path / "flat.mp4"))
    assert np.abs(decoded[:, 8:24, 8:24].astype(int) - frames[:, 8:24, 8:24]).max() <= 3


@pytest.mark.parametrize("bad", [np.zeros((4, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8)])
def test_mp4_rejects_bad_frames(tmp_path, bad):
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(bad, tmp_path / "bad.mp4")


def test_gif_round_trip(tmp_path):
    frames = smooth_frames(t=6, h=20, w=30)
    path = write_gif(frames, tmp_path / "clip.gif", fps=8)
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert im.size == (30, 20)
        assert im.n_frames == 6
        assert im.info["loop"] == 0
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
            err = np.abs(np.asarray(im.convert("RGB"), dtype=np.float64) - frames[i]).mean()
            assert err < 10, (i, err)  # 256-colour palette per frame
    assert all(abs(d - 125) <= 10 for d in durations), durations  # GIF stores 10 ms units


def test_sidecar_next_to_video(tmp_path):
    settings = {"prompt": "a cat", "seed": 42, "guidance_scale": 6.0, "output": tmp_path / "clip.mp4"}
    path = write_sidecar(tmp_path / "clip.mp4", settings)
    assert path == tmp_path / "clip.json"
    assert json.loads(path.read_text()) == {**settings, "output": str(tmp_path / "clip.mp4")}
