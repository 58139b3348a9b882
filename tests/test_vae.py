"""The VAE against diffusers' AutoencoderKLCogVideoX (test-only oracle) on a tiny random model, in fp32."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cogvideox import vae
from cogvideox.config import VAEConfig
from cogvideox.vae import CogVideoXVAE

diffusers = pytest.importorskip("diffusers")

# sample 192x160 px -> default tiles of 96x80 px (12x10 latents), sizes at which diffusers' tile rounding is
# exact (as at its 480x720 default), so a 14x12 latent needs 2x2 tiles, and 3x3 tiles of 6x5 latents.
CFG = VAEConfig(
    block_out_channels=(8, 16, 16, 16),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_height=192,
    sample_width=160,
)
TOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.3^2), biases ~ N(0, 0.3^2): nothing left at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convs: OpenMP threads only add overhead here, and hurt badly on a busy two-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    ref = diffusers.AutoencoderKLCogVideoX(**dataclasses.asdict(CFG)).eval()
    _randomize(ref)
    with torch.device("meta"):
        ours = CogVideoXVAE(CFG)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_state_dict_keys_equal_released_layout():
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLCogVideoX().state_dict()
        ours = CogVideoXVAE(VAEConfig()).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert len(ours) == 436  # tensors in the released vae/diffusion_pytorch_model.safetensors


@pytest.mark.parametrize("latent_frames", [1, 3, 4, 5])
def test_decode_matches_reference(models, latent_frames):
    ref, ours = models
    z = torch.randn(1, 4, latent_frames, 6, 10, generator=torch.Generator().manual_seed(latent_frames))
    with torch.no_grad():
        expected = ref.decode(z).sample
    out = ours.decode(z)
    # chunks of 3 (or 1) latent frames decode to 9 (or 1) frames, chunks of 2 to 8
    assert out.shape == (1, 3, 4 * latent_frames - 3 * (latent_frames % 2), 48, 80)
    assert expected.abs().max() > 1  # the random model is far from producing zeros
    assert _max_diff(out, expected) <= TOL


def test_decode_sliced_matches_reference(models):
    ref, ours = models
    z = torch.randn(2, 4, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    ref.enable_slicing()
    try:
        with torch.no_grad():
            expected = ref.decode(z).sample
    finally:
        ref.disable_slicing()
    assert _max_diff(ours.decode(z, sliced=True), expected) <= TOL
    assert _max_diff(ours.decode(z), expected) <= TOL


@pytest.mark.parametrize("tile", [None, (6, 5)])
def test_decode_tiled_matches_reference(models, tile):
    ref, ours = models
    z = torch.randn(1, 4, 3, 14, 12, generator=torch.Generator().manual_seed(2))
    ref.enable_tiling()
    saved = {k: getattr(ref, k) for k in ("tile_sample_min_height", "tile_sample_min_width")}
    saved.update(
        tile_latent_min_height=ref.tile_latent_min_height, tile_latent_min_width=ref.tile_latent_min_width
    )
    if tile is not None:
        ref.tile_latent_min_height, ref.tile_latent_min_width = tile
        ref.tile_sample_min_height, ref.tile_sample_min_width = tile[0] * 8, tile[1] * 8
    try:
        with torch.no_grad():
            expected = ref.decode(z).sample
    finally:
        ref.disable_tiling()
        for k, v in saved.items():
            setattr(ref, k, v)
    untiled = ours.decode(z)
    out = ours.decode(z, tiled=True, tile_latent_size=tile)
    assert _max_diff(out, untiled) > 1e-2  # tiles really blended (tiling is not exact)
    assert _max_diff(out, expected) <= TOL


def test_tiled_decode_of_small_latents_is_untiled(models):
    _, ours = models
    z = torch.randn(1, 4, 1, 12, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours.decode(z, tiled=True), ours.decode(z))


@pytest.mark.parametrize("tile", [(4, 4), (3, 7)])
def test_tiled_decode_any_tile_size_keeps_the_shape(models, tile):
    """Tile sizes where diffusers' overlap rounding would grow the output (the OOM ladder's smaller tiles)."""
    _, ours = models
    z = torch.randn(1, 4, 1, 13, 11, generator=torch.Generator().manual_seed(3))
    untiled = ours.decode(z)
    out = ours.decode(z, tiled=True, tile_latent_size=tile)
    assert out.shape == untiled.shape
    assert _max_diff(out, untiled) < 0.5 * untiled.abs().max()


def test_tile_too_small_raises(models):
    _, ours = models
    with pytest.raises(ValueError, match="too small"):
        ours.decode(torch.zeros(1, 4, 1, 6, 8), tiled=True, tile_latent_size=(1, 1))


@pytest.mark.parametrize(("frames", "height", "width"), [(1, 32, 48), (9, 40, 56), (17, 48, 64)])
def test_encode_matches_reference(models, frames, height, width):
    ref, ours = models
    x = torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mode()
    out = ours.encode(x)
    assert out.shape == (1, 4, (frames - 1) // 4 + 1, height // 8, width // 8)
    assert _max_diff(out, expected) <= TOL


def test_encode_moments_and_their_sample_match_reference(models):
    """The whole posterior (mean ‖ log-variance), and a seeded draw from it as diffusers' `latent_dist.sample`."""
    from cogvideox.sampling import sample_posterior

    ref, ours = models
    x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        expected = dist.sample(torch.Generator().manual_seed(3))
    moments = ours.encode(x, moments=True)
    assert _max_diff(moments, torch.cat([dist.mean, dist.logvar], dim=1)) <= TOL
    assert _max_diff(sample_posterior(moments, torch.Generator().manual_seed(3)), expected) <= TOL
    assert _max_diff(expected, dist.mean) > 10 * TOL  # the draw is not the mean


def test_encode_tiled_matches_reference(models):
    ref, ours = models
    x = torch.rand(1, 3, 9, 112, 96, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ref.enable_tiling()
    try:
        with torch.no_grad():
            expected = ref.encode(x).latent_dist.mode()
    finally:
        ref.disable_tiling()
    assert _max_diff(ours.encode(x, tiled=True), expected) <= TOL


def test_encode_is_causal(models):
    """Later frames never reach earlier latents: the first 8k+1 frames alone encode to the first 2k+1 latents.

    (GroupNorm statistics span each 8-frame chunk, in the reference too, so it is the chunk, not the single
    frame, that encodes independently of the future.)
    """
    _, ours = models
    x = torch.rand(1, 3, 17, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    future = x.clone()
    future[:, :, 9:] = -future[:, :, 9:]
    full = ours.encode(x)
    assert torch.equal(ours.encode(future)[:, :, :3], full[:, :, :3])
    assert not torch.allclose(ours.encode(future)[:, :, 3:], full[:, :, 3:], atol=1e-2)
    assert torch.equal(ours.encode(x[:, :, :9]), full[:, :, :3])
    # A single frame is padded with copies of itself: it encodes like a still video of that frame.
    still = x[:, :, :1].expand(-1, -1, 9, -1, -1)
    assert _max_diff(ours.encode(x[:, :, :1]), ours.encode(still)[:, :, :1]) <= 1e-5


def test_decode_is_causal(models):
    _, ours = models
    z = torch.randn(1, 4, 5, 4, 4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(ours.decode(z[:, :, :3]), ours.decode(z)[:, :, :9])


@pytest.mark.parametrize(("batch", "kt", "size"), [(2, 3, (7, 9)), (1, 2, (6, 5)), (1, 1, (3, 4))])
def test_winograd_conv_matches_direct(monkeypatch, batch, kt, size):
    monkeypatch.setattr(vae, "WINOGRAD_BAND", 1 << 10)  # one band per row of tiles
    g = torch.Generator().manual_seed(kt)
    x = torch.randn(batch, 8, kt + 2, *size, generator=g)
    w = torch.randn(6, 8, kt, 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    assert _max_diff(vae._winograd_conv3d(x, w, b), F.conv3d(x, w, b, padding=(0, 1, 1))) <= TOL


def test_wide_cpu_convs_take_the_winograd_path(monkeypatch):
    calls = []
    winograd = vae._winograd_conv3d
    monkeypatch.setattr(vae, "_winograd_conv3d", lambda *a: calls.append(1) or winograd(*a))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 256, 3, 32, 32, generator=g)
    w = torch.randn(256, 256, 3, 3, 3, generator=g) / 83
    b = torch.randn(256, generator=g)
    assert _max_diff(vae._conv3d(x, w, b), F.conv3d(x, w, b, padding=(0, 1, 1))) <= TOL
    assert len(calls) == 1
    narrow = x[:, :16], w[:, :16], b  # 16 input channels: the direct conv
    assert _max_diff(vae._conv3d(*narrow), F.conv3d(*narrow, padding=(0, 1, 1))) <= TOL
    assert len(calls) == 1
