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
    assert not counters["recompiles"]
    # The kernel was timed once for this attention shape (CFG batch 2, text + 3 x 4 x 6 video tokens) and reused.
    c = compiled.transformer_config
    shape = (2, c.num_attention_heads, c.max_text_seq_length + 3 * 4 * 6, c.attention_head_dim)
    assert compiled.attention_backends == {shape: SDPBackend.FLASH_ATTENTION}
