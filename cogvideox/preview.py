"""Cheap previews while denoising: the predicted clean latents (x0) mapped linearly to RGB.

The map latent (C) -> RGB (3) plus a bias is fitted by least squares to the checkpoint's own VAE encoder:
short clips of random colour mosaics are encoded, and each latent pixel is paired with the colour of the
pixels it covers. No extra weights and no hard-coded factors: it adapts to whichever VAE the checkpoint has,
and is as good as that VAE's latents are linear in colour (a random test VAE's hardly are; how close the
released ones come is not measured yet). Previews are one (C x 3) matmul at latent resolution, one frame per
latent frame.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from einops import rearrange, repeat
from torch import Tensor, nn

CELL = 32  # mosaic cell side in pixels (4 latent pixels); each latent pixel inside a cell sees one colour
INNER = 2  # latent pixels per cell side used in the fit: the middle ones, away from the neighbouring cells
CLIPS, FRAMES, SIZE = 2, 5, 128  # videos of 5 frames (-> 2 latent frames) of 128 px: 64 colours in all


def _mosaics(temporal: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(CLIPS, 3, FRAMES, SIZE, SIZE) videos in [-1, 1] and their colours in [0, 1], one per latent frame and
    cell, (CLIPS, 3, latent frames, cells, cells). A colour holds still over the frames one latent frame
    encodes (the first frame alone, then `temporal` at a time)."""
    groups = (FRAMES - 1) // temporal + 1
    cells = SIZE // CELL
    colours = torch.rand(CLIPS, 3, groups, cells, cells, generator=generator)
    lengths = torch.tensor([1] + [temporal] * (groups - 1))
    video = repeat(
        colours.repeat_interleave(lengths, dim=2), "b c t y x -> b c t (y p) (x q)", p=CELL, q=CELL
    )
    return video * 2 - 1, colours


class LatentPreview:
    """x0 latents (1, F, C, h, w), scaled as the sampler holds them -> uint8 frames (F, h, w, 3)."""

    def __init__(self, weight: Tensor, bias: Tensor):
        self.weight, self.bias = weight.float(), bias.float()  # (C, 3), (3,)

    @classmethod
    @torch.inference_mode()
    def fit(cls, vae: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LatentPreview:
        """Least squares on `vae`'s latents of random colour mosaics; its weights must be usable on `device`."""
        config = vae.config
        video, colours = _mosaics(int(config.temporal_compression_ratio), torch.Generator().manual_seed(seed))
        z = vae.encode(video.to(device, dtype)).double().cpu() * config.scaling_factor  # (B, C, F, h, w)
        per_cell = CELL // config.spatial_compression
        z = rearrange(z, "b c f (y p) (x q) -> b c f y x p q", p=per_cell, q=per_cell)
        edge = (per_cell - INNER) // 2
        z = z[..., edge : per_cell - edge, edge : per_cell - edge]
        inputs = rearrange(z, "b c f y x p q -> (b f y x p q) c")
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1)
        target = repeat(colours.double(), "b c f y x -> (b f y x p q) c", p=INNER, q=INNER)
        weights = torch.linalg.lstsq(inputs, target, driver="gelsd").solution  # (C + 1, 3)
        return cls(weights[:-1], weights[-1])

    def rgb(self, latents: Tensor) -> Tensor:
        """(B, F, C, h, w) -> RGB in [0, 1], (B, F, h, w, 3) float32, on the latents' device."""
        w, b = self.weight.to(latents.device), self.bias.to(latents.device)
        return (torch.einsum("bfchw,cr->bfhwr", latents.float(), w) + b).clamp_(0, 1)

    def __call__(self, latents: Tensor) -> np.ndarray:
        return (self.rgb(latents[:1])[0] * 255).round_().to(torch.uint8).cpu().numpy()


def every(
    k: int, preview: LatentPreview, fn: Callable[[int, int, np.ndarray], object]
) -> Callable[[int, int, Tensor], None]:
    """A sampler hook (step, total, x0) that calls `fn(step, total, frames)` on steps k, 2k, ... and the last."""

    def on_x0(step: int, total: int, x0: Tensor) -> None:
        if step % k == 0 or step == total:
            fn(step, total, preview(x0))

    return on_x0
