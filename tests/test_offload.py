"""Memory modes and OOM-safe decoding (issue 4), on CPU: the mechanism is the same, the device is the CPU."""

import numpy as np
import pytest
import torch

from cogvideox import CogVideoXPipeline
from cogvideox.offload import Offloader, pick_memory_mode

PROMPT = "a snowy forest road in bright sunshine"
GiB = 2**30


@pytest.fixture(scope="module")
def resident_video(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode="resident")
    return pipe(PROMPT, num_inference_steps=2, num_frames=9, seed=3).frames


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_modes_give_identical_videos(tiny_2b, resident_video, mode):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode=mode)
    fetched = []
    real_fetch = pipe.offloader._fetch
    pipe.offloader._fetch = lambda module, stream=None: (
        fetched.append(type(module).__name__) or real_fetch(module, stream)
    )
    frames = pipe(PROMPT, num_inference_steps=2, num_frames=9, seed=3).frames
    np.testing.assert_array_equal(frames, resident_video)
    # Between stages no weight is held on the "device": off-device tensors are empty placeholders.
    for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
        assert all(p.numel() == 0 for p in module.parameters())
    if mode == "sequential":
        assert fetched.count("CogVideoXBlock") >= 2 * 2  # each block streamed in, at every step
    else:
        assert not fetched


def test_a_module_used_outside_its_stage_fails_loudly(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode="model")
    pipe.load()
    latents = torch.zeros(1, 2, 4, 8, 12)
    with pytest.raises(RuntimeError):
        pipe.transformer(latents, torch.zeros(1, 226, 32), torch.tensor([999]))
    with pipe.offloader.use(pipe.transformer):
        assert pipe.transformer(latents, torch.zeros(1, 226, 32), torch.tensor([999])).shape == latents.shape


def test_out_of_memory_in_decode_is_retried_and_the_sample_kept(tiny_2b, resident_video):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    pipe.load()
    calls, steps = [], []
    real_decode = pipe.vae.decode

    def decode(z, **kwargs):
        calls.append(kwargs)
        if not kwargs.get("tiled"):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(z, **kwargs)

    pipe.vae.decode = decode
    frames = pipe(
        PROMPT, num_inference_steps=2, num_frames=9, seed=3, callback=lambda s, n: steps.append(s)
    ).frames
    assert steps == [1, 2]  # denoising ran once: the latents were kept, only the decode was retried
    assert [c.get("tiled") for c in calls] == [False, True]
    assert frames.shape == resident_video.shape
    # Tiled decoding blends overlapping tiles: close to the untiled video, not bit-equal.
    assert np.abs(frames.astype(int) - resident_video.astype(int)).mean() < 4


def test_decode_retries_down_to_small_tiles_then_gives_up(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    pipe.load()
    calls = []
    real_decode = pipe.vae.decode

    def decode(z, **kwargs):
        calls.append(kwargs)
        if kwargs.get("tile_latent_size") is None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(z, **kwargs)

    pipe.vae.decode = decode
    frames = pipe(PROMPT, num_inference_steps=1, num_frames=9, seed=3).frames
    assert frames.shape == (9, 64, 96, 3)
    assert calls[-1] == {"tiled": True, "tile_latent_size": (2, 3)}  # half of the default 4x6 latent tile

    def always_oom(z, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    pipe.vae.decode = always_oom
    with pytest.raises(torch.OutOfMemoryError):
        pipe(PROMPT, num_inference_steps=1, num_frames=9, seed=3)


@pytest.mark.parametrize(
    ("mode", "free_gib", "first_tiled"),
    [("resident", 80, False), ("model", 0.1, True), ("sequential", 80, True), ("sequential", None, False)],
)
def test_decode_starts_tiled_where_untiled_cannot_fit_or_sequential_mode(
    tiny_2b, monkeypatch, mode, free_gib, first_tiled
):
    # Untiled at this size (8x12 latents, FP32) is budgeted at 10 GiB x 96/5400 x 2 = 0.36 GiB. Sequential mode keeps
    # its small-peak promise on a GPU; with no device memory to manage (free None: the CPU) nothing is skipped.
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode=mode)
    pipe.load()
    free = None if free_gib is None else int(free_gib * GiB)
    monkeypatch.setattr("cogvideox.offload.free_device_memory", lambda device: free)
    calls, real_decode = [], pipe.vae.decode
    pipe.vae.decode = lambda z, **kwargs: calls.append(kwargs) or real_decode(z, **kwargs)
    assert pipe.decode(torch.zeros(1, 3, 4, 8, 12)).shape == (9, 64, 96, 3)
    assert calls == [{"tiled": first_tiled}]


def test_sequential_mode_streams_only_the_big_components_outer_blocks(tiny_2b):
    # Lists inside a block (T5's block.N.layer) would re-copy weights the outer block already fetched, and the
    # VAE runs once per frame chunk and tile: it moves whole.
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode="sequential")
    pipe.load()
    hooked = sum(
        len(blocks) for blocks in (pipe.transformer.transformer_blocks, pipe.text_encoder.encoder.block)
    )
    assert len(pipe.offloader._streams) == 2 * hooked  # a pre- and a post-hook per block, nothing else


def test_memory_mode_is_picked_from_free_memory():
    # The released 2B as loaded in FP16 (T5's `wo` stays FP32: 10.7 GiB).
    sizes = {"text_encoder": int(10.7 * GiB), "transformer": int(3.15 * GiB), "vae": int(0.4 * GiB)}
    assert pick_memory_mode(None, sizes) == "resident"  # CPU
    assert pick_memory_mode(80 * GiB, sizes) == "resident"  # H100
    # RTX 4090: 14.3 GiB of weights, ~18 GiB peak with a tiled decode.
    assert pick_memory_mode(23 * GiB, sizes) == "resident"
    assert pick_memory_mode(20 * GiB, sizes) == "model"  # a 24 GB card shared with a desktop
    assert pick_memory_mode(15 * GiB, sizes) == "model"  # 16 GB cards: T5 alone is the peak
    assert pick_memory_mode(11 * GiB, sizes) == "sequential"
    with pytest.raises(ValueError, match="memory mode"):
        Offloader(torch.device("cpu"), "everything")
