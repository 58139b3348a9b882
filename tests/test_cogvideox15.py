"""CogVideoX 1.5 against diffusers' CogVideoXPipeline and CogVideoXImageToVideoPipeline, loaded from the same tiny
1.5-layout checkpoints (temporal patches, sliced RoPE, padded latent frames, the I2V `ofs` embedding, inverted
latent scaling, a 224-token prompt); and the inputs a 1.5 model refuses before any weights load."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox import CogVideoXPipeline
from cogvideox.arguments import check_size
from cogvideox.config import PRESETS, GenerationDefaults
from cogvideox.loading import load_state_dict_from_dir
from cogvideox.transformer import CogVideoXTransformer

PROMPT = "a wooden toy ship glides over a blue carpet"
TEXT_LEN = 224  # the tiny 1.5 checkpoints' max_text_seq_length; diffusers' pipelines default to 226


@pytest.fixture(scope="module")
def tiny_15_i2v(tmp_path_factory):
    from cogvideox.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-15-i2v"), style="1.5-i2v", scheduler="CogVideoXDPMScheduler"
    )


def _reference(cls_name: str, path, seed: int, **kwargs):
    import diffusers

    ref = getattr(diffusers, cls_name).from_pretrained(path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs.setdefault("output_type", "pt")
    return ref(prompt=PROMPT, generator=generator, max_sequence_length=TEXT_LEN, **kwargs).frames


def _assert_close(ours: np.ndarray, ref: torch.Tensor) -> None:
    ref = (ref[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # (T, H, W, 3)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"max pixel diff {diff.max()}"
    assert ours.std() > 1  # not a blank video


def _pipe(path) -> CogVideoXPipeline:
    return CogVideoXPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)


def test_parameter_names_are_the_checkpoint_keys(tiny_15_i2v):
    """Our state dict is diffusers' (the released 1.5 weights' names), and the weights load strictly."""
    from diffusers import CogVideoXTransformer3DModel

    theirs = CogVideoXTransformer3DModel.from_pretrained(tiny_15_i2v / "transformer").state_dict()
    pipe = _pipe(tiny_15_i2v)
    pipe.load()
    assert set(pipe.transformer.state_dict()) == set(theirs)
    assert set(load_state_dict_from_dir(tiny_15_i2v / "transformer")) == set(theirs)
    assert "patch_embed.proj.bias" in theirs and "ofs_embedding.linear_2.weight" in theirs


# 17 frames: 5 latent frames, padded to 6 in front (dropped before decoding); 33: 9 padded to 10, the most.
@pytest.mark.parametrize("num_frames", [17, 33])
def test_text_to_video_matches_reference(tiny_15, num_frames):
    pipe = _pipe(tiny_15)
    assert pipe.padding_frames(num_frames) == 1
    result = pipe(PROMPT, num_frames=num_frames, num_inference_steps=3, seed=7)
    ref = _reference("CogVideoXPipeline", tiny_15, 7, num_frames=num_frames, num_inference_steps=3)
    _assert_close(result.frames, ref)
    assert result.fps == 16 and result.settings["fps"] == 16


def test_unpadded_latents_match_reference(tiny_15):
    """13 frames are 4 latent frames, a whole number of temporal patches: nothing padded, nothing dropped. (Not a
    frame count a call may ask for, 16N+1 only, so the sampler is compared on its latents.)"""
    pipe = _pipe(tiny_15)
    pipe.load()
    assert pipe.padding_frames(13) == 0 and pipe.latent_shape(13, 64, 96)[1] == 4
    embeds = pipe.encode_prompts(["", PROMPT])
    ours = pipe.denoise(embeds, 3, 13, 64, 96, 2, 6.0)
    ref = _reference(
        "CogVideoXPipeline", tiny_15, 3, num_frames=13, num_inference_steps=2, output_type="latent"
    )
    assert ours.shape == ref.shape == (1, 4, 4, 8, 12)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_image_to_video_matches_reference(tiny_15_i2v):
    """At 48x80, not the 64x96 sample size: the sliced RoPE takes the first rows of the sample grid's table."""
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    pipe = _pipe(tiny_15_i2v)
    assert pipe.needs_image
    result = pipe(PROMPT, image=image, num_frames=17, height=48, width=80, num_inference_steps=3, seed=11)
    ref = _reference(
        "CogVideoXImageToVideoPipeline",
        tiny_15_i2v,
        11,
        image=Image.fromarray(image),
        num_frames=17,
        height=48,
        width=80,
        num_inference_steps=3,
    )
    _assert_close(result.frames, ref)
    assert result.settings["mode"] == "image-to-video"


def test_released_limits_and_defaults():
    """16N+1 frames up to 161 (10 s at 16 fps), sizes multiples of 16 within the 768x1360 grid."""
    t, v = PRESETS["1.5"]["transformer"], PRESETS["1.5"]["vae"]
    d = GenerationDefaults.for_model(t, v)
    assert (d.num_frames, d.height, d.width, d.fps) == (81, 768, 1360, 16)
    assert GenerationDefaults.for_model(PRESETS["5b"]["transformer"], PRESETS["5b"]["vae"]).fps == 8
    assert t.max_frames == 161 and t.frame_period == 16
    for frames, height, width in [(161, 768, 1360), (1, 16, 16), (17, 768, 768), (145, 480, 848)]:
        check_size(t, v, frames, height, width)
    bad = [
        ((177, 768, 1360), "num_frames must be in [1, 161], got 177"),
        ((153, 768, 1360), "num_frames must be 16N+1 (1, 17, 33, ...) and at most 161, got 153"),
        ((41, 768, 1360), "16N+1"),  # 8N+1 is 1.0's rule, not 1.5's
        ((81, 784, 1360), "height must be in [16, 768], got 784"),
        ((81, 768, 1376), "width must be in [16, 1360], got 1376"),
        ((81, 760, 1360), "height must be a positive multiple of 16 (at most 768), got 760"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_size(t, v, *args)
    # 1.0 keeps its rule: 8N+1 up to 49
    check_size(PRESETS["5b"]["transformer"], PRESETS["5b"]["vae"], 49, 480, 720)
    with pytest.raises(ValueError, match="8N"):
        check_size(PRESETS["5b"]["transformer"], PRESETS["5b"]["vae"], 45, 480, 720)


@pytest.mark.parametrize(
    ("style", "kwargs", "message"),
    [
        ("t2v", {"num_frames": 49}, "num_frames must be in .1, 33., got 49"),
        ("t2v", {"num_frames": 25}, "16N.1 .1, 17, 33, .... and at most 33, got 25"),
        ("t2v", {"height": 80}, "height must be in .16, 64., got 80"),
        ("t2v", {"width": 112}, "width must be in .16, 96., got 112"),
        ("t2v", {"width": 88}, "multiple of 16"),
        ("t2v", {"image": np.zeros((64, 96, 3), np.uint8)}, "image= needs an image-to-video checkpoint"),
        ("t2v", {"video": np.zeros((17, 64, 96, 3), np.uint8)}, "not supported for CogVideoX 1.5"),
        ("i2v", {}, "pass image="),
        ("i2v", {"image": np.zeros((80, 96, 3), np.uint8), "height": 80}, "height must be in .16, 64."),
    ],
)
def test_bad_input_is_refused_before_loading(tiny_15, tiny_15_i2v, style, kwargs, message):
    pipe = _pipe(tiny_15 if style == "t2v" else tiny_15_i2v)
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, num_inference_steps=2, seed=0, **kwargs)
    assert not pipe.loaded


def test_bounds_accept_their_edge(tiny_15_i2v):
    """The largest allowed: 33 frames at the full 64x96 grid (one past each is refused above)."""
    pipe = _pipe(tiny_15_i2v)
    image = np.zeros((64, 96, 3), np.uint8)
    pipe.validate(PROMPT, "", 33, 64, 96, 2, 6.0, 0, image=image)
    pipe.validate(PROMPT, "", 1, 16, 16, 2, 6.0, 0, image=np.zeros((16, 16, 3), np.uint8))


def test_transformer_refuses_unpadded_frames_and_grids_past_the_table():
    from cogvideox.testing import tiny_configs

    config = tiny_configs("1.5")[0]
    model = CogVideoXTransformer(config)
    text = torch.zeros(1, TEXT_LEN, config.text_embed_dim)
    t = torch.tensor([500])
    with pytest.raises(ValueError, match="multiple of 2"):
        model(torch.zeros(1, 3, 4, 8, 12), text, t)
    with pytest.raises(ValueError, match="exceeds this model's rotary table"):
        model(torch.zeros(1, 2, 4, 10, 12), text, t)
    assert model(torch.zeros(1, 2, 4, 8, 12), text, t).shape == (1, 2, 4, 8, 12)


def test_step_cache_runs_on_15_and_threshold_0_changes_nothing(tiny_15):
    pipe = _pipe(tiny_15)
    plain = pipe(PROMPT, num_frames=1, num_inference_steps=4, seed=5)
    same = pipe(PROMPT, num_frames=1, num_inference_steps=4, seed=5, step_cache=0)
    assert np.array_equal(plain.frames, same.frames) and same.timings["steps_computed"] == 4
    fast = pipe(PROMPT, num_frames=1, num_inference_steps=4, seed=5, step_cache=1e9)
    assert fast.timings["steps_computed"] == 2 and fast.frames.shape == plain.frames.shape  # first and last


def test_cli_writes_15_image_to_video_at_16_fps(tiny_15_i2v, tmp_path, capsys):
    import json

    from cogvideox.__main__ import main
    from cogvideox.video import read_mp4

    image = tmp_path / "first.png"
    Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(image)
    out = tmp_path / "clip.mp4"
    argv = [
        "--model",
        tiny_15_i2v,
        "--prompt",
        "a kite",
        "--output",
        out,
        "--image",
        image,
        "--device",
        "cpu",
    ]
    assert main([*map(str, argv), "--steps", "1", "--frames", "17"]) == 0, capsys.readouterr().err
    assert read_mp4(out).shape == (17, 64, 96, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["fps"] == 16 and meta["num_frames"] == 17 and meta["mode"] == "image-to-video"
