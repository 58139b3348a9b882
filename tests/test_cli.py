"""`python -m cogvideox` end to end on a tiny checkpoint: a real MP4 and its JSON sidecar."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from cogvideox import __version__
from cogvideox.__main__ import MAX_GUIDANCE, MAX_SEED, MAX_SIZE, MAX_STEPS, in_cli_terms, main
from cogvideox.video import read_mp4


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cogvideox", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_writes_a_playable_mp4_and_sidecar(tiny_2b, tmp_path):
    out = tmp_path / "clips" / "ship.mp4"
    proc = run_cli(
        "--model",
        tiny_2b,
        "--prompt",
        "a wooden toy ship",
        "--output",
        out,
        *["--seed", "5", "--steps", "2", "--frames", "9", "--guidance", "4.5", "--device", "cpu"],
    )
    assert proc.returncode == 0, proc.stderr
    assert "2/2" in proc.stderr and "denoising" in proc.stderr  # progress on the terminal
    frames = read_mp4(out)
    assert frames.shape == (9, 64, 96, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == 5 and meta["num_inference_steps"] == 2 and meta["guidance_scale"] == 4.5
    assert meta["prompt"] == "a wooden toy ship" and meta["model"] == str(tiny_2b)
    assert meta["num_frames"] == 9 and meta["fps"] == 8 and meta["cogvideox_version"] == __version__
    assert set(meta["timings"]) >= {"text", "denoise", "decode"}


def test_cli_refuses_a_model_that_is_not_there(tmp_path):
    proc = run_cli("--model", tmp_path / "nowhere", "--prompt", "x", "--output", tmp_path / "a.mp4")
    assert proc.returncode == 2 and "neither a checkpoint folder" in proc.stderr
    assert not (tmp_path / "a.mp4").exists()


def test_cli_tiny_random_needs_no_other_flags_and_is_written_once(tmp_path, monkeypatch):
    temp = tmp_path / "temp"  # the CLI's temp dir, where the model goes
    temp.mkdir()
    out = tmp_path / "out.mp4"
    proc = run_cli(
        *["--model", "tiny-random", "--prompt", "x", "--output"],
        out,
        "--device",
        "cpu",
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "random weights" in notes[0] and "96x64" in notes[0]
    assert "Writing model shards" not in proc.stderr
    assert read_mp4(out).shape == (17, 64, 96, 3)  # the model's defaults: 17 frames of 96x64
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == "tiny-random" and meta["num_inference_steps"] == 50
    model = temp / "cogvideox-tiny-random"
    assert [p for p in temp.iterdir() if p.name.startswith("cogvideox")] == [model]  # no staging left

    # Reused as it is; a folder without the completion marker (an interrupted write) is replaced.
    from cogvideox.testing import tiny_random_checkpoint

    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert tiny_random_checkpoint() == model and weights.stat().st_mtime_ns == written
    (model / ".complete").unlink()
    weights.unlink()
    assert tiny_random_checkpoint() == model and weights.is_file() and (model / ".complete").is_file()
    assert [p for p in temp.iterdir() if p.name.startswith("cogvideox")] == [model]


# Runs main() on each argv in a fresh interpreter, as `python -m cogvideox` would, and reports what it imported.
NOTHING_HEAVY = """
import contextlib, io, json, sys
from cogvideox.__main__ import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
    results.append([argv, rc, err.getvalue(), heavy])
print(json.dumps(results))
"""
HEAVY = ["torch", "transformers", "safetensors", "numpy", "PIL", "imageio_ffmpeg", "sentencepiece"]


def test_help_and_argument_errors_answer_at_once_in_one_line(tmp_path):
    # Timing asserts flake on a loaded 2-core CI; what made them slow (torch, transformers) is checked instead.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cogvideox", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert imported.isdisjoint(HEAVY), imported & set(HEAVY)
    assert proc.returncode == 0 and "tiny-random" in proc.stdout

    taken = tmp_path / "taken.mp4"
    taken.write_bytes(b"")
    cases = {  # argv after --prompt x: the flag the one-line message must name
        ("--steps", "0"): "--steps",
        ("--steps", "1001"): "--steps",
        ("--steps", "2.5"): "--steps",
        ("--frames", "0"): "--frames",
        ("--guidance", "0.99"): "--guidance",
        ("--guidance", "100.01"): "--guidance",
        ("--guidance", "nan"): "--guidance",
        ("--guidance", "inf"): "--guidance",
        ("--guidance", "1e400"): "--guidance",
        ("--height", "8"): "--height",
        ("--height", "0"): "--height",
        ("--height", "4112"): "--height",
        ("--width", "100"): "--width",
        ("--seed", "-1"): "--seed",
        ("--seed", str(2**32)): "--seed",
        ("--dtype", "fp8"): "--dtype",
        ("--memory-mode", "all"): "--memory-mode",
        ("--output", "clip.gif"): "--output",
        ("--output", str(taken)): "--overwrite",
        ("--strength", "0.5"): "--strength",
        ("--video", str(tmp_path / "none.mp4")): "--video",
        ("--image", str(tmp_path)): "--image",
        ("--video", str(taken), "--strength", "0"): "--strength",
    }
    argvs = [["--prompt", "x", "--model", str(tmp_path / "nowhere"), *argv] for argv in cases]
    argvs.append(["--steps", "3"])  # no --prompt
    proc = subprocess.run(
        [sys.executable, "-c", NOTHING_HEAVY, json.dumps(argvs), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for (argv, rc, err, heavy), flag in zip(results, [*cases.values(), "--prompt"], strict=True):
        assert rc == 2 and not heavy, (argv, rc, err, heavy)
        assert err.startswith("error: ") and err.count("\n") == 1 and flag in err, (argv, err)


@pytest.mark.parametrize(
    ("name", "flag", "low", "high"),
    [
        ("num_inference_steps", "--steps", 1, MAX_STEPS),
        ("num_frames", "--frames", 1, 17),
        ("guidance_scale", "--guidance", 1.0, MAX_GUIDANCE),
        ("height", "--height", 16, MAX_SIZE),
        ("width", "--width", 16, MAX_SIZE),
        ("seed", "--seed", 0, MAX_SEED - 1),
    ],
)
def test_library_limits_are_the_clis_and_its_messages_come_out_in_cli_names(tiny_2b, name, flag, low, high):
    from cogvideox.pipeline import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    ok = dict(
        prompt="x",
        negative_prompt="",
        num_frames=9,
        height=64,
        width=96,
        num_inference_steps=2,
        guidance_scale=6.0,
        seed=None,
    )
    step = 0.01 if name == "guidance_scale" else 1
    for edge in (low, high):
        pipe.validate(**{**ok, name: edge})  # the CLI's limits: the library takes them...
    for outside in (low - step, high + step):  # ...and refuses the value just beyond, in the CLI's words
        with pytest.raises(ValueError) as caught:
            pipe.validate(**{**ok, name: outside})
        message = in_cli_terms(str(caught.value))
        assert message.startswith(f"{flag} must") and name not in message.replace(flag, ""), message


def test_model_dependent_errors_name_the_cli_flags(tiny_2b, tmp_path, capsys):
    cases = [
        (["--frames", "10"], "--frames must be 8N+1 (1, 9, 17, ...) and at most 17, got 10"),
        (["--frames", "25"], "--frames must be in [1, 17], got 25"),
        (["--frames", "18"], "--frames must be in [1, 17], got 18"),
        (
            ["--prompt", " \u200b "],
            "--prompt must be a non-empty string (invisible characters alone do not count)",
        ),
        (["--device", "cuda:x"], "--device must be like cpu, cuda or cuda:1, got 'cuda:x'"),
    ]
    for argv, message in cases:
        out = tmp_path / "a.mp4"
        assert main(["--model", str(tiny_2b), "--prompt", "x", "--output", str(out), *argv]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


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
    proc = run_cli(
        "--model",
        tiny_2b,
        *["--prompt", "x", "--output"],
        mp4,
        *["--overwrite", "--steps", "1", "--frames", "9", "--seed", "1"],
    )
    assert proc.returncode == 0, proc.stderr
    assert read_mp4(mp4).shape == (9, 64, 96, 3) and json.loads(sidecar.read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "clip.json", "clip.mp4"]  # no temp files


def test_ctrl_c_while_denoising_prints_one_line_exits_130_and_writes_nothing(tiny_2b, tmp_path):
    import signal
    import time

    out = tmp_path / "clip.mp4"
    proc = subprocess.Popen(
        [
            sys.executable,
            *["-m", "cogvideox", "--model"],
            str(tiny_2b),
            *["--prompt", "x", "--output"],
            str(out),
            *["--steps", "1000", "--frames", "17", "--device", "cpu"],
        ],
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a test run started in the background (`make test &`, CI without a terminal) has
        # SIGINT ignored, and a child would inherit that and never see the Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
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


def test_step_cache_flag_reaches_the_pipeline_and_the_sidecar(tiny_2b, tmp_path):
    out = tmp_path / "cached.mp4"
    proc = run_cli(
        "--model",
        tiny_2b,
        "--prompt",
        "a kite",
        "--output",
        out,
        *["--seed", "3", "--steps", "6", "--frames", "9", "--device", "cpu", "--step-cache", "10"],
    )
    assert proc.returncode == 0, proc.stderr
    # The largest threshold: every step that may be skipped is (on random weights); the first and last always run.
    assert "step cache: 2 of 6 steps computed" in proc.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["step_cache"] == 10 and meta["timings"]["steps_computed"] == 2
    for bad in ("-0.1", "10.5", "nan", "slow"):
        proc = run_cli(
            "--model", tiny_2b, "--prompt", "x", "--output", tmp_path / "b.mp4", "--step-cache", bad
        )
        assert proc.returncode == 2 and proc.stderr.startswith("error: argument --step-cache: must be"), bad


# -- --smooth, --video, --image ------------------------------------------------------------------------------


def moving_clip(path, seconds: float, fps: int = 30, height: int = 80, width: int = 120):
    """A bright square crossing a dark frame: an MP4 at `fps`."""
    import numpy as np

    from cogvideox.video import write_mp4

    count = round(seconds * fps)
    frames = np.full((count, height, width, 3), 30, np.uint8)
    for i in range(count):
        x = (width - 20) * i // max(count - 1, 1)
        frames[i, 30:50, x : x + 20] = (240, 200, 60)
    return write_mp4(frames, path, fps=fps)


def test_cli_smooth_writes_the_generated_frames_interpolated_at_16_fps(tiny_2b, tmp_path, capsys):
    import imageio_ffmpeg
    import numpy as np

    from cogvideox.pipeline import CogVideoXPipeline
    from cogvideox.video import interpolate, write_mp4

    out = tmp_path / "smooth.mp4"
    assert (
        main(
            [
                "--model",
                str(tiny_2b),
                "--prompt",
                "a kite",
                *["--seed", "4", "--steps", "1", "--frames", "9", "--device", "cpu", "--output"],
                str(out),
                "--smooth",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "smoothing..." in err and "17 frames at 16 fps" in err
    doubled = read_mp4(out)
    assert doubled.shape == (17, 64, 96, 3)
    reader = imageio_ffmpeg.read_frames(str(out))
    assert next(reader)["fps"] == 16  # 17 frames at 16 fps: the duration of 9 at 8 fps
    reader.close()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["fps"] == 16 and meta["smooth"] is True and meta["num_frames"] == 9
    assert "smooth" in meta["timings"]
    # The same seed through the library: the file is its 9 frames, interpolated to 17, encoded at 16 fps.
    frames = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")(
        "a kite", num_frames=9, num_inference_steps=1, seed=4
    ).frames
    expected = read_mp4(write_mp4(interpolate(frames), tmp_path / "expected.mp4", fps=16))
    assert np.abs(doubled.astype(int) - expected).max() <= 1


def test_cli_video_to_video_converts_the_clip_and_records_it(tiny_2b, tmp_path, capsys):
    clip = moving_clip(tmp_path / "clip.mp4", seconds=2)  # 2 s at 30 fps, 120x80: 17 frames at 96x64
    out = tmp_path / "v2v.mp4"
    assert (
        main(
            [
                "--model",
                str(tiny_2b),
                "--prompt",
                "a kite",
                "--output",
                str(out),
                "--video",
                str(clip),
                *["--strength", "0.5", "--steps", "4", "--seed", "2", "--device", "cpu"],
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "--video: 17 frames at 8 fps of 96x64" in err and "encoding video..." in err
    assert "2/2" in err  # strength 0.5 of 4 steps: the last 2 run
    assert read_mp4(out).shape == (17, 64, 96, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["mode"] == "video-to-video" and meta["strength"] == 0.5 and meta["num_frames"] == 17
    assert meta["input_video"] == str(clip) and meta["fps"] == 8 and meta["smooth"] is False


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    from cogvideox.testing import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-i2v")
    return write_tiny_checkpoint(folder, style="i2v", scheduler="CogVideoXDPMScheduler")


def test_cli_image_to_video(tiny_i2v, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from cogvideox.pipeline import CogVideoXPipeline

    d = CogVideoXPipeline.from_pretrained(tiny_i2v, device="cpu").defaults
    image = tmp_path / "first.png"
    Image.fromarray(np.full((90, 160, 4), 200, np.uint8)).save(image)  # RGBA, another aspect ratio
    out = tmp_path / "i2v.mp4"
    assert (
        main(
            [
                "--model",
                str(tiny_i2v),
                "--prompt",
                "a kite",
                "--output",
                str(out),
                "--image",
                str(image),
                *["--steps", "1", "--frames", "9", "--device", "cpu"],
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert read_mp4(out).shape == (9, d["height"], d["width"], 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["mode"] == "image-to-video" and meta["input_image"] == str(image)


def test_cli_input_errors_in_one_line_before_weights(tiny_2b, tiny_i2v, tmp_path, monkeypatch, capsys):
    from cogvideox.pipeline import CogVideoXPipeline

    def no_weights(self, *args, **kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr(CogVideoXPipeline, "load", no_weights)
    files = tmp_path / "files"
    files.mkdir()
    clip = moving_clip(files / "clip.mp4", seconds=1)  # 9 frames at 8 fps
    (files / "random.mp4").write_bytes(bytes(range(256)) * 16)
    (files / "notes.txt").write_text("not a video\n")
    (files / "empty.mp4").write_bytes(b"")
    missing = files / "missing.mp4"
    cases = [  # (model, argv, the whole stderr line after "error: ")
        (tiny_2b, ["--video", missing], f"argument --video: no such file: {missing} (see --help)"),
        (tiny_2b, ["--video", files], f"argument --video: is not a file: {files} (see --help)"),
        (
            tiny_2b,
            ["--video", files / "random.mp4"],
            "--video: random.mp4 is not a video (MP4, MOV, WebM, MKV, "
            "AVI, GIF) or an image (PNG, JPEG, WebP) that can be read (moov atom not found)",
        ),
        (
            tiny_2b,
            ["--video", files / "notes.txt"],
            "--video: notes.txt is not a video (MP4, MOV, WebM, MKV, AVI, "
            "GIF) or an image (PNG, JPEG, WebP) that can be read (Invalid data found when processing input)",
        ),
        (tiny_2b, ["--video", files / "empty.mp4"], "--video: empty.mp4 is empty"),
        (tiny_2b, ["--strength", "0.5"], "--strength applies to --video only: pass --video too (see --help)"),
        (
            tiny_2b,
            ["--video", clip, "--strength", "0"],
            "argument --strength: must be in (0, 1], got 0 (see --help)",
        ),
        (
            tiny_2b,
            ["--video", clip, "--strength", "1.5"],
            "argument --strength: must be in (0, 1], got 1.5 (see --help)",
        ),
        (
            tiny_2b,
            ["--video", clip, "--strength", "nan"],
            "argument --strength: must be in (0, 1], got nan (see --help)",
        ),
        (
            tiny_2b,
            ["--video", clip, "--image", clip],
            "pass either --video or --image, not both (see --help)",
        ),
        (
            tiny_2b,
            ["--video", clip, "--frames", "17"],
            "--frames 17 is more than clip.mp4 gives at 8 fps (9 frames): "
            "pass fewer or leave --frames out to use its length",
        ),
        (
            tiny_2b,
            ["--video", clip, "--frames", "10"],
            "--frames must be 8N+1 (1, 9, 17, ...) and at most 17, got 10",
        ),
        (
            tiny_2b,
            ["--video", clip, "--strength", "0.1", "--steps", "5"],
            "strength 0.1 of 5 steps runs no step: raise strength or num_inference_steps",
        ),
        (
            tiny_2b,
            ["--smooth", "--frames", "1"],
            "--smooth needs 9 frames or more: it adds frames between the generated ones",
        ),
        (tiny_2b, ["--smooth", "--height", "16"], "--smooth needs --height and --width of at least 32"),
        (
            tiny_2b,
            ["--image", clip],
            f"--image needs an image-to-video model (like THUDM/CogVideoX-5b-I2V); {tiny_2b} "
            "is text to video",
        ),
        (tiny_i2v, [], f"{tiny_i2v} is an image-to-video model: pass --image"),
        (
            tiny_i2v,
            ["--image", files / "random.mp4"],
            "--image: random.mp4 is not a video (MP4, MOV, WebM, MKV, AVI, "
            "GIF) or an image (PNG, JPEG, WebP) that can be read (moov atom not found)",
        ),
    ]
    out = tmp_path / "out" / "a.mp4"
    for model, argv, message in cases:
        try:
            rc = main(["--model", str(model), "--prompt", "x", "--output", str(out), *map(str, argv)])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and err == f"error: {message}\n", (argv, err)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_an_output_named_in_upper_case_is_an_mp4_too(tmp_path):
    from cogvideox.__main__ import check_output

    assert check_output(tmp_path / "CLIP.MP4", overwrite=False) is None  # as Windows and cameras name them
    assert check_output(tmp_path / "clip.mov", overwrite=False) == "--output must end in .mp4"
