"""Issue 13 in the app: the Speed choice (the pipeline's step cache) and the preview shown while a job denoises.

The speed reaches the pipeline and each clip's settings, through the API (gradio_client) and the page's events;
Render final renders without the cache; a bad value is a field error. A running job sends its preview, as an MP4
where the result will show, and the preview changes nothing in the final video."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import ValidationError

import app
from cogvideox import CogVideoXPipeline
from cogvideox.video import read_mp4
from webapp import clips, jobs, launch, validation
from webapp.validation import FULL, SPEEDS, check_inputs

GOOD = dict(
    prompt="a red fox trots through fresh snow",
    negative_prompt="",
    seed=7,
    steps=6,
    guidance_scale=6.0,
    num_frames=9,
)
QUIET = dict(progress=lambda *a, **k: None)


@pytest.fixture(scope="module")
def pipe(tiny_2b):
    return CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)


@pytest.fixture
def calls(monkeypatch):
    """Every pipeline call's kwargs and result, and every validate's kwargs."""
    seen = SimpleNamespace(runs=[], validated=[])
    call, validate = CogVideoXPipeline.__call__, CogVideoXPipeline.validate

    def spy_call(self, **kwargs):
        result = call(self, **kwargs)
        seen.runs.append((kwargs, result))
        return result

    def spy_validate(self, *args, **kwargs):
        if not args:  # the app's own check (the pipeline checks again, positionally)
            seen.validated.append(kwargs)
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(CogVideoXPipeline, "__call__", spy_call)
    monkeypatch.setattr(CogVideoXPipeline, "validate", spy_validate)
    return seen


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "outputs"
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out)))
    demo = app.create_demo(pipe, output_dir=out)
    args = launch.parse_args(["--port", str(app_port()), "--output-dir", str(out)])
    demo.launch(**launch.launch_options(args), prevent_thread_lock=True, quiet=True)
    try:
        yield demo, out
    finally:
        demo.close()
        env.undo()


def app_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_api_speed_reaches_the_pipeline_and_the_settings_and_its_default_is_full(server, calls):
    client = Client(server[0].local_url, verbose=False)
    for speed, cache in (("Fastest", "fast"), ("Faster", "quality")):
        _, _, settings = client.predict(**GOOD, speed=speed, api_name="/generate")
        assert calls.runs[-1][0]["step_cache"] == cache and settings["step_cache"] == cache
        assert calls.validated[-1]["step_cache"] == cache
        computed = calls.runs[-1][1].timings["steps_computed"]
        assert settings["steps_computed"] == computed and 1 <= computed <= GOOD["steps"]
    _, _, settings = client.predict(**GOOD, api_name="/generate")  # without speed: as before, every step
    assert calls.runs[-1][0]["step_cache"] is None and settings["step_cache"] is None
    assert "steps_computed" not in settings


@pytest.mark.parametrize("speed", ["Turbo", "fast", "", 2, ["Full"]])
def test_a_bad_speed_is_a_field_error(server, speed):
    client = Client(server[0].local_url, verbose=False)
    with pytest.raises(ValidationError, match="speed: "):
        client.predict(**GOOD, speed=speed, api_name="/generate")
    _, errors = check_inputs(None, *GOOD.values(), speed)
    assert "must be one of Full, Faster, Fastest" in errors["speed"]


def test_generate_and_draft_use_the_speed_chosen_and_render_final_renders_in_full(pipe, tmp_path, calls):
    demo = app.create_demo(pipe, output_dir=tmp_path)
    radio = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "speed")
    assert [v for _, v in radio.choices] == list(SPEEDS) and radio.value == FULL
    runs = [f for f in demo.fns.values() if f.name == "generate"]  # Generate, Draft, Render final
    assert len(runs) == 3
    finals = [f for f in runs if radio not in f.inputs]
    at = len(validation.FIELDS)  # speed follows the fields (then the optional video, strength, smooth)
    assert len(finals) == 1 and all(f.inputs[at] is radio for f in runs if f not in finals)
    final_speed = finals[0].inputs[at]
    assert final_speed.value == FULL and not final_speed.visible
    # The page's handler, called as Gradio calls it, with each input's value.
    texts = []
    for speed, cache in (("Fastest", "fast"), (final_speed.value, None)):
        *_, clip = list(runs[0].fn(*GOOD.values(), SimpleNamespace(session_hash="s"), speed=speed, **QUIET))[
            -1
        ]
        assert calls.runs[-1][0]["step_cache"] == cache and clip["settings"]["step_cache"] == cache
        assert ("steps_computed" in clip["settings"]) == (cache is not None)
        texts.append(clips.done_text(clip))
    computed = calls.runs[-2][1].timings["steps_computed"]
    assert f"Fastest: {computed} of them computed" in texts[0] and "6 steps" in texts[0]
    assert "computed" not in texts[1]


def test_a_running_job_shows_its_preview_and_the_preview_changes_nothing_in_the_video(pipe, tmp_path, calls):
    pipe.load()
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: time.sleep(0.1))  # a job of over a heartbeat
    renderer, previews = jobs.Renderer(pipe, tmp_path), []
    try:
        for output in renderer.generate(
            *{**GOOD, "steps": 8}.values(), SimpleNamespace(session_hash="p"), **QUIET
        ):
            if (
                isinstance(output[0], str) and "__type__" in output[3]
            ):  # a heartbeat (gr.skip()), not the clip
                path = Path(output[0])  # unguessable, in the output folder, as a clip's files are
                assert path.parent == tmp_path and clips.CLIP_NAME.match(path.name)
                previews.append(read_mp4(path))  # read now: the next one replaces it
            last = output
    finally:
        hook.remove()
    kwargs, result = calls.runs[-1]
    assert callable(kwargs["preview"]) and kwargs["preview_every"] == 1  # 8 steps: max(1, 8 // 10)
    latent_frames, h, w = (
        result.frames.shape[0] // 4 + 1,
        result.frames.shape[1] // 8,
        result.frames.shape[2] // 8,
    )
    assert previews and all(p.shape == (latent_frames, h * 4, w * 4, 3) for p in previews)
    clip = last[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([clip["name"], clip["name"][:-4] + ".json"])
    # The same seed without a preview renders the same frames.
    plain = {k: v for k, v in kwargs.items() if k not in ("preview", "preview_every", "callback", "on_stage")}
    assert np.array_equal(pipe(**plain).frames, result.frames)


def test_the_heartbeat_sends_each_new_preview_once(pipe, tmp_path, monkeypatch):
    written = []

    def write(frames, folder, fps):
        written.append(folder / f"{len(written)}.mp4")
        return written[-1]

    monkeypatch.setattr(jobs, "write_preview", write)
    pipe.load()
    hook = pipe.transformer.register_forward_pre_hook(
        lambda *_: time.sleep(1.2)
    )  # steps of over 2 heartbeats
    try:
        run = jobs.Renderer(pipe, tmp_path).generate(
            *{**GOOD, "steps": 2}.values(), SimpleNamespace(session_hash="q"), **QUIET
        )
        heartbeats = list(run)[:-1]
    finally:
        hook.remove()
    shown = [o[0] for o in heartbeats if isinstance(o[0], str)]
    assert written and shown == [str(p) for p in written]  # each once: the same file again restarts the video
    assert len(heartbeats) > len(shown)
