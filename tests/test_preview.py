"""Previews while denoising: cadence, what they show, and the latent -> RGB map fitted to the VAE."""

import numpy as np
import pytest
import torch
from einops import reduce
from torch import nn

from cogvideox import CogVideoXPipeline
from cogvideox.preview import LatentPreview
from cogvideox.testing import tiny_configs

PROMPT = "a red kite over a blue sea"


@pytest.fixture(scope="module")
def pipe_2b(tiny_2b):
    return CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")


@pytest.mark.parametrize(("every", "steps", "shown"), [(2, 5, [2, 4, 5]), (1, 3, [1, 2, 3]), (10, 4, [4])])
def test_previews_come_every_k_steps_and_after_the_last(pipe_2b, every, steps, shown):
    seen = []
    pipe_2b(
        PROMPT,
        num_inference_steps=steps,
        num_frames=9,
        seed=3,
        preview=lambda step, total, frames: seen.append((step, total, frames)),
        preview_every=every,
    )
    assert [(step, total) for step, total, _ in seen] == [(s, steps) for s in shown]
    for _, _, frames in seen:
        # 9 frames of 64x96 -> 3 latent frames of 8x12: one preview frame per latent frame and pixel.
        assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
        assert frames.shape == (3, 8, 12, 3)


@pytest.mark.parametrize("style", ["2b", "5b"])  # DDIM, and DPM, whose x0 is also the sampler's state
def test_the_video_is_the_same_with_and_without_previews(style, request):
    pipe = CogVideoXPipeline.from_pretrained(request.getfixturevalue(f"tiny_{style}"), device="cpu")
    kwargs = {"num_inference_steps": 3, "num_frames": 9, "seed": 11}
    plain = pipe(PROMPT, **kwargs)
    previewed = pipe(PROMPT, preview=lambda *_: None, **kwargs)
    np.testing.assert_array_equal(previewed.frames, plain.frames)


def test_previews_show_the_predicted_clean_video(pipe_2b, monkeypatch):
    pipe_2b.load()
    steps, seen = [], []
    real_step = pipe_2b.scheduler.step

    def step(*args, **kwargs):
        latents, x0 = real_step(*args, **kwargs)
        steps.append((args[3].clone(), x0.clone()))  # (the noisy sample going in, its predicted x0)
        return latents, x0

    monkeypatch.setattr(pipe_2b.scheduler, "step", step)
    pipe_2b(PROMPT, num_inference_steps=3, num_frames=9, seed=4, preview=lambda s, n, f: seen.append(f))
    preview = pipe_2b.latent_preview()
    for (_, x0), frames in zip(steps, seen, strict=True):
        np.testing.assert_array_equal(frames, preview(x0))
    assert not np.array_equal(seen[0], preview(steps[0][0]))  # x0, not the noisy latents


class LinearEncoder(nn.Module):
    """A VAE whose encoder is exactly linear in colour: each latent is A·(mean RGB of its pixels) + c."""

    def __init__(self, seed: int):
        super().__init__()
        self.config = tiny_configs("2b")[1]
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(self.config.latent_channels, 3, generator=g)
        self.c = torch.randn(self.config.latent_channels, generator=g)

    def encode(self, video):  # (B, 3, T, H, W) in [-1, 1] -> (B, C, 1 + (T - 1) / 4, H / 8, W / 8)
        t, s = int(self.config.temporal_compression_ratio), self.config.spatial_compression
        groups = torch.cat(
            [video[:, :, :1], reduce(video[:, :, 1:], "b c (t k) h w -> b c t h w", "mean", k=t)], 2
        )
        rgb = reduce(groups, "b c t (h p) (w q) -> b c t h w", "mean", p=s, q=s) / 2 + 0.5
        return torch.einsum("bcthw,lc->blthw", rgb, self.A) + self.c[:, None, None, None]


def solid(rgb, frames=9, height=64, width=96) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1, 1) * 2 - 1).expand(
        1, 3, frames, height, width
    )


def preview_of(vae, preview: LatentPreview, video: torch.Tensor) -> np.ndarray:
    """The preview of `video`'s latents as the sampler holds them: scaled, (B, F, C, h, w)."""
    z = vae.encode(video.contiguous()) * vae.config.scaling_factor
    return preview(z.permute(0, 2, 1, 3, 4))


def test_the_fit_inverts_an_encoder_that_is_linear_in_colour():
    vae = LinearEncoder(seed=2)
    preview = LatentPreview.fit(vae, torch.device("cpu"), torch.float32)
    for rgb in [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.2, 0.7, 0.4), (1.0, 1.0, 1.0)]:
        frames = preview_of(vae, preview, solid(rgb))
        assert frames.shape == (3, 8, 12, 3)
        assert np.abs(frames.astype(int) - np.round(np.array(rgb) * 255)).max() <= 1


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_the_fit_on_the_tiny_checkpoint_in_offload_modes(tiny_2b, pipe_2b, monkeypatch, mode):
    # The tiny VAE is random, and a random encoder carries little colour linearly (GroupNorm of a flat frame
    # leaves mostly its borders): a red frame still previews redder than a blue one.
    resident = pipe_2b.latent_preview()
    red, blue = (
        preview_of(pipe_2b.vae, resident, solid(c)).reshape(-1, 3).mean(0) for c in [(1, 0, 0), (0, 0, 1)]
    )
    assert red[0] - red[2] > blue[0] - blue[2]

    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode=mode)
    preview = pipe.latent_preview()  # loads, brings the VAE in for the fit, sends it home again
    assert all(p.numel() == 0 for p in pipe.vae.parameters())
    assert torch.equal(preview.weight, resident.weight) and torch.equal(preview.bias, resident.bias)
    monkeypatch.setattr(pipe.vae, "encode", lambda *_: pytest.fail("fitted again"))
    assert pipe.latent_preview() is preview
    seen = []
    pipe(PROMPT, num_inference_steps=2, num_frames=9, seed=1, preview=lambda s, n, f: seen.append(s))
    assert seen == [1, 2]
