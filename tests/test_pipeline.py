"""The whole pipeline against diffusers' CogVideoXPipeline, loaded from the same tiny checkpoint folder."""

import json

import numpy as np
import pytest
import torch

from cogvideox import CogVideoXPipeline, GenerationCancelled
from cogvideox.loading import CheckpointError

PROMPT = "a wooden toy ship glides over a blue carpet"


def reference_video(path, prompt, seed, **kwargs):
    import diffusers

    ref = diffusers.CogVideoXPipeline.from_pretrained(path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **kwargs).frames
    return (out[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # (T, H, W, 3)


@pytest.mark.parametrize(
    ("style", "kwargs"),
    [
        ("2b", {"num_inference_steps": 3}),
        (
            "2b",
            {"num_inference_steps": 2, "num_frames": 17, "height": 48, "width": 80, "guidance_scale": 1.0},
        ),
        ("5b", {"num_inference_steps": 3, "negative_prompt": "blurry"}),
        (
            "5b",
            {"num_inference_steps": 2, "num_frames": 9, "height": 80, "width": 64, "use_dynamic_cfg": True},
        ),
    ],
)
def test_same_seed_same_video_as_reference(style, kwargs, request):
    path = request.getfixturevalue(f"tiny_{style}")
    pipe = CogVideoXPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    ours = pipe(PROMPT, seed=1234, **kwargs)
    ref = reference_video(path, PROMPT, 1234, **kwargs)
    assert ours.frames.dtype == np.uint8
    assert ours.frames.shape == ref.shape
    diff = np.abs(ours.frames.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"max pixel diff {diff.max()}"
    assert ours.frames.std() > 1  # not a blank video


def test_defaults_come_from_the_checkpoint(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    assert not pipe.loaded  # construction reads configs only
    d = pipe.defaults
    assert (d["num_frames"], d["height"], d["width"], d["fps"]) == (17, 64, 96, 8)
    result = pipe(PROMPT, num_inference_steps=1, seed=7)
    assert pipe.loaded
    assert result.frames.shape == (17, 64, 96, 3)
    assert result.seed == 7 and result.settings["seed"] == 7
    assert set(result.timings) == {"load", "text", "denoise", "decode", "total"}
    json.dumps(result.settings)  # the sidecar must be able to hold it


def test_seed_none_draws_a_seed_that_reproduces(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    first = pipe(PROMPT, num_inference_steps=1)
    assert 0 <= first.seed < 2**32
    again = pipe(PROMPT, num_inference_steps=1, seed=first.seed)
    np.testing.assert_array_equal(first.frames, again.frames)
    other = pipe(PROMPT, num_inference_steps=1, seed=(first.seed + 1) % 2**32)
    assert not np.array_equal(first.frames, other.frames)


def test_callback_reports_each_step_and_can_cancel(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    seen, stages = [], []
    pipe(
        PROMPT,
        num_inference_steps=3,
        seed=0,
        callback=lambda s, n: seen.append((s, n)),
        on_stage=stages.append,
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert stages == ["loading model", "encoding text", "denoising", "decoding"]
    seen.clear()
    with pytest.raises(GenerationCancelled):
        pipe(PROMPT, num_inference_steps=5, seed=0, callback=lambda s, n: seen.append(s) or s < 2)
    assert seen == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"num_frames": 10}, r"8N\+1"),
        ({"num_frames": 25}, r"num_frames must be in \[1, 17\]"),
        ({"num_frames": 9.0}, "integer"),
        ({"height": 40}, "multiple of 16"),
        ({"width": 0}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": 0.5}, "guidance_scale must be in"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be in"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be in"),
        ({"guidance_scale": 100.001}, "guidance_scale must be in"),
        ({"guidance_scale": 10**400}, "guidance_scale must be in"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"negative_prompt": 5}, "negative_prompt"),
    ],
)
def test_bad_input_is_refused_before_loading(tiny_2b, kwargs, message):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
    assert not pipe.loaded


def test_long_prompt_is_truncated_and_says_so(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    prompt = " ".join(["butterfly wings flutter through a field of flowers"] * 60)
    count = pipe.count_tokens(prompt)
    assert count.n_tokens > 226 and count.dropped_tokens == count.n_tokens - 226
    assert count.dropped_text and prompt.startswith(count.kept_text[:50])
    result = pipe(prompt, num_inference_steps=1, seed=0)
    assert result.dropped_tokens == count.dropped_tokens > 0
    assert pipe.count_tokens("a short prompt").dropped_tokens == 0


def test_repeated_prompt_hits_the_embedding_cache(tiny_2b, monkeypatch):
    from cogvideox import text

    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    calls = []
    real = text.encode
    monkeypatch.setattr(text, "encode", lambda enc, ids: calls.append(ids.shape[0]) or real(enc, ids))
    a = pipe(PROMPT, num_inference_steps=1, seed=1)
    assert calls == [2]  # negative + positive
    b = pipe(PROMPT, num_inference_steps=1, seed=2)  # same prompt, new seed: no T5 at all
    assert calls == [2]
    pipe("another prompt", num_inference_steps=1, seed=1)  # negative cached, new positive encoded
    assert calls == [2, 1]
    assert not np.array_equal(a.frames, b.frames)


def test_errors_name_the_missing_or_corrupt_file(tiny_2b, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_2b, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    pipe = CogVideoXPipeline.from_pretrained(broken, device="cpu")
    with pytest.raises(CheckpointError, match=r"transformer/diffusion_pytorch_model\.safetensors"):
        pipe(PROMPT, num_inference_steps=1, seed=0)
    weights.unlink()
    with pytest.raises(CheckpointError, match="transformer"):
        CogVideoXPipeline.from_pretrained(broken, device="cpu").load()
    (broken / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match=r"model_index\.json"):
        CogVideoXPipeline.from_pretrained(broken)
    with pytest.raises(CheckpointError, match="neither"):
        CogVideoXPipeline.from_pretrained(tmp_path / "does-not-exist")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Hub"):
        CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-2b-does-not-exist")
