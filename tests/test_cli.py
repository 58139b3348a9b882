"""`python -m cogvideox` end to end on a tiny checkpoint: a real MP4 and its JSON sidecar."""

import json
import subprocess
import sys

from cogvideox import __version__
from cogvideox.video import read_mp4


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cogvideox", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_cli_writes_a_playable_mp4_and_sidecar(tiny_2b, tmp_path):
    out = tmp_path / "clips" / "ship.mp4"
    proc = run_cli("--model", tiny_2b, "--prompt", "a wooden toy ship", "--output", out, "--seed", 5,
                   "--steps", 2, "--frames", 9, "--guidance", 4.5, "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2/2" in proc.stderr and "denoising" in proc.stderr  # progress on the terminal
    frames = read_mp4(out)
    assert frames.shape == (9, 64, 96, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == 5 and meta["num_inference_steps"] == 2 and meta["guidance_scale"] == 4.5
    assert meta["prompt"] == "a wooden toy ship" and meta["model"] == str(tiny_2b)
    assert meta["num_frames"] == 9 and meta["fps"] == 8 and meta["cogvideox_version"] == __version__
    assert set(meta["timings"]) >= {"text", "denoise", "decode"}


def test_cli_refuses_bad_input_with_a_clear_message(tiny_2b, tmp_path):
    proc = run_cli("--model", tiny_2b, "--prompt", "x", "--output", tmp_path / "a.mp4", "--frames", 10)
    assert proc.returncode == 2
    assert "num_frames must be 8N+1" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--model", tmp_path / "nowhere", "--prompt", "x", "--output", tmp_path / "a.mp4")
    assert proc.returncode == 2 and "neither a checkpoint folder" in proc.stderr
    assert not (tmp_path / "a.mp4").exists()


def test_cli_asking_for_cuda_without_it_says_so_in_one_line(tiny_2b, tmp_path):
    proc = run_cli("--model", tiny_2b, "--prompt", "x", "--output", tmp_path / "a.mp4", "--device", "cuda")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: CUDA is not available on this machine; use --device cpu"
    assert not (tmp_path / "a.mp4").exists()


def test_cli_checks_the_output_before_loading_and_never_overwrites_unasked(tiny_2b, tmp_path):
    # A model that does not exist: any error about it would mean loading started before the output check.
    mp4, sidecar = tmp_path / "clip.mp4", tmp_path / "clip.json"
    mp4.write_bytes(b"someone else's video")
    proc = run_cli("--model", tmp_path / "nowhere", "--prompt", "x", "--output", mp4)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {mp4} already exists; choose another --output or pass --overwrite"
    )
    assert mp4.read_bytes() == b"someone else's video"
    mp4.unlink()
    sidecar.write_text("{}")  # an unrelated file of the same stem
    proc = run_cli("--model", tmp_path / "nowhere", "--prompt", "x", "--output", mp4)
    assert proc.returncode == 2 and f"{sidecar} already exists" in proc.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("--model", tmp_path / "nowhere", "--prompt", "x", "--output", blocker / "clip.mp4")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot write to {blocker}")
    # With --overwrite both are replaced by a real video and its settings.
    mp4.write_bytes(b"old")
    proc = run_cli("--model", tiny_2b, "--prompt", "x", "--output", mp4, "--overwrite", "--steps", 1,
                   "--frames", 9, "--seed", 1)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_mp4(mp4).shape == (9, 64, 96, 3) and json.loads(sidecar.read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "clip.json", "clip.mp4"]  # no temp files


def test_ctrl_c_while_denoising_prints_one_line_exits_130_and_writes_nothing(tiny_2b, tmp_path):
    import signal
    import time

    out = tmp_path / "clip.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cogvideox", "--model", str(tiny_2b), "--prompt", "x", "--output", str(out),
         "--steps", "1000", "--frames", "17", "--device", "cpu"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen, deadline = "", time.monotonic() + 120
    while "denoising..." not in seen and time.monotonic() < deadline:
        seen += proc.stderr.read(1)
    time.sleep(0.5)  # some steps in
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "interrupted: no video was written"
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import imageio_ffmpeg
    import numpy as np
    import pytest

    from cogvideox.video import write_mp4

    real = imageio_ffmpeg.write_frames

    def interrupted_after_three_frames(*args, **kwargs):
        writer, sent = real(*args, **kwargs), [0]

        class Writer:
            def send(self, frame):
                if frame is not None:
                    sent[0] += 1
                    if sent[0] > 3:
                        raise KeyboardInterrupt
                return writer.send(frame)

            def close(self):
                writer.close()

        return Writer()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", interrupted_after_three_frames)
    frames = np.zeros((9, 16, 16, 3), np.uint8)
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"the previous video")
    with pytest.raises(KeyboardInterrupt):
        write_mp4(frames, out)
    assert out.read_bytes() == b"the previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # the partial file is gone
