"""CogVideoX 1.5 through everything around the model (issue 23 item 2), on the tiny 1.5 checkpoint: the memory
modes, previews, tiled decoding and its out-of-memory retry at the released 1360x768 grid, the attention kernel's
shape, and video to video (refused, as the reference refuses it). Parallel runs: tests/test_parallel.py; compiled
blocks: tests/test_compile.py; the step cache's polynomials: tests/test_cache.py."""

import dataclasses

import numpy as np
import pytest
import torch
from einops import repeat

from cogvideox import CogVideoXPipeline, GenerationCancelled
from cogvideox.config import PRESETS
from cogvideox.offload import Offloader, pick_memory_mode
from cogvideox.preview import LatentPreview
from cogvideox.vae import CogVideoXVAE

PROMPT = "a paper boat drifts down a rain gutter"
GiB = 2**30
# 1360x768: the released 1.5 size, 96x170 latents; 720x480: CogVideoX 1.0's, 60x90
GRID_15, GRID_10 = (96, 170), (60, 90)


@pytest.fixture(scope="module")
def resident(tiny_15):
    """One frame: one latent frame, padded to a whole temporal patch (two) and the padding dropped again."""
    pipe = CogVideoXPipeline.from_pretrained(tiny_15, device="cpu", memory_mode="resident")
    return pipe(PROMPT, num_frames=1, height=32, width=48, num_inference_steps=2, seed=3).frames


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_memory_modes_give_the_resident_video(tiny_15, resident, mode):
    pipe = CogVideoXPipeline.from_pretrained(tiny_15, device="cpu", memory_mode=mode)
    frames = pipe(PROMPT, num_frames=1, height=32, width=48, num_inference_steps=2, seed=3).frames
    assert frames.shape == resident.shape == (1, 32, 48, 3)
    np.testing.assert_array_equal(frames, resident)
    if mode == "sequential":  # the 1.5 transformer's blocks were streamed: 2 blocks, 2 steps
        assert len(pipe.offloader._streams) == 2 * (
            2 + 2
        )  # transformer and T5 blocks, a pre- and a post-hook


def test_previews_show_the_videos_latent_frames_not_the_padding(tiny_15, monkeypatch):
    """17 frames are 5 latent frames, denoised as 6 (one padded in front): the preview shows the 5, each the
    predicted clean latents of that frame."""
    pipe = CogVideoXPipeline.from_pretrained(tiny_15, device="cpu")
    pipe.load()
    # A fixed map (channels 0-2 as RGB) instead of the fitted one: what is shown, not the fit, is under test here
    pipe._latent_preview = preview = LatentPreview(torch.eye(4)[:, :3] * 0.25, torch.full((3,), 0.5))
    x0s, seen = [], []
    real_step = pipe.scheduler.step

    def step(*args, **kwargs):
        latents, x0 = real_step(*args, **kwargs)
        x0s.append(x0.clone())
        return latents, x0

    monkeypatch.setattr(pipe.scheduler, "step", step)
    with pytest.raises(GenerationCancelled):  # stopped after the last step: no decode needed
        pipe(
            PROMPT,
            num_frames=17,
            height=32,
            width=48,
            num_inference_steps=2,
            seed=4,
            preview=lambda s, n, f: seen.append(f),
            callback=lambda s, n: s < n,
        )
    assert [x.shape[1] for x in x0s] == [6, 6] and len(seen) == 2
    for x0, frames in zip(x0s, seen):
        assert frames.shape == (5, 4, 6, 3)
        np.testing.assert_array_equal(frames, preview(x0[:, 1:]))


def _pointwise_decoder(z: torch.Tensor) -> torch.Tensor:
    """A stand-in for the VAE decoder that is exact under tiling: each latent pixel -> 8x8 pixels of its own
    colour (channels 0-2), 4 frames per latent frame. Overlapping tiles then agree, so tiled == untiled unless a
    tile is missing, misplaced or cut wrong."""
    video = repeat(z[:, :3], "b c f h w -> b c (f t) (h p) (w q)", t=4, p=8, q=8)
    return video[:, :, 3:]  # 4 (F - 1) + 1 frames, as the causal decoder gives


@pytest.fixture
def vae_15():
    """The released 1.5 VAE's tiling (its config: sample 480x720 -> 30x45-latent tiles) on tiny channels."""
    tiny = CogVideoXVAE(
        dataclasses.replace(PRESETS["1.5"]["vae"], block_out_channels=(4, 4, 4, 4), norm_num_groups=2)
    )
    tiny._decode_frames = _pointwise_decoder
    return tiny


def _grid_latents(grid: tuple[int, int], frames: int = 1) -> torch.Tensor:
    """(1, 4, F, h, w) float64 latents where every pixel's value says where it is: a decode in the wrong place
    shows."""
    h, w = grid
    rows = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w)
    z = torch.stack([rows / h, cols / w, (rows * w + cols) / (h * w), torch.ones(h, w)])
    return repeat(z, "c h w -> 1 c f h w", f=frames) + torch.arange(frames, dtype=torch.float64).view(
        1, 1, -1, 1, 1
    )


@pytest.mark.parametrize("tile", [None, (15, 22)])  # the default tile, and the retry ladder's last (half) one
def test_tiled_decode_covers_the_1360x768_grid(vae_15, tile):
    assert vae_15.default_tile == ((240, 360), (30, 45))
    z = _grid_latents(GRID_15)
    untiled = vae_15.decode(z)
    tiled = vae_15.decode(z, tiled=True, tile_latent_size=tile)
    assert tiled.shape == untiled.shape == (1, 3, 1, 768, 1360)
    torch.testing.assert_close(tiled, untiled, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("grid", "free_gib", "tried"),
    [
        # Untiled is budgeted at 10 GiB x (h w / 5400) x 2 bytes / 2: 30.2 GiB at 1360x768 in BF16, 10 at 720x480
        (GRID_15, 24, [{"tiled": True}]),  # a 24 GB card: skipped, straight to tiles
        (GRID_15, 40, [{"tiled": False}, {"tiled": True}]),  # tried, out of memory, then tiled
        (GRID_10, 24, [{"tiled": False}, {"tiled": True}]),
    ],
)
def test_out_of_memory_at_1360x768_is_retried_tiled(vae_15, monkeypatch, grid, free_gib, tried):
    monkeypatch.setattr("cogvideox.offload.free_device_memory", lambda device: free_gib * GiB)
    calls, tiled_decode = [], vae_15.decode

    def decode(z, **kwargs):
        calls.append(kwargs)
        if not kwargs.get("tiled"):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return tiled_decode(z, **kwargs)

    vae_15.decode = decode
    z = _grid_latents(grid).to(torch.bfloat16)
    video = Offloader(torch.device("cpu"), "model").decode_with_retry(vae_15, z)
    assert calls == tried
    assert video.shape == (1, 3, 1, 8 * grid[0], 8 * grid[1])
    torch.testing.assert_close(video, _pointwise_decoder(z))


def test_the_attention_kernel_is_picked_for_the_token_count(tiny_15):
    """Two latent frames a token: 17 frames at 64x96 are 6 padded latent frames, 3 x 4 x 6 = 72 video tokens."""
    pipe = CogVideoXPipeline.from_pretrained(tiny_15, device="cpu")
    pipe.attention_kernel(2, 224, pipe.latent_shape(17, 64, 96))
    assert list(pipe.attention_backends) == [(2, 2, 224 + 72, 16)]


def test_video_to_video_is_refused_as_the_reference_refuses_it(tiny_15):
    """16N+1 frames are 4N+1 latent frames: diffusers' video to video refuses them for a 1.5 transformer (it does
    not pad), so there is nothing to match; ours says so before loading."""
    import diffusers
    from PIL import Image

    video = np.zeros((17, 64, 96, 3), np.uint8)
    ref = diffusers.CogVideoXVideoToVideoPipeline.from_pretrained(tiny_15, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="latent_frames=5, which is not divisible"):
        ref(
            prompt=PROMPT,
            video=[Image.fromarray(f) for f in video],
            num_inference_steps=1,
            max_sequence_length=224,
        )
    pipe = CogVideoXPipeline.from_pretrained(tiny_15, device="cpu")
    with pytest.raises(ValueError, match=r"not supported for CogVideoX 1.5 .*odd number of latent frames"):
        pipe(PROMPT, video=video, num_inference_steps=1, seed=0)
    assert not pipe.loaded


def test_the_memory_mode_is_picked_for_the_denoising_steps_memory(tiny_15):
    """1.5-5B's step at 1360x768x81 holds ~9.35 GiB above the weights (benchmarks/memory15.py, predicted), six
    times 2B's: a 16 GB card cannot run it in model mode, a 32 GB card not resident."""
    pipe = CogVideoXPipeline.from_pretrained(tiny_15, device="cpu")
    for name, predicted in [("1.5", 9.35), ("2b", 1.47)]:
        pipe.transformer_config, pipe.vae_config = PRESETS[name]["transformer"], PRESETS[name]["vae"]
        assert pipe.working_memory() / GiB == pytest.approx(predicted, rel=0.05)
    pipe.transformer_config, pipe.vae_config = PRESETS["1.5"]["transformer"], PRESETS["1.5"]["vae"]
    sizes = {"text_encoder": int(10.7 * GiB), "transformer": int(10.4 * GiB), "vae": int(0.4 * GiB)}
    picks = {
        free: pick_memory_mode(free * GiB, sizes, pipe.working_memory()) for free in (15, 20, 23, 32, 36)
    }
    assert picks == {15: "sequential", 20: "sequential", 23: "model", 32: "model", 36: "resident"}
