"""CogVideoXTransformer against diffusers' CogVideoXTransformer3DModel (a test-only oracle)."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.models.embeddings import (
    get_3d_rotary_pos_embed,
    get_3d_sincos_pos_embed,
    get_timestep_embedding,
)

from cogvideox.config import TransformerConfig
from cogvideox.layers import rotary_pos_embed_3d, sincos_pos_embed_3d, timestep_embedding
from cogvideox.transformer import CogVideoXTransformer

TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,  # RoPE splits the head 4/6/6: the smallest even split needs 16
    text_embed_dim=32,
    time_embed_dim=16,
    num_layers=2,
    sample_frames=49,  # 13 latent frames
    sample_height=8,
    sample_width=12,
    max_text_seq_length=8,
)
TEXT_LEN = TINY["max_text_seq_length"]
# (latent frames, height, width): the sample grid, then a different length, size and aspect ratio.
GRIDS = [(13, 8, 12), (3, 12, 6)]


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere, norms included (norm weights around 1, so they are not identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            is_norm_weight = "norm" in name and name.endswith("weight") and param.ndim == 1
            param.copy_(noise + 1.0 if is_norm_weight else noise)


@pytest.fixture(scope="module", params=["2b", "5b"])
def models(request):
    rope = request.param == "5b"
    reference = CogVideoXTransformer3DModel(**TINY, use_rotary_positional_embeddings=rope).eval()
    _randomize(reference)
    with torch.device("meta"):
        ours = CogVideoXTransformer(TransformerConfig(**TINY, use_rotary_positional_embeddings=rope))
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return reference, ours.eval()


def _inputs(grid, batch=2, dtype=torch.float32, seed=1):
    frames, height, width = grid
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, 16, height, width, generator=gen)
    text = torch.randn(batch, TEXT_LEN, TINY["text_embed_dim"], generator=gen)
    timestep = torch.tensor([999, 37][:batch])
    return latents.to(dtype), text.to(dtype), timestep


def _pipeline_rope(reference, grid):
    """image_rotary_emb exactly as CogVideoXPipeline builds it (pixel sizes = latent sizes × 8)."""
    frames, height, width = grid
    pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=reference)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        pipe, height * 8, width * 8, frames, torch.device("cpu")
    )


@torch.no_grad()
def test_matches_diffusers(models):
    reference, ours = models
    for grid in GRIDS:  # one model instance: the cached position embedding must follow the grid
        latents, text, timestep = _inputs(grid)
        rope = _pipeline_rope(reference, grid) if reference.config.use_rotary_positional_embeddings else None
        expected = reference(latents, text, timestep, image_rotary_emb=rope, return_dict=False)[0]
        got = ours(latents, text, timestep)
        assert got.shape == expected.shape == latents.shape
        assert expected.abs().mean() > 0.1  # a non-degenerate output, so the comparison means something
        assert (got - expected).abs().max() <= 1e-4, grid


def test_state_dict_round_trip(models):
    reference, ours = models
    expected = reference.state_dict()
    got = ours.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    fused = ours.transformer_blocks[1].attn1.to_qkv.weight
    assert not any(t.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for t in got.values())


def test_missing_key_is_named(models):
    reference, _ = models
    state = reference.state_dict()
    del state["transformer_blocks.0.ff.net.2.bias"]
    with torch.device("meta"):
        model = CogVideoXTransformer(TransformerConfig(**TINY))
    with pytest.raises(RuntimeError, match=r"transformer_blocks\.0\.ff\.net\.2\.bias"):
        model.load_state_dict(state, strict=True, assign=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs(models, dtype):
    _, ours = models
    latents, text, timestep = _inputs(GRIDS[1])
    expected = ours(latents, text, timestep)
    half = CogVideoXTransformer(ours.config).to(dtype)
    half.load_state_dict(ours.state_dict())
    got = half(latents.to(dtype), text.to(dtype), timestep)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_rejects_odd_latent_size(models):
    _, ours = models
    latents, text, timestep = _inputs((2, 8, 7))
    with pytest.raises(ValueError, match="divisible by 2"):
        ours(latents, text, timestep)


def test_embeddings_match_diffusers():
    t = torch.tensor([0, 1, 500, 999])
    expected = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, 64, flip_sin_to_cos=True, freq_shift=0), expected)

    expected = get_3d_sincos_pos_embed(1920, (45, 30), 13, 1.875, 1.0).flatten(0, 1)
    assert torch.equal(sincos_pos_embed_3d(1920, 13, 30, 45, 1.875, 1.0, dtype=torch.float64), expected)

    # 5B at 768x1360 px: a grid wider than the 30x45 base, so the crop region is not the whole grid.
    expected = _pipeline_rope(types.SimpleNamespace(config=TransformerConfig()), (13, 96, 170))
    assert all(torch.equal(a, b) for a, b in zip(rotary_pos_embed_3d(64, 13, 48, 85, 30, 45), expected))
    direct = get_3d_rotary_pos_embed(64, ((0, 0), (30, 45)), (30, 45), 13)
    assert all(torch.equal(a, b) for a, b in zip(rotary_pos_embed_3d(64, 13, 30, 45, 30, 45), direct))


def test_fastest_sdpa_backend_times_only_kernels_that_run_here():
    from torch.nn.attention import SDPBackend

    from cogvideox.layers import fastest_sdpa_backend

    shape, cpu = (2, 2, 40, 16), torch.device("cpu")
    # On a CPU build only the flash (CPU) and math kernels exist; cuDNN and memory-efficient raise and are skipped.
    picked = fastest_sdpa_backend(shape, torch.float32, cpu)
    assert picked == SDPBackend.FLASH_ATTENTION
    both = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.FLASH_ATTENTION)
    assert fastest_sdpa_backend(shape, torch.float32, cpu, both) in (
        SDPBackend.MATH,
        SDPBackend.FLASH_ATTENTION,
    )
    assert fastest_sdpa_backend(shape, torch.float32, cpu, (SDPBackend.CUDNN_ATTENTION,)) is None


def _clock(durations: list[float]):
    """A timer whose successive (start, stop) readings are `durations` apart, run after run."""
    it, now, running = iter(durations), 0.0, False

    def timer() -> float:
        nonlocal now, running
        now += next(it) if running else 0.0
        running = not running
        return now

    return timer


def _record_sdpa(monkeypatch, corrupt=None) -> list:
    """Wraps every SDPA kernel the model and the kernel pick call by name (`layers.attention`) and PyTorch's pick
    (kernel None) to record ([kernel], q, k, v) per call; the flash kernel's output is replaced by
    `corrupt(sdpa, out, q, k, v)`, `sdpa` being the unwrapped kernel."""
    from torch.nn.attention import SDPBackend

    from cogvideox import layers

    calls = []

    def recorded(kernel, original):
        def sdpa(q, k, v, *args, **kwargs):
            calls.append(([kernel], q, k, v))
            out = original(q, k, v, *args, **kwargs)
            if corrupt and kernel == SDPBackend.FLASH_ATTENTION:
                return corrupt(original, out, q, k, v)
            return out

        return sdpa

    for kernel, name in [
        (SDPBackend.FLASH_ATTENTION, "_flash"),
        (SDPBackend.CUDNN_ATTENTION, "_cudnn"),
        (SDPBackend.EFFICIENT_ATTENTION, "_efficient"),
        (SDPBackend.MATH, "_math"),
    ]:
        monkeypatch.setattr(layers, name, recorded(kernel, getattr(layers, name)))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded(None, sdpa))
    return calls


def test_kernel_pick_takes_the_median_of_five_synced_runs_after_a_warm_up(monkeypatch):
    from collections import Counter

    from torch.nn.attention import SDPBackend

    from cogvideox import layers

    flash, math_ = SDPBackend.FLASH_ATTENTION, SDPBackend.MATH
    calls = _record_sdpa(monkeypatch)
    synced = []
    monkeypatch.setattr(layers, "_sync", synced.append)
    # Flash's five runs, then math's: flash is faster in its best run, its mean and its first three; math in
    # the median of five.
    timer = _clock([1, 1, 6, 6, 6, 5, 5, 5, 5, 100])
    cpu = torch.device("cpu")
    picked = layers.fastest_sdpa_backend((2, 2, 40, 16), torch.float32, cpu, (flash, math_), timer=timer)
    assert picked == math_
    assert Counter(b[0] for b, *_ in calls) == {flash: 6, math_: 6}  # one warm-up and five timed runs each
    assert synced == [cpu] * 10  # every timed run waits for its own kernel


def test_kernel_pick_times_q_k_v_laid_out_as_the_model_passes_them(monkeypatch):
    from cogvideox.layers import Attention, fastest_sdpa_backend

    calls = _record_sdpa(monkeypatch)
    Attention(dim=32, heads=2, head_dim=16, bias=True)(torch.randn(2, 40, 32))
    fastest_sdpa_backend((2, 2, 40, 16), torch.float32, torch.device("cpu"))
    layouts = {tuple((t.shape, t.stride()) for t in qkv) for _, *qkv in calls}
    assert len(layouts) == 1  # the kernel pick's q/k/v have the model's shapes and strides
    _, q, k, v = calls[0]
    assert q.is_contiguous() and k.is_contiguous() and not v.is_contiguous()  # v: a view into fused q/k/v


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda sdpa, out, q, k, v: sdpa(q, k, v.flip(2)),  # v's rows misread
        lambda sdpa, out, q, k, v: out * 1.05,  # 5 % off
    ],
    ids=["layout", "scale"],
)
def test_kernel_pick_drops_a_fast_kernel_that_computes_wrong_attention(monkeypatch, corrupt):
    from torch.nn.attention import SDPBackend

    from cogvideox.layers import fastest_sdpa_backend

    flash, math_ = SDPBackend.FLASH_ATTENTION, SDPBackend.MATH
    args = ((2, 2, 40, 16), torch.float16, torch.device("cpu"))
    flash_fastest = [1] * 5 + [2] * 5
    assert fastest_sdpa_backend(*args, (flash, math_), timer=_clock(flash_fastest)) == flash
    _record_sdpa(monkeypatch, corrupt)
    assert fastest_sdpa_backend(*args, (flash, math_), timer=_clock(flash_fastest)) == math_
    assert fastest_sdpa_backend(*args, (flash,), timer=_clock(flash_fastest)) is None


def test_kernel_pick_waits_for_the_device_it_times(monkeypatch):
    from cogvideox.layers import _sync

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    _sync(torch.device("cuda", 1))
    _sync(torch.device("cpu"))
    assert synced == [torch.device("cuda", 1)]  # not the current device: the pipeline may run on another GPU


def test_compiled_blocks_match_eager_and_compile_once(tiny_5b):
    # Regional compilation: one graph for every block, no recompile for a new prompt, seed or step, and the
    # sequential-offload hooks (which run outside the compiled forward) still stream the weights in.
    import numpy as np
    from torch._dynamo.utils import counters
    from torch.nn.attention import SDPBackend

    from cogvideox import CogVideoXPipeline

    eager = CogVideoXPipeline.from_pretrained(tiny_5b)
    compiled = CogVideoXPipeline.from_pretrained(tiny_5b, memory_mode="sequential", compile=True)
    torch._dynamo.reset()
    counters.clear()
    for prompt, seed in [("a red kite over a beach", 1), ("a lighthouse at dusk", 2)]:
        want = eager(prompt, num_inference_steps=2, num_frames=9, seed=seed).frames
        got = compiled(prompt, num_inference_steps=2, num_frames=9, seed=seed).frames
        assert np.abs(got.astype(int) - want).max() <= 1  # inductor reorders float sums
    assert counters["stats"]["unique_graphs"] == 1
    # The kernel was timed once for this attention shape (CFG batch 2, text + 3 x 4 x 6 video tokens) and reused.
    c = compiled.transformer_config
    shape = (2, c.num_attention_heads, c.max_text_seq_length + 3 * 4 * 6, c.attention_head_dim)
    assert compiled.attention_backends == {shape: SDPBackend.FLASH_ATTENTION}


@pytest.mark.parametrize("compile", [False, True])
def test_the_attention_kernel_is_timed_per_shape_unless_compiled(tiny_2b, monkeypatch, compile):
    # Compiled blocks keep the kernel they were traced under for every size: timing another one is wasted.
    from cogvideox import CogVideoXPipeline

    timed = []
    monkeypatch.setattr(
        "cogvideox.pipeline.fastest_sdpa_backend",
        lambda shape, *_: timed.append(shape) or f"kernel {len(timed)}",
    )
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, compile=compile)
    first = pipe.attention_kernel(2, 226, (1, 3, 4, 8, 12))
    second = pipe.attention_kernel(2, 226, (1, 5, 4, 8, 12))
    assert pipe.attention_kernel(2, 226, (1, 3, 4, 8, 12)) == first == "kernel 1"  # once per shape
    assert (second, len(timed)) == (("kernel 1", 1) if compile else ("kernel 2", 2))
