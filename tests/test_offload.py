"""Memory modes and OOM-safe decoding (issue 4), on CPU: the mechanism is the same, the device is the CPU."""

import numpy as np
import pytest
import torch

from cogvideox import CogVideoXPipeline
from cogvideox.offload import HostPack, Offloader, is_out_of_memory, module_bytes, pick_memory_mode

PROMPT = "a snowy forest road in bright sunshine"
GiB = 2**30


@pytest.fixture(scope="module")
def resident_video(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode="resident")
    return pipe(PROMPT, num_inference_steps=2, num_frames=9, seed=3).frames


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_modes_give_identical_videos(tiny_2b, resident_video, mode):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", memory_mode=mode)
    frames = pipe(PROMPT, num_inference_steps=2, num_frames=9, seed=3).frames
    np.testing.assert_array_equal(frames, resident_video)
    # Between stages no weight is held on the "device": off-device tensors are empty placeholders.
    for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
        assert all(p.numel() == 0 for p in module.parameters())
    # One host-to-device copy per pack. Model mode: T5, transformer, VAE once each. Sequential: each streamed
    # component's non-block weights once, its block 0, then every block's successor in every pass (T5: 2 blocks,
    # 1 pass; transformer: 2 blocks, 2 steps), and the VAE whole.
    assert pipe.offloader.copies == (3 if mode == "model" else (1 + 1 + 2) + (1 + 1 + 2 * 2) + 1)


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


def _transformer(num_layers: int) -> torch.nn.Module:
    import dataclasses

    from cogvideox.testing import tiny_configs
    from cogvideox.transformer import CogVideoXTransformer

    torch.manual_seed(0)
    config = dataclasses.replace(tiny_configs("2b")[0], num_layers=num_layers)
    return CogVideoXTransformer(config).eval()


def _on_device(blocks) -> set[int]:
    return {i for i, block in enumerate(blocks) if all(p.numel() for p in block.parameters())}


def test_sequential_streaming_holds_the_running_block_and_the_next_one_only():
    # Five blocks and three passes: evicting the wrong block, prefetching the wrong one, or copying a block
    # twice all change what is on the device while block i runs, or the number of copies.
    import copy

    model, n, passes = _transformer(5), 5, 3
    reference = copy.deepcopy(model)
    offloader = Offloader(torch.device("cpu"), "sequential")
    offloader.place({"transformer": model})
    blocks, seen = model.transformer_blocks, []
    for i, block in enumerate(blocks):  # registered after the offloader's hooks: runs after them
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, _on_device(blocks))))
    x, text, t = torch.randn(2, 2, 4, 8, 12), torch.randn(2, 7, 32), torch.tensor([999, 999])
    with torch.inference_mode(), offloader.use(model):
        outputs = [model(x, text, t) for _ in range(passes)]
        assert offloader.copies == 1 + 1 + n * passes  # non-block weights, block 0, then each successor
    with torch.inference_mode():
        expected = reference(x, text, t)
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert seen == [(i, {i, (i + 1) % n}) for _ in range(passes) for i in range(n)]
    assert all(p.numel() == 0 for p in model.parameters())  # the stage is over: nothing left on the device


def test_each_streamed_block_lives_in_one_host_buffer_of_exactly_its_size():
    model = _transformer(4)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    weights = module_bytes(model)
    offloader = Offloader(torch.device("cpu"), "sequential")
    offloader.place({"transformer": model})
    assert offloader.pinned_bytes == 0  # nothing is page-locked without CUDA; the layout is the same
    owners = [model, *model.transformer_blocks]
    packs = [offloader._packs[id(owner)] for owner in owners]
    assert len(offloader._packs) == len(owners)  # the non-block weights, and one pack per block
    for pack in packs:
        views = pack.views(pack.buffer)
        # Every view shares the pack's one buffer, at aligned, non-overlapping offsets that add up exactly.
        assert {v.untyped_storage().data_ptr() for v in views} == {pack.buffer.untyped_storage().data_ptr()}
        sizes = [v.numel() * v.element_size() for v in views]
        assert all(o % HostPack.ALIGN == 0 for o in pack.offsets)
        assert pack.offsets == [
            sum(-(-s // HostPack.ALIGN) * HostPack.ALIGN for s in sizes[:k]) for k in range(len(sizes))
        ]
        assert pack.nbytes == sum(-(-s // HostPack.ALIGN) * HostPack.ALIGN for s in sizes)
    assert weights <= offloader.home_bytes < weights + HostPack.ALIGN * len(expected)
    with offloader.use(model):
        offloader._fetch(model.transformer_blocks[2])
        for name, value in model.transformer_blocks[2].state_dict().items():
            torch.testing.assert_close(value, expected[f"transformer_blocks.2.{name}"], rtol=0, atol=0)


def test_tied_weights_are_counted_and_stored_once(tiny_2b):
    from cogvideox.text import load_text_encoder

    t5 = load_text_encoder(tiny_2b / "text_encoder", torch.float32)
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # T5's input embedding: one tensor, two names
    state = t5.state_dict()
    once = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    assert module_bytes(t5) == once < sum(t.numel() * t.element_size() for t in state.values())
    offloader = Offloader(torch.device("cpu"), "model")
    offloader.place({"text_encoder": t5})
    assert once <= offloader.home_bytes < once + HostPack.ALIGN * len(state)


OOM_FORMS = [  # (type, message): each raise makes a new exception, as a real failure would
    (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
    (RuntimeError, "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    (RuntimeError, "Unable to find a valid cuDNN algorithm to run convolution"),
    (RuntimeError, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
]


@pytest.mark.parametrize("error", OOM_FORMS, ids=lambda e: e[1][:24])
def test_every_form_of_out_of_memory_is_retried_tiled_after_the_failed_attempt_is_freed(
    tiny_2b, monkeypatch, error
):
    import weakref

    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    pipe.load()
    real_decode, attempt_memory, released = pipe.vae.decode, [], []

    def decode(z, **kwargs):
        if not kwargs.get("tiled"):
            held = torch.empty(1000)  # the failed attempt's working memory, held by its traceback
            attempt_memory.append(weakref.ref(held))
            raise error[0](error[1])
        return real_decode(z, **kwargs)

    def release():  # by now the except block is left: nothing may still hold the failed attempt's tensors
        released.append(attempt_memory[-1]() is None)

    pipe.vae.decode = decode
    monkeypatch.setattr(pipe.offloader, "release", release)
    steps = []
    frames = pipe(PROMPT, num_inference_steps=2, num_frames=9, seed=3, callback=lambda s, n: steps.append(s))
    assert frames.frames.shape == (9, 64, 96, 3) and steps == [1, 2]  # decoded once more; not denoised again
    assert released == [True]
    attempts = pipe.offloader.decode_attempts
    assert [a["kwargs"] for a in attempts] == [{"tiled": False}, {"tiled": True}]
    assert attempts[0]["error"] == f"{error[0].__name__}: {error[1]}" and attempts[1]["error"] is None


def test_other_errors_in_decode_are_not_mistaken_for_out_of_memory(tiny_2b):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    pipe.load()
    calls = []

    def decode(z, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("Expected all tensors to be on the same device (simulated bug)")

    pipe.vae.decode = decode
    with pytest.raises(RuntimeError, match="same device"):
        pipe.decode(torch.zeros(1, 3, 4, 8, 12))
    assert calls == [{"tiled": False}]  # no retry: a bug is not hidden behind smaller tiles
    assert not is_out_of_memory(RuntimeError("CUDNN_STATUS_BAD_PARAM")) and not is_out_of_memory(KeyError())


def test_no_cuda_object_is_made_before_weights_are_placed():
    # A CPU-only build cannot make CUDA streams: constructing one here would raise. ZeroGPU forbids it too.
    offloader = Offloader(torch.device("cuda"), "sequential")
    assert offloader.copy_stream is None


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "CUDA is not available on this machine; use --device cpu"),
        ("cuda:1", "CUDA is not available"),
        ("gpu", "device must be like cpu, cuda"),
        ("xla", "device must be cpu, cuda or mps"),
    ],
)
def test_a_device_this_machine_lacks_is_a_value_error(tiny_2b, device, message):
    assert not torch.cuda.is_available()
    with pytest.raises(ValueError, match=message):
        CogVideoXPipeline.from_pretrained(tiny_2b, device=device)
