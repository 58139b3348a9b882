"""MP4 / GIF writers and frame interpolation: decode what was written and inspect the container."""

import itertools
import json
import re
import struct
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from cogvideox import video
from cogvideox.video import interpolate, read_mp4, smooth_clip, write_gif, write_mp4, write_sidecar


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


# -- frame interpolation -------------------------------------------------------------------------------------

BACKGROUND, SQUARE = (20, 40, 60), (230, 200, 40)


def square_at(x: int, h: int = 48, w: int = 64) -> np.ndarray:
    frame = np.empty((h, w, 3), np.uint8)
    frame[:] = BACKGROUND
    frame[16:32, x : x + 12] = SQUARE
    return frame


def moving_square(t: int = 9, step: int = 4) -> np.ndarray:
    return np.stack([square_at(4 + step * i) for i in range(t)])


def square_x(frame: np.ndarray) -> float:
    """The square's left edge: the mean column of its yellow pixels, less half its width."""
    yellow = (frame[..., 0] > 150) & (frame[..., 2] < 100)
    return np.nonzero(yellow)[1].mean() - 5.5


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / ((a.astype(np.float64) - b) ** 2).mean()))


def test_interpolate_keeps_the_frames_and_moves_between_them():
    frames = moving_square()  # 4 px a frame
    out = interpolate(frames)
    assert out.shape == (17, 48, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[::2], frames)  # the generated frames, exactly, at the even indices
    for k in (5, 6, 7):  # past ffmpeg's first estimates (its motion search starts without history)
        between = out[2 * k + 1]
        assert square_x(between) == pytest.approx(4 + 4 * k + 2, abs=0.5)  # halfway, not at either end
        assert mae(between, square_at(4 + 4 * k + 2)) < 0.5  # the square moved, not faded
        blend = (frames[k].astype(np.float64) + frames[k + 1]) / 2
        assert min(mae(between, frames[k]), mae(between, frames[k + 1]), mae(between, blend)) > 1.5
    assert all(4 + 4 * (i // 2) <= square_x(out[i]) <= 4 + 4 * (i // 2 + 1) for i in range(1, 17, 2))


@pytest.mark.parametrize("factor", [3, 4])
def test_interpolate_factors_and_odd_sizes(factor):
    frames = np.stack([square_at(4 + 6 * i, h=37, w=61) for i in range(5)])
    out = interpolate(frames, factor)
    assert out.shape == (factor * 4 + 1, 37, 61, 3)
    assert np.array_equal(out[::factor], frames)
    xs = [square_x(frame) for frame in out]
    assert all(a < b for a, b in itertools.pairwise(xs))  # the square advances at every frame


def test_a_smooth_clip_is_written_at_16_fps_and_keeps_its_duration(tmp_path):
    frames = moving_square()
    smooth, fps = smooth_clip(frames, fps=8)
    assert fps == 16
    path = write_mp4(smooth, tmp_path / "smooth.mp4", fps=fps)
    plain = write_mp4(frames, tmp_path / "plain.mp4", fps=8)
    decoded = read_mp4(path)
    assert decoded.shape == (17, 48, 64, 3)
    reader = imageio_ffmpeg.read_frames(str(path))
    assert next(reader)["fps"] == 16
    reader.close()

    def duration(p: Path) -> float:
        proc = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(p)], capture_output=True
        )
        h, m, s = re.search(r"Duration: (\d+):(\d+):([\d.]+)", proc.stderr.decode()).groups()
        return 3600 * int(h) + 60 * int(m) + float(s)

    assert duration(path) == pytest.approx(17 / 16, abs=0.011) and duration(plain) == pytest.approx(
        9 / 8, abs=0.011
    )
    assert abs(duration(path) - duration(plain)) <= 1 / 8  # the same clip, within one original frame
    for i in (0, 8, 16):  # first, middle, last: the generated frames, through H.264
        assert psnr(decoded[i], frames[i // 2]) > 30, i
    assert mae(decoded[9], square_at(22)) < 4  # an in-between one: the square halfway from 20 to 24


@pytest.mark.parametrize(
    ("frames", "factor", "message"),
    [
        (np.zeros((4, 48, 64, 3), np.float32), 2, "uint8"),
        (np.zeros((48, 64, 3), np.uint8), 2, "uint8"),
        (np.zeros((1, 48, 64, 3), np.uint8), 2, "at least 2 frames"),
        (np.zeros((3, 16, 64, 3), np.uint8), 2, "at least 32 pixels"),
        (np.zeros((3, 48, 64, 3), np.uint8), 1, "factor"),
        (np.zeros((3, 48, 64, 3), np.uint8), 5, "factor"),
        (np.zeros((3, 48, 64, 3), np.uint8), 2.0, "factor"),
        (np.zeros((3, 48, 64, 3), np.uint8), True, "factor"),
    ],
)
def test_interpolate_refuses_bad_input(frames, factor, message):
    with pytest.raises(ValueError, match=message):
        interpolate(frames, factor)


def test_interpolate_failures_are_one_runtime_error_with_ffmpegs_reason(monkeypatch):
    with pytest.raises(RuntimeError, match=r"took longer than 0\.001 s"):
        interpolate(moving_square(), timeout=0.001)
    monkeypatch.setattr(
        video, "MIN_INTERPOLATE_SIZE", 1
    )  # let frames through that minterpolate itself refuses
    with pytest.raises(
        RuntimeError,
        match=r"frame interpolation failed \(ffmpeg exit code \d+, 0 of 5 frames\): "
        r".*Height or width < 32",
    ):
        interpolate(np.zeros((3, 16, 16, 3), np.uint8))


# -- save_result: the one path from a generation to its files (the CLI's and the app's) ------------------------


def a_result(**timings):
    from cogvideox.pipeline import GenerationResult

    settings = {"prompt": "a square", "seed": 3, "num_frames": 9, "fps": 8, "model": "/tmp/folder"}
    return GenerationResult(moving_square(), 3, 8, settings, timings={"denoise": 1.5, **timings})


def test_save_result_writes_the_mp4_and_a_sidecar_of_the_settings_timings_and_extras(tmp_path):
    import time

    saved = video.save_result(
        a_result(steps_computed=2),
        tmp_path / "clip.mp4",
        extra={"model": "tiny-random", "fps": 99, "input_video": "in.mp4"},
        timings={"load": 4.0},
        started=time.perf_counter() - 1,
    )
    assert read_mp4(saved.mp4).shape == (9, 48, 64, 3) and (saved.frames, saved.fps) == (9, 8)
    meta = json.loads((tmp_path / "clip.json").read_text())
    assert saved.sidecar == tmp_path / "clip.json" and {**saved.settings, "timings": saved.timings} == meta
    # extra adds and overrides settings, but the file's fps is the file's
    assert (meta["model"], meta["input_video"], meta["fps"], meta["seed"]) == ("tiny-random", "in.mp4", 8, 3)
    assert meta["smooth"] is False and not saved.smoothed and "frames_written" not in meta
    assert meta["steps_computed"] == 2 and 1 <= meta["time_taken_s"] < 30
    assert meta["timings"] == {"denoise": 1.5, "steps_computed": 2, "load": 4.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json", "clip.mp4"]  # no temp files


def test_save_result_smoothed_says_so_and_keeps_the_generated_frame_count(tmp_path):
    saved = video.save_result(a_result(), tmp_path / "clip.mp4", smooth=True)
    assert read_mp4(saved.mp4).shape == (17, 48, 64, 3) and (saved.frames, saved.fps) == (17, 16)
    meta = json.loads(saved.sidecar.read_text())
    assert (meta["smooth"], meta["fps"], meta["frames_written"], meta["num_frames"]) == (True, 16, 17, 9)
    assert saved.smoothed and "smooth" in meta["timings"] and "steps_computed" not in meta
    assert "time_taken_s" not in meta  # only with started=


def test_save_result_when_smoothing_fails_writes_unsmoothed_or_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "INTERPOLATE_TIMEOUT_S", 0.001)  # real ffmpeg, stopped: a RuntimeError
    errors = []
    saved = video.save_result(a_result(), tmp_path / "a.mp4", smooth=True, on_smooth_error=errors.append)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "took longer" in str(errors[0])
    assert read_mp4(saved.mp4).shape[0] == 9 and saved.fps == 8 and saved.settings["smooth"] is False
    assert "smooth" not in saved.timings
    with pytest.raises(RuntimeError, match="took longer"):  # no on_smooth_error: the error, and no files
        video.save_result(a_result(), tmp_path / "b.mp4", smooth=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.mp4"]


def test_save_result_refuses_a_result_without_frames(tmp_path):
    result = a_result()
    result.frames = None  # a parallel run's rank other than 0
    with pytest.raises(ValueError, match="no frames"):
        video.save_result(result, tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []
