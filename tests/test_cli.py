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
