"""CogVideoX 1.5 in the page and on the command line (issue 23): lengths at the model's rate, the size of an
image-to-video clip from the image's shape, what the page says the model makes, Smooth where it adds something,
and bad input refused by the button (the CLI: one line, exit 2) before any weights load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import app
from cogvideox import CogVideoXPipeline
from cogvideox.config import PRESETS
from webapp import events, launch, uploads
from webapp.request import Request, RequestError
from webapp.validation import check_inputs, frame_counts

PROMPT = "a wooden toy ship glides over a blue carpet"


@pytest.fixture(scope="module")
def pipes(tiny_2b, tmp_path_factory):
    from cogvideox.testing import write_tiny_checkpoint

    def opened(path, name):
        pipe = CogVideoXPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
        pipe.model_id = name
        return pipe

    folder = tmp_path_factory.mktemp("page15")
    return {
        "2b": opened(tiny_2b, "tiny-2b"),
        "1.5": opened(write_tiny_checkpoint(folder / "t2v", style="1.5"), "CogVideoX1.5-5B"),
        "1.5-i2v": opened(
            write_tiny_checkpoint(folder / "i2v", style="1.5-i2v", scheduler="CogVideoXDPMScheduler"),
            "CogVideoX1.5-5B-I2V",
        ),
    }


def values(**changes) -> dict:
    return {"prompt": PROMPT, "negative_prompt": "", "seed": 1, "steps": 2, "guidance_scale": 6.0, **changes}


def test_lengths_follow_the_models_rate_and_frame_rule(pipes):
    # 1.0: 8N+1 at 8 fps; 1.5: 16N+1 at 16 fps (the tiny ones: at most 17 and 33 frames, both 2 s).
    assert list(frame_counts(pipes["2b"])) == [9, 17] and list(frame_counts(pipes["1.5"])) == [17, 33]
    assert list(frame_counts(None)) == [9, 17, 25, 33, 41, 49]  # no model: the release's
    for frames, ok in ((9, False), (17, True), (25, False), (33, True), (49, False)):
        _, errors = check_inputs(pipes["1.5"], **values(num_frames=frames))
        assert (errors == {}) is ok and errors.get(
            "num_frames", "must be one of 17, 33"
        ) == "must be one of 17, 33"
    assert check_inputs(pipes["2b"], **values(num_frames=9))[1] == {}
    assert check_inputs(pipes["2b"], **values(num_frames=25))[1] == {"num_frames": "must be one of 9, 17"}
    # Smooth doubles 8 fps to 16; at 16 fps it is not offered (docs/app.md says why).
    assert check_inputs(pipes["2b"], **values(num_frames=17), smooth=True)[1] == {}
    assert check_inputs(pipes["1.5"], **values(num_frames=17), smooth=True)[1] == {
        "smooth": "is not offered for this model: it makes 16 fps already (send false)"
    }
    assert check_inputs(pipes["1.5"], **values(num_frames=17), smooth=False)[1] == {}


def test_the_page_offers_seconds_at_the_models_rate_and_says_what_it_makes(pipes, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(tmp_path)))
    shown = {}
    for name in ("2b", "1.5"):
        demo = app.create_demo(pipes[name], output_dir=tmp_path / name)
        by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        shown[name] = (
            [label for label, _ in by_id["frames"].choices],
            by_id["frames"].value,
            by_id["smooth"].visible,
            by_id["from-video"].visible,
            demo.fns,
        )
    assert shown["2b"][:4] == (["1 s (9 frames)", "2 s (17 frames)"], 17, True, True)
    assert shown["1.5"][:4] == (["1 s (17 frames)", "2 s (33 frames)"], 17, False, False)
    rows, _ = app._load_presets(
        pipes["1.5"]
    )  # a preset's 49 frames (1.0's 6 s) is no 1.5 length: its default
    assert {row[4] for row in rows} == {17}
    line = events.model_status(pipes["1.5"], "")
    assert (
        line
        == "⏳ **CogVideoX1.5-5B** · up to 2 s at 16 fps, 96×64 · it loads at the first video, which takes a while"
    )
    assert events.model_status(pipes["2b"], "").startswith("⏳ **tiny-2b** · up to 2 s at 8 fps, 96×64 ·")
    i2v = events.model_status(pipes["1.5-i2v"], "")
    assert "up to 2 s at 16 fps, your image's shape up to 96×64" in i2v and "cpu" not in line + i2v


def test_image_to_video_sizes_follow_the_images_shape_within_the_grid(pipes):
    from cogvideox.arguments import image_video_size

    # The released 1.5 I2V: short side 768, long side up to 1360 (multiples of 16); the grid has 768 rows.
    t, v = PRESETS["1.5-i2v"]["transformer"], PRESETS["1.5-i2v"]["vae"]
    for (h, w), size in {
        (1080, 1920): (768, 1360),  # 16:9
        (600, 800): (768, 1024),  # 4:3: not the default 1360
        (1000, 1000): (768, 768),
        (1000, 2350): (768, 1360),  # wider than 1360:768: cropped to it
        (1920, 1080): (768, 432),  # portrait: 768 tall at most
        (3000, 1000): (768, 432),  # narrower than 768:1360: cropped to it
    }.items():
        assert image_video_size(t, v, h, w) == size, (h, w)
    # 1.0's I2V (learned positions) and the tiny 1.5 one (a 64x96 grid)
    assert image_video_size(PRESETS["5b-i2v"]["transformer"], PRESETS["5b-i2v"]["vae"], 600, 800) == (
        480,
        720,
    )
    tiny = pipes["1.5-i2v"].transformer_config, pipes["1.5-i2v"].vae_config
    assert [image_video_size(*tiny, *hw) for hw in ((60, 80), (50, 100), (80, 60))] == [
        (64, 80),
        (64, 96),
        (64, 48),
    ]


def test_a_page_request_reads_the_image_at_its_shape_and_refuses_what_15_cannot_do(
    pipes, tmp_path, monkeypatch
):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # uploads are read from Gradio's folder only
    image = tmp_path / "four-three.png"
    Image.fromarray(np.full((300, 400, 3), 120, np.uint8)).save(image)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    upload = {"path": str(image), "orig_name": "four-three.png"}
    request = Request.check(pipes["1.5-i2v"], values(num_frames=17, image=upload))
    assert request.kwargs["image"].shape == (64, 80, 3) and (
        request.kwargs["height"],
        request.kwargs["width"],
    ) == (64, 80)
    assert uploads.describe(pipes["1.5-i2v"], upload, "image")[0].endswith("cropped to 80×64.")
    refusals = {
        "video": (
            pipes["1.5"],
            {"video": {"path": str(video)}},
            "CogVideoX 1.5 starts from text or an image",
        ),
        "image": (pipes["1.5"], {"image": upload}, "is not used by this model"),
        "num_frames": (pipes["1.5-i2v"], {"num_frames": 25, "image": upload}, "must be one of 17, 33"),
    }
    for field, (pipe, changes, message) in refusals.items():
        with pytest.raises(RequestError) as refused:
            Request.check(pipe, values(**{"num_frames": 17, **changes}))
        assert message in refused.value.problems[field], refused.value.problems
    assert events.refusal({"num_frames": "must be one of 17, 33"}).endswith(
        "Length (frames) must be one of 17, 33.</span>"
    )


def run_cli(argv, capsys) -> tuple[int, str]:
    from cogvideox.__main__ import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_takes_the_15_models_defaults_and_its_images_shape(pipes, tmp_path, capsys, monkeypatch):
    t2v, i2v = (str(pipes[k].root) for k in ("1.5", "1.5-i2v"))
    image = tmp_path / "wide.png"
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(image)
    out = tmp_path / "i2v.mp4"
    common = ["--prompt", "a kite", "--steps", "1", "--device", "cpu"]
    code, err = run_cli(["--model", i2v, *common, "--output", out, "--image", image], capsys)
    assert code == 0, err
    meta = json.loads(
        out.with_suffix(".json").read_text()
    )  # frames and fps from the 1.5 config, size from the image
    assert (meta["num_frames"], meta["fps"], meta["height"], meta["width"]) == (17, 16, 64, 80)
    assert "--image: 400x300, made at 80x64" in err

    def no_weights(self, *args, **kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr(CogVideoXPipeline, "load", no_weights)
    bad = [
        (t2v, ["--frames", "25"], "--frames must be 16N+1 (1, 17, 33, ...) and at most 33, got 25"),
        (t2v, ["--height", "80"], "--height must be in [16, 64], got 80"),
        (t2v, ["--image", image], "--image needs an image-to-video model"),
        (t2v, ["--video", image], "is CogVideoX 1.5, which does not start from a video"),
        (i2v, ["--image", image, "--width", "112"], "--width must be in [16, 96], got 112"),
    ]
    for model, flags, message in bad:
        code, err = run_cli(["--model", model, *common, "--output", tmp_path / "no.mp4", *flags], capsys)
        assert (
            code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
        ), err
