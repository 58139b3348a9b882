"""The CogVideoX causal 3D VAE: 8x spatial and 4x temporal compression, frame-chunked with causal-conv caches.

Numerically this is diffusers' `AutoencoderKLCogVideoX` (same parameter names, frame chunks and tiles; equal
up to float rounding). The convolutions are nearly all of the time, so this version does fewer multiplies:
- frames that repeat are convolved once with their time taps summed: frame 0 of the first chunk (the causal
  padding repeats it) and the frame pairs a temporal upsampler makes;
- nearest-2x upsampling then a 3x3 conv is one 2x2 conv with four output phases on the small grid;
- the spatial norm's 1x1x1 convs run on the latent chunk and are broadcast up, not on upsampled copies;
- on CPU in fp32, wide 3x3 convs run as Winograd F(2x2, 3x3) (2.25x fewer multiplies than oneDNN's direct
  conv, which is already at the FMA peak);
and less work around them: each norm + SiLU writes into a buffer with two free leading frames that the next
causal conv fills from its cache (no `torch.cat` of every conv input). Inference only (in-place writes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig

# Frames per chunk. The VAE was trained on these exact chunks (diffusers notes other sizes give poor results).
SAMPLE_FRAME_BATCH = 8
LATENT_FRAME_BATCH = 2
# Tile overlaps (fractions of the tile) tuned by diffusers for 720x480.
OVERLAP_HEIGHT = 1 / 6
OVERLAP_WIDTH = 1 / 5
SPATIAL_NORM_EPS = 1e-6  # fixed in the reference, independent of config.norm_eps
WINOGRAD_BAND = 1 << 25  # elements of transformed input per band (128 MB in fp32)


def _frame_chunks(num_frames: int, batch: int) -> list[slice]:
    """diffusers' chunks: `batch` frames each, the first one also takes the remainder (13 -> 3,2,2,2,2,2)."""
    rest = num_frames % batch
    n = max(num_frames // batch, 1)
    return [slice(batch * i + (rest if i else 0), batch * (i + 1) + rest) for i in range(n)]


def _padded(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, C, 2 + T, H, W) buffer; a CausalConv3d fills the two leading frames."""
    b, c, t, h, w = x.shape
    return x.new_empty((b, c, 2 + t, h, w))


def _bt(d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, d3: torch.Tensor, out: torch.Tensor) -> None:
    """Winograd F(2, 3) input transform B^T of four taps, into out[0..3]."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


def _winograd_conv3d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`_conv3d` by Winograd F(2x2, 3x3) in space (Lavin & Gray 2015): each 2x2 output tile is
    A^T [(G w G^T) * (B^T x B)] A, i.e. 16 channel GEMMs (run as (kt, 1) convs over time) instead of 9 taps at
    every pixel, 2.25x fewer multiplies. Tiles are processed in bands to bound the 4x larger transformed input.
    """
    bs, ci, tp, h, wd = x.shape
    co, kt = w.shape[0], w.shape[2]
    nh, nw = (h + 1) // 2, (wd + 1) // 2
    g = torch.tensor(((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)), dtype=w.dtype)
    u = torch.einsum("ay,oityx,bx->aboit", g.to(w.device), w, g.to(w.device)).unsqueeze(-1)
    xp = F.pad(x, (1, 2 * nw - wd + 1, 1, 2 * nh - h + 1))
    out = x.new_empty((bs, co, tp - kt + 1, nh, 2, nw, 2))
    band = max(1, WINOGRAD_BAND // (16 * bs * ci * tp * nw))
    for i0 in range(0, nh, band):
        n = min(band, nh - i0)
        rows = xp[..., 2 * i0 : 2 * (i0 + n) + 2, :]
        # Rows first; the columns split by parity, so that the column taps below are plain slices.
        r = x.new_empty((2, 4, bs, ci, tp, n, nw + 1))
        for p in range(2):
            _bt(*(rows[..., y : y + 2 * n : 2, p::2] for y in range(4)), out=r[p])
        v = x.new_empty((4, 4, bs, ci, tp, n, nw))
        for e, o, va in zip(r[0], r[1], v):
            _bt(e[..., :-1], o[..., :-1], e[..., 1:], o[..., 1:], out=va)
        # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]; the bias enters once, through tap (1, 1) which A maps to all 4.
        m = [
            [F.conv2d(v[a, c].flatten(-2), u[a, c], b if a == c == 1 else None) for c in range(4)]
            for a in range(4)
        ]
        q = ([m[0][c] + m[1][c] + m[2][c] for c in range(4)], [m[1][c] - m[2][c] - m[3][c] for c in range(4)])
        dst = out[:, :, :, i0 : i0 + n]
        for a, qa in enumerate(q):
            shape = dst[:, :, :, :, a, :, 0].shape
            dst[:, :, :, :, a, :, 0] = torch.add(qa[0], qa[1], out=qa[0]).add_(qa[2]).view(shape)
            dst[:, :, :, :, a, :, 1] = torch.sub(qa[1], qa[2], out=qa[1]).sub_(qa[3]).view(shape)
    return out.view(bs, co, -1, 2 * nh, 2 * nw)[..., :h, :wd]


def _conv3d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (B, C, T, H, W) * w (C_out, C, kt, 3, 3): valid in time, zero padding 1 in space."""
    co, ci, kt = w.shape[:3]
    # oneDNN's direct conv already runs at the FMA peak on CPU; fewer multiplies are the way to go faster.
    # Winograd pays where its O(C) per-pixel transforms are small next to the O(C^2) multiplies it saves.
    wide = min(co, ci) >= 256 and x.shape[-2] * x.shape[-1] >= 1024
    if wide and x.device.type == "cpu" and x.dtype == torch.float32:
        return _winograd_conv3d(x, w, b)
    if x.shape[2] == kt:  # one output frame: as a 2D conv over (C, kt) channels, which oneDNN runs faster
        bs, _, _, h, wd = x.shape
        return F.conv2d(x.reshape(bs, ci * kt, h, wd), w.flatten(1, 2), b, padding=1).unsqueeze(2)
    return F.conv3d(x, w, b, padding=(0, 1, 1))


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap kernel seen by inputs that repeat in pairs: (w0, w1 + w2) and (w0 + w1, w2) along `dim`."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


class CausalConv3d(nn.Module):
    """3x3x3 conv, causal in time: two frames of history from the previous chunk, or frame 0 repeated.

    Repeated input frames are convolved once with their time taps summed (in fp32): frame 0 of the first
    chunk, and, with `paired_input`, inputs that a 2x temporal upsampler made of repeated frames.
    """

    def __init__(self, in_channels: int, out_channels: int, paired_input: bool = False):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=(0, 1, 1))
        self.paired_input = paired_input

    def forward(self, xp: torch.Tensor, cache: dict, channels: int | None = None) -> torch.Tensor:
        """`xp`: (B, C, 2 + T, H, W), the two leading frames unset; `cache` maps conv -> its history.

        `channels`: compute only the first output channels (the encoder needs only the posterior mean).
        """
        w, b = self.conv.weight, self.conv.bias
        if channels is not None:
            w, b = w[:channels], b[:channels]
        history = cache.get(self)
        xp[:, :, :2] = xp[:, :, 2:3] if history is None else history
        cache[self] = xp[:, :, -2:].clone()
        t = xp.shape[2] - 2
        # An odd paired input is [x0, a, a, b, b, ...]: the first chunk, whose padding repeats x0.
        if self.paired_input and t > 1 and (t % 2 == 0 or history is None):
            return self._paired(xp, w, b)
        if history is not None:
            return _conv3d(xp, w, b)
        return self._first_chunk(xp, w, b)

    @staticmethod
    def _first_chunk(xp: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Padding [x0, x0] + x: output 0 sees x0 three times, output 1 twice."""
        x = xp[:, :, 2:]
        taps01 = _phase_taps(w.float(), 2)[1]  # (w0 + w1, w2)
        outs = [_conv3d(x[:, :, :1], (taps01[:, :, :1] + taps01[:, :, 1:]).to(w.dtype), b)]
        if x.shape[2] > 1:
            outs.append(_conv3d(x[:, :, :2], taps01.to(w.dtype), b))
        if x.shape[2] > 2:
            outs.append(_conv3d(x, w, b))
        return torch.cat(outs, dim=2)

    @staticmethod
    def _paired(xp: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """xp = [h, h, a, a, b, b, ...] (or [x0, x0, x0, a, a, ...]): each output pair is a 2-tap conv of the
        distinct frames u = [h, a, b, ...], (w0 + w1, w2) for the first of the pair, (w0, w1 + w2) for the second.
        """
        bs, t, h, wd = xp.shape[0], xp.shape[2] - 2, xp.shape[3], xp.shape[4]
        odd = t % 2
        cout = w.shape[0]
        taps = _phase_taps(w.float(), 2)
        y = _conv3d(xp[:, :, 1 + odd :: 2], torch.cat(taps[::-1]).to(w.dtype), b.repeat(2))
        out = xp.new_empty((bs, cout, t, h, wd))
        if odd:
            out[:, :, :1] = _conv3d(xp[:, :, 2:3], (taps[1][:, :, :1] + taps[1][:, :, 1:]).to(w.dtype), b)
        pairs = y.view(bs, 2, cout, (t - odd) // 2, h, wd).permute(0, 2, 3, 1, 4, 5)
        out[:, :, odd:].view(bs, cout, -1, 2, h, wd).copy_(pairs)
        return out

    def forward_unpadded(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        xp = _padded(x)
        xp[:, :, 2:] = x
        return self(xp, cache)


class PointwiseConv3d(nn.Module):
    """A 1x1x1 conv, wrapped so that its parameters sit under `.conv` as in the checkpoint."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """silu(norm(x)) written into a time-padded buffer for the following causal conv."""
    out = _padded(x)
    torch.ops.aten.silu.out(
        F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps), out=out[:, :, 2:]
    )
    return out


class SpatialNorm3D(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq the latent chunk nearest-upsampled to f (first frame apart)."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, f_channels, eps=SPATIAL_NORM_EPS)
        self.conv_y = PointwiseConv3d(zq_channels, f_channels)
        self.conv_b = PointwiseConv3d(zq_channels, f_channels)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """silu(spatial_norm(f, zq)) in a time-padded buffer: (B, C, 2 + T, H, W)."""
        norm = self.norm_layer
        n = F.group_norm(f, norm.num_groups, norm.weight, norm.bias, norm.eps)
        # 1x1x1 convs commute with nearest upsampling: run them on the small latent grid.
        y, b = self.conv_y(zq), self.conv_b(zq)
        out = _padded(f)
        t = f.shape[2]
        if t > 1 and t % 2 == 1:  # the reference maps frame 0 to latent frame 0 on its own
            _modulate(n[:, :, :1], y[:, :, :1], b[:, :, :1], out[:, :, 2:3])
            _modulate(n[:, :, 1:], y[:, :, 1:], b[:, :, 1:], out[:, :, 3:])
        else:
            _modulate(n, y, b, out[:, :, 2:])
        F.silu(out[:, :, 2:], inplace=True)
        return out


def _modulate(n: torch.Tensor, y: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = n * up(y) + up(b): nearest upsampling by integer ratios, as broadcasting over views of n."""
    bs, c, t, h, w = n.shape
    tz, hz, wz = y.shape[2:]
    rt, rh, rw = t // tz, h // hz, w // wz
    if rw > 1:  # expand the (small) width axis so the innermost loop runs over whole rows
        y, b = y.repeat_interleave(rw, dim=4), b.repeat_interleave(rw, dim=4)
    big = (bs, c, tz, rt, hz, rh, w)
    small = (bs, c, tz, 1, hz, 1, w)
    torch.addcmul(b.view(small), n.view(big), y.view(small), out=out.view(big))


class ResnetBlock3D(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        groups: int,
        eps: float,
        zq_channels: int | None,
        paired_input: bool = False,
    ):
        super().__init__()
        if zq_channels is None:
            self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
            self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(cin, zq_channels, groups)
            self.norm2 = SpatialNorm3D(cout, zq_channels, groups)
        self.conv1 = CausalConv3d(cin, cout, paired_input)
        self.conv2 = CausalConv3d(cout, cout)
        if cin != cout:
            self.conv_shortcut = nn.Conv3d(cin, cout, kernel_size=1)

    def _norm_silu(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return _group_norm_silu(x, norm) if zq is None else norm(x, zq)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: dict) -> torch.Tensor:
        h = self.conv1(self._norm_silu(self.norm1, x, zq), cache)
        h = self.conv2(self._norm_silu(self.norm2, h, zq), cache)
        return h.add_(self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x)


class Downsample3D(nn.Module):
    """Optional 2x average pooling in time (frame 0 kept alone when T is odd), then a stride-2 3x3 conv."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time:
            first = x.shape[2] % 2
            pairs = (x[:, :, first::2] + x[:, :, first + 1 :: 2]) / 2
            x = torch.cat([x[:, :, :first], pairs], dim=2) if first else pairs
        x = F.pad(x, (0, 1, 0, 1))
        # Conv2d per frame == Conv3d with a (1, 3, 3) kernel, without folding time into the batch.
        return F.conv3d(x, self.conv.weight.unsqueeze(2), self.conv.bias, stride=(1, 2, 2))


class Upsample3D(nn.Module):
    """Nearest 2x in space (and in time for compress_time, frame 0 kept single when T is odd), then a 3x3 conv."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def _phase_weight(self) -> torch.Tensor:
        """(4 C_out, C_in, 1, 2, 2): the 2x2 kernels of output phases (a, b), in that order.

        Upsampled rows 2i, 2i+1 both come from row i: output row 2i sees input rows (i-1, i) through taps
        (w0, w1 + w2), row 2i+1 sees (i, i+1) through (w0 + w1, w2); the same for columns.
        """
        w = self.conv.weight
        k = [kab for ka in _phase_taps(w.float(), 2) for kab in _phase_taps(ka, 3)]
        return torch.cat(k).unsqueeze(2).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, c, t, h, w = x.shape
        # phases: (B, 4 C, T, H + 1, W + 1); phase (a, b) of output pixel (i, j) sits at (i + a, j + b)
        y = F.conv3d(x, self._phase_weight(), self.conv.bias.repeat(4), padding=(0, 1, 1))
        y = y.view(bs, 2, 2, c, t, h + 1, w + 1)
        # Upsampling in time repeats frames; the conv is per frame, so convolve each once and write it twice.
        single = t % 2 if self.compress_time and t > 1 else t
        repeated = t - single
        out = x.new_empty((bs, c, single + 2 * repeated, 2 * h, 2 * w))
        first = out[:, :, :single].view(bs, c, single, h, 2, w, 2)
        rest = out[:, :, single:].view(bs, c, repeated, 2, h, 2, w, 2)
        for a in range(2):
            for b in range(2):
                phase = y[:, a, b, :, :, a : a + h, b : b + w]
                first[:, :, :, :, a, :, b] = phase[:, :, :single]
                rest[:, :, :, :, :, a, :, b] = phase[:, :, single:].unsqueeze(3)
        return out


class _Blocks(nn.Module):
    """Resnets, then an optional resampler; holds the names of diffusers' Down/Mid/Up blocks."""

    def __init__(self, resnets: list[ResnetBlock3D], resampler: nn.Module | None, name: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.resampler_name = name if resampler is not None else None
        if resampler is not None:
            self.add_module(name, nn.ModuleList([resampler]))

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: dict) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq, cache)
        return x if self.resampler_name is None else getattr(self, self.resampler_name)[0](x)


class Encoder3D(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        time_levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0])
        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(chans):
            cin = chans[max(i - 1, 0)]
            resnets = [
                ResnetBlock3D(cin if j == 0 else cout, cout, groups, eps, None)
                for j in range(cfg.layers_per_block)
            ]
            down = Downsample3D(cout, compress_time=i < time_levels) if i < len(chans) - 1 else None
            self.down_blocks.append(_Blocks(resnets, down, "downsamplers"))
        self.mid_block = _Blocks(
            [ResnetBlock3D(chans[-1], chans[-1], groups, eps, None) for _ in range(2)], None, None
        )
        self.norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = CausalConv3d(chans[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, cache: dict, moments: bool = False) -> torch.Tensor:
        """(B, 3, T, H, W) -> posterior mean (B, C, T', H/8, W/8), or with `moments` mean ‖ log-variance
        (B, 2C, T', H/8, W/8); without it only the mean half of conv_out is computed."""
        h = self.conv_in.forward_unpadded(x, cache)
        for block in self.down_blocks:
            h = block(h, None, cache)
        h = self.mid_block(h, None, cache)
        channels = None if moments else self.conv_out.conv.out_channels // 2
        return self.conv_out(_group_norm_silu(h, self.norm_out), cache, channels=channels)


class Decoder3D(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, zc = cfg.block_out_channels[::-1], cfg.latent_channels
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        time_levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(zc, chans[0])
        self.mid_block = _Blocks(
            [ResnetBlock3D(chans[0], chans[0], groups, eps, zc) for _ in range(2)], None, None
        )
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(chans):
            cin = chans[max(i - 1, 0)]
            # After a temporal upsampler, the first conv sees each frame twice (see CausalConv3d._paired).
            paired = 0 < i <= time_levels
            resnets = [
                ResnetBlock3D(cin if j == 0 else cout, cout, groups, eps, zc, paired and j == 0)
                for j in range(cfg.layers_per_block + 1)
            ]
            up = Upsample3D(cout, compress_time=i < time_levels) if i < len(chans) - 1 else None
            self.up_blocks.append(_Blocks(resnets, up, "upsamplers"))
        self.norm_out = SpatialNorm3D(chans[-1], zc, groups)
        self.conv_out = CausalConv3d(chans[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor, cache: dict) -> torch.Tensor:
        """One latent chunk (B, C, F, h, w) -> (B, 3, T, 8h, 8w); `cache` carries conv history between chunks."""
        h = self.conv_in.forward_unpadded(z, cache)
        h = self.mid_block(h, z, cache)
        for block in self.up_blocks:
            h = block(h, z, cache)
        return self.conv_out(self.norm_out(h, z), cache)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Linearly cross-fade the first `extent` rows/columns of b from the last ones of a, in place (diffusers)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    shape = [1] * b.ndim
    shape[dim] = extent
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    dtype = torch.promote_types(b.dtype, torch.float32)
    wb = ramp.to(device=b.device, dtype=dtype).view(shape)
    wa = (1 - ramp).to(device=b.device, dtype=dtype).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * wa + head * wb)


def _tiled(x: torch.Tensor, run, tile_in: tuple[int, int], tile_out: tuple[int, int]) -> torch.Tensor:
    """Run `run` on overlapping spatial tiles of x and cross-fade the overlaps, as diffusers' tiled_(en|de)code.

    Each output tile keeps `stride * tile_out / tile_in` rows and blends the rest into its neighbour. At the
    default tiles that is diffusers' `int(tile * (1 - overlap))` exactly; at other tile sizes diffusers' rounding
    can make the output larger than the input implies, this rule cannot.
    """
    stride = (int(tile_in[0] * (1 - OVERLAP_HEIGHT)), int(tile_in[1] * (1 - OVERLAP_WIDTH)))
    if min(stride) < 1:
        raise ValueError(f"tile {tile_in} is too small to overlap")
    keep = tuple(s * o // i for s, o, i in zip(stride, tile_out, tile_in))
    blend = (tile_out[0] - keep[0], tile_out[1] - keep[1])
    height, width = x.shape[-2:]
    rows = [
        [run(x[..., i : i + tile_in[0], j : j + tile_in[1]]) for j in range(0, width, stride[1])]
        for i in range(0, height, stride[0])
    ]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend[0], dim=3)
            if j > 0:
                _blend(row[j - 1], tile, blend[1], dim=4)
    return torch.cat([torch.cat([t[..., : keep[0], : keep[1]] for t in row], dim=4) for row in rows], dim=3)


class CogVideoXVAE(nn.Module):
    """`encoder.*` / `decoder.*` parameters named as in the released `vae/diffusion_pytorch_model.safetensors`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)

    @property
    def default_tile(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(sample tile, latent tile) as diffusers sets them: half the sample size."""
        s = self.config.spatial_compression
        sample = (self.config.sample_height // 2, self.config.sample_width // 2)
        return sample, (int(sample[0] / s), int(sample[1] / s))

    def _encode_frames(self, x: torch.Tensor, moments: bool = False) -> torch.Tensor:
        cache: dict = {}
        chunks = _frame_chunks(x.shape[2], SAMPLE_FRAME_BATCH)
        return torch.cat([self.encoder(x[:, :, c], cache, moments) for c in chunks], 2)

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        cache: dict = {}
        return torch.cat(
            [self.decoder(z[:, :, c], cache) for c in _frame_chunks(z.shape[2], LATENT_FRAME_BATCH)], 2
        )

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, *, tiled: bool = False, moments: bool = False) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> unscaled posterior mean (B, C, (T - 1) // 4 + 1, H / 8, W / 8);
        with `moments`, mean ‖ log-variance (B, 2C, ...) for the caller to sample (`sampling.sample_posterior`)."""
        sample, latent = self.default_tile
        run = (lambda v: self._encode_frames(v, moments=True)) if moments else self._encode_frames
        if tiled and (x.shape[-1] > sample[1] or x.shape[-2] > sample[0]):
            return _tiled(x, run, sample, latent)
        return run(x)

    @torch.inference_mode()
    def decode(
        self,
        z: torch.Tensor,
        *,
        tiled: bool = False,
        sliced: bool = False,
        tile_latent_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Unscaled latents (B, C, F, h, w) -> video (B, 3, T, 8h, 8w), about [-1, 1], unclamped; T = 4 (F - 1) + 1
        for odd F (13 -> 49), 4 F for even F, as diffusers' chunks of two latent frames give.

        sliced: one batch item at a time. tiled: overlapping spatial tiles of `tile_latent_size` latent pixels
        (default: half the config's sample size), only where the latents are larger than a tile.
        """
        if sliced and z.shape[0] > 1:
            return torch.cat(
                [self.decode(zi, tiled=tiled, tile_latent_size=tile_latent_size) for zi in z.split(1)]
            )
        sample, latent = self.default_tile
        if tile_latent_size is not None:
            latent = tuple(tile_latent_size)
            sample = (
                latent[0] * self.config.spatial_compression,
                latent[1] * self.config.spatial_compression,
            )
        if tiled and (z.shape[-1] > latent[1] or z.shape[-2] > latent[0]):
            return _tiled(z, self._decode_frames, latent, sample)
        return self._decode_frames(z)
