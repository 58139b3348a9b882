"""Video to video and image to video against diffusers' CogVideoXVideoToVideoPipeline and
CogVideoXImageToVideoPipeline, loaded from the same tiny checkpoint folders; and the inputs they refuse."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox import CogVideoXPipeline
from cogvideox.config import TransformerConfig
from cogvideox.loading import load_module, load_state_dict_from_dir
from cogvideox.sampling import steps_to_run
from cogvideox.transformer import CogVideoXTransformer

PROMPT = "a wooden toy ship glides over a blue carpet"
RNG = np.random.default_rng(0)
VIDEO = RNG.integers(0, 256, (9, 64, 96, 3), dtype=np.uint8)  # the tiny models' size: 64x96
IMAGE = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    from cogvideox.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-i2v"), style="i2v", scheduler="CogVideoXDPMScheduler"
    )


def _frames(out) -> np.ndarray:
    return (out[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # (T, H, W, 3)


def _reference(cls_name: str, path, seed: int, **kwargs) -> np.ndarray:
    import diffusers

    ref = getattr(diffusers, cls_name).from_pretrained(path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return _frames(ref(prompt=PROMPT, generator=generator, output_type="pt", **kwargs).frames)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"max pixel diff {diff.max()}"
    assert ours.std() > 1  # not a blank video


@pytest.mark.parametrize(
    ("style", "kwargs"),
    [
        # int(steps · strength), not round(): DDIM 3.5 runs steps 5 to 7 of 7, DPM 3.6 runs 4 to 6 of 6
        ("2b", {"strength": 0.5, "num_inference_steps": 7}),
        ("5b", {"strength": 0.6, "num_inference_steps": 6, "use_dynamic_cfg": True}),
    ],
)
def test_video_to_video_matches_reference(style, kwargs, request):
    path = request.getfixturevalue(f"tiny_{style}")
    pipe = CogVideoXPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert not pipe.needs_image
    result = pipe(PROMPT, video=VIDEO, seed=1234, **kwargs)
    ref = _reference(
        "CogVideoXVideoToVideoPipeline", path, 1234, video=[Image.fromarray(f) for f in VIDEO], **kwargs
    )
    _assert_close(result.frames, ref)
    assert result.settings["mode"] == "video-to-video" and result.settings["strength"] == kwargs["strength"]
    assert result.settings["num_frames"] == len(VIDEO)  # from the video
    assert len(json.dumps(result.settings)) < 2000  # the sidecar records the mode, not the pixels


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_inference_steps": 2},  # 17 frames: the learned position table
        {
            "num_inference_steps": 2,
            "num_frames": 9,
            "guidance_scale": 1.0,
        },  # another length: sin-cos, as diffusers
    ],
)
def test_image_to_video_matches_reference(tiny_i2v, kwargs):
    pipe = CogVideoXPipeline.from_pretrained(tiny_i2v, device="cpu", dtype=torch.float32)
    assert pipe.needs_image
    result = pipe(PROMPT, image=IMAGE, seed=99, **kwargs)
    ref = _reference(
        "CogVideoXImageToVideoPipeline",
        tiny_i2v,
        99,
        image=Image.fromarray(IMAGE),
        **{"num_frames": 17, **kwargs},
    )
    _assert_close(result.frames, ref)
    assert result.settings["mode"] == "image-to-video" and result.settings["strength"] is None


def test_i2v_checkpoint_loads_strictly_with_its_learned_table(tiny_i2v):
    state = load_state_dict_from_dir(tiny_i2v / "transformer")
    config = TransformerConfig.from_json(tiny_i2v / "transformer" / "config.json")
    assert config.image_to_video and config.in_channels == 2 * config.out_channels
    with torch.device("meta"):
        model = CogVideoXTransformer(config)
    assert set(model.state_dict()) == set(state)
    model = load_module(model, tiny_i2v / "transformer", torch.float32)
    table = model.patch_embed.pos_embedding
    assert table.shape == (1, 226 + 5 * 4 * 6, 32) and torch.equal(table, state["patch_embed.pos_embedding"])
    assert (
        json.loads((tiny_i2v / "model_index.json").read_text())["_class_name"]
        == "CogVideoXImageToVideoPipeline"
    )
    # The table holds the sample grid (8x12 latents) only: the model itself refuses another height or width.
    latents, embeds = torch.zeros(1, 2, 8, 8, 10), torch.zeros(1, 226, 32)
    with pytest.raises(ValueError, match="8x12"):
        model(latents, embeds, torch.tensor([1]))
    assert model(torch.zeros(1, 2, 8, 8, 12), embeds, torch.tensor([1])).shape == (1, 2, 4, 8, 12)


def test_strength_runs_the_last_steps_and_the_step_cache_counts_those(tiny_2b):
    assert [steps_to_run(50, s) for s in (0.8, 1.0, 0.5, 0.01)] == [40, 50, 25, 0]
    assert (steps_to_run(7, 0.5), steps_to_run(6, 0.6)) == (3, 3)  # truncated as diffusers does: not 4
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    pipe.load()
    seen, timesteps, embed = [], [], pipe.transformer.embed
    pipe.transformer.embed = lambda x, text, t: timesteps.append(int(t[0])) or embed(x, text, t)
    result = pipe(
        PROMPT,
        video=VIDEO,
        strength=0.5,
        num_inference_steps=7,
        seed=0,
        step_cache=1e9,
        callback=lambda s, n: seen.append((s, n)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]  # int(3.5)
    assert timesteps == pipe.scheduler.timesteps(7)[4:].tolist()  # the last 3 of the 7
    assert (
        result.timings["steps_computed"] == 2
    )  # the first and the last of the 3 run, the middle one skipped
    assert result.settings["strength"] == 0.5 and "encode" in result.timings


def test_image_condition_composes_with_the_step_cache(tiny_i2v):
    pipe = CogVideoXPipeline.from_pretrained(tiny_i2v, device="cpu")
    cached = pipe(PROMPT, image=IMAGE, num_inference_steps=4, num_frames=9, seed=5, step_cache=1e9)
    assert cached.timings["steps_computed"] == 2
    full = pipe(PROMPT, image=IMAGE, num_inference_steps=4, num_frames=9, seed=5, step_cache=0)
    assert full.timings["steps_computed"] == 4
    assert cached.frames.shape == full.frames.shape == (9, 64, 96, 3)
    assert not np.array_equal(cached.frames, full.frames)


def _video(frames=9, height=64, width=96, dtype=np.uint8):
    return np.zeros((frames, height, width, 3), dtype=dtype)


@pytest.mark.parametrize(
    ("ok", "bad", "message"),
    [
        ({"video": _video(9)}, {"video": _video(10)}, r"8N\+1"),
        ({"video": _video(17)}, {"video": _video(25)}, "at most 17"),
        ({"video": _video(1)}, {"video": _video(0)}, "uint8 numpy array"),
        (
            {"video": _video(), "strength": 1.0},
            {"video": _video(), "strength": 1.01},
            r"strength must be .* \(0, 1\]",
        ),
        ({"video": _video(), "strength": 0.01}, {"video": _video(), "strength": 0}, r"\(0, 1\]"),
        ({"video": _video(), "strength": 0.5}, {"video": _video(), "strength": float("nan")}, r"\(0, 1\]"),
        ({"video": _video(), "strength": 0.5}, {"video": _video(), "strength": "0.5"}, r"\(0, 1\]"),
        ({"video": _video(), "strength": 1}, {"video": _video(), "strength": True}, r"\(0, 1\]"),
        ({"video": _video(), "strength": 0.5}, {"strength": 0.5}, "pass video="),
        ({"video": _video(), "num_frames": 9}, {"video": _video(), "num_frames": 17}, "video's length"),
        ({"video": _video(9, 48, 80), "height": 48, "width": 80}, {"video": _video(9, 48, 80)}, "48x80"),
        ({"video": _video()}, {"video": _video(dtype=np.float32)}, "uint8"),
        ({"video": _video()}, {"video": _video()[0]}, r"\(T, H, W, 3\)"),
        ({"video": _video()}, {"video": _video()[..., :1]}, r"\(T, H, W, 3\)"),
        ({"video": _video()}, {"video": list(_video())}, "numpy array"),
        (
            {"video": _video(), "strength": 0.25, "num_inference_steps": 4},
            {"video": _video(), "strength": 0.2, "num_inference_steps": 4},
            "runs no step",
        ),
        ({}, {"image": _video()[0]}, "image-to-video checkpoint"),
    ],
)
def test_text_to_video_checkpoint_refuses_bad_conditioning_before_loading(tiny_2b, ok, bad, message):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    base = {
        "prompt": PROMPT,
        "negative_prompt": "",
        "num_inference_steps": 100,
        "guidance_scale": 6.0,
        "seed": 0,
    }
    for kwargs, accepted in ((ok, True), (bad, False)):
        video = kwargs.get("video")
        frames = len(video) if isinstance(video, np.ndarray) and video.ndim == 4 else 17
        args = {**base, "num_frames": frames, "height": 64, "width": 96, **kwargs}
        if accepted:
            pipe.validate(**args)
        else:
            with pytest.raises(ValueError, match=message):
                pipe(**args)
    assert not pipe.loaded


@pytest.mark.parametrize(
    ("ok", "bad", "message"),
    [
        ({"image": _video()[0]}, {}, "pass image="),
        ({"image": _video()[0]}, {"image": _video()[0], "video": _video()}, "not both"),
        ({"image": _video()[0]}, {"image": _video()[0].astype(np.int16)}, "uint8"),
        ({"image": _video()[0]}, {"image": _video()}, r"\(H, W, 3\)"),
        ({"image": _video()[0]}, {"image": _video(1, 64, 80)[0]}, "64x80"),
        ({"image": _video()[0]}, {"image": _video(1, 48, 80)[0], "height": 48, "width": 80}, "support 64x96"),
    ],
)
def test_image_to_video_checkpoint_refuses_bad_conditioning_before_loading(tiny_i2v, ok, bad, message):
    pipe = CogVideoXPipeline.from_pretrained(tiny_i2v, device="cpu")
    pipe.validate(PROMPT, "", 17, 64, 96, 4, 6.0, 0, **ok)
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, num_inference_steps=4, seed=0, **bad)
    assert not pipe.loaded
