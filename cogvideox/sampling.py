"""What the sampler starts from and what the model sees each step, as plain functions.

- `start`: the first latents and the timesteps to run: noise (text to video), a video's latents noised to the
  level `strength` picks (video to video), or noise plus an image's latents as a condition (image to video).
- `with_image` and `guided`: wrappers of the model call `forward(latents, text_embeds, timestep)`, composed in
  the pipeline's `denoise` with the step cache (`StepCache.wrap`).

The numbers follow diffusers' CogVideoXPipeline, CogVideoXVideoToVideoPipeline and
CogVideoXImageToVideoPipeline, random draws included: the VAE posterior is sampled from the seeded generator
before the noise is drawn, so a seed gives the reference's video.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from .config import TransformerConfig
from .scheduler import Scheduler, dynamic_guidance_scale, randn

DEFAULT_STRENGTH = 0.8  # diffusers' video-to-video default


@dataclass(frozen=True)
class Condition:
    """What a generation starts from besides text: the VAE posterior of the given pixels, (1, 2C, F, h, w) mean ‖
    log-variance, and how it is used: "video" (noised to `strength`, then denoised) or "image" (I2V)."""

    moments: Tensor
    kind: str
    strength: float = 1.0


@dataclass(frozen=True)
class Start:
    latents: Tensor  # (1, F, C, h, w), the sampler's first input
    timesteps: Tensor  # (S,) descending: the steps to run
    image_latents: Tensor | None = None  # (1, F, C, h, w): the image's latent frame, zeros after (I2V)


def steps_to_run(steps: int, strength: float) -> int:
    """diffusers' `get_timesteps`: the last `int(steps · strength)` of the `steps` timesteps (0.8 of 50 runs 40)."""
    return min(int(steps * strength), steps)


def pixels_to_tensor(pixels: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """uint8 video (T, H, W, 3) or image (H, W, 3) -> (1, 3, T, H, W) in [-1, 1], as diffusers' video processor."""
    x = (
        torch.from_numpy(np.array(pixels, copy=True)).to(torch.float32) / 255.0
    )  # a copy: read-only arrays too
    x = rearrange(x if x.ndim == 4 else x[None], "t h w c -> 1 c t h w")
    return (2 * x - 1).to(device, dtype)


def sample_posterior(moments: Tensor, generator: torch.Generator) -> Tensor:
    """A draw from the VAE's diagonal Gaussian (mean ‖ log-variance on axis 1), as diffusers' `latent_dist.sample`:
    the noise comes from `generator` on its device, in the moments' dtype."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * randn(mean.shape, generator, mean.device, mean.dtype)


def add_noise(scheduler: Scheduler, clean: Tensor, noise: Tensor, timestep: int) -> Tensor:
    """The forward process to `timestep`: √ᾱ·x0 + √(1 − ᾱ)·ε, ᾱ cast to the latents' dtype first as diffusers does."""
    alpha = scheduler.alphas_cumprod.to(device=clean.device, dtype=clean.dtype)[timestep]
    return alpha**0.5 * clean + (1 - alpha) ** 0.5 * noise


def start(
    scheduler: Scheduler,
    steps: int,
    shape: tuple,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    scale: float,
    condition: Condition | None = None,
) -> Start:
    """Where the sampler starts, for latents of `shape` (1, F, C, h, w); draws from `generator` in the reference's
    order (posterior sample, then noise). `scale`: what the condition's latents are multiplied by
    (`VAEConfig.condition_scale`)."""
    timesteps = scheduler.timesteps(steps)
    if condition is None:  # text to video
        # Drawn in float32, then cast: the reference draws in the model dtype, which differs in FP16/BF16, but
        # seeds keep the videos they gave before video/image inputs came.
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return Start(noise.to(device, dtype), timesteps)
    encoded = sample_posterior(condition.moments, generator).to(dtype)
    clean = scale * rearrange(encoded, "b c f h w -> b f c h w")
    noise = randn(torch.Size(shape), generator, device, dtype)
    if condition.kind == "video":
        timesteps = timesteps[steps - steps_to_run(steps, condition.strength) :]
        return Start(add_noise(scheduler, clean, noise, int(timesteps[0])), timesteps)
    padding = clean.new_zeros((shape[0], shape[1] - clean.shape[1], *clean.shape[2:]))
    return Start(noise, timesteps, torch.cat([clean, padding], dim=1))


def with_image(image_latents: Tensor) -> Callable[[Callable], Callable]:
    """A wrapper of the model call for image to video: the image latents ride along on the channel axis."""

    def wrap(forward: Callable) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def conditioned(latents: Tensor, text_embeds: Tensor, timestep: Tensor) -> Tensor:
            image = image_latents.expand(latents.shape[0], -1, -1, -1, -1)  # the CFG batch sees it twice
            return forward(torch.cat([latents, image], dim=2), text_embeds, timestep)  # (B, F, 2C, h, w)

        return conditioned

    return wrap


def guided(
    forward: Callable, embeds: torch.Tensor, guidance: float, steps: int, dynamic_cfg: bool = False
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The model call of one step, (latents, t) -> float32 prediction: classifier-free guidance around
    `forward(latents, text_embeds, timestep)` (the transformer, or a wrapper of it such as a step cache) when
    `embeds` holds [negative, positive], one batch of two. `steps`: the steps run (dynamic CFG's N)."""
    cfg = embeds.shape[0] == 2

    def predict(latents: torch.Tensor, t: int) -> torch.Tensor:
        x = torch.cat([latents, latents]) if cfg else latents
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        pred = forward(x, embeds, timestep).float()
        if not cfg:
            return pred
        scale = dynamic_guidance_scale(guidance, t, steps) if dynamic_cfg else guidance
        uncond, cond = pred.chunk(2)
        return uncond + scale * (cond - uncond)

    return predict


# -- validation (cheap: shapes and dtypes only) ---------------------------------------------------------------


def _check_pixels(name: str, value, rank: int) -> np.ndarray:
    shape = "(T, H, W, 3)" if rank == 4 else "(H, W, 3)"
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a uint8 numpy array {shape}, got {type(value).__name__}")
    if value.dtype != np.uint8 or value.ndim != rank or value.shape[-1] != 3 or 0 in value.shape:
        raise ValueError(f"{name} must be a uint8 numpy array {shape}, got {value.dtype} {value.shape}")
    return value


def check_conditioning(
    config: TransformerConfig, spatial: int, video, image, strength, num_frames, height, width, steps
) -> None:
    """ValueError, saying what is allowed, for a video / image / strength that cannot work with this checkpoint
    at this size (`spatial`: the VAE's pixels per latent). No heavy work: arrays are checked by shape and dtype."""
    if video is not None and image is not None:
        raise ValueError("pass either video= (video to video) or image= (image to video), not both")
    if strength is not None and video is None:
        raise ValueError("strength applies to video to video only: pass video= too, or leave strength unset")
    if image is not None and not config.image_to_video:
        raise ValueError(
            "image= needs an image-to-video checkpoint (like CogVideoX-5b-I2V); this one is text to video"
        )
    if image is None and config.image_to_video:
        raise ValueError("this is an image-to-video checkpoint: pass image=, a uint8 (H, W, 3) array")
    sized = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (height, width))
    if video is not None and config.patch_size_t is not None:
        # 16N+1 frames are 4N+1 latent frames, never a whole number of temporal patches, and diffusers' video to
        # video refuses those rather than pad them (tests/test_cogvideox15_modes.py): no reference to match.
        raise ValueError(
            "video= (video to video) is not supported for CogVideoX 1.5 checkpoints: their 16N+1 frames are an "
            "odd number of latent frames, which the reference (diffusers) refuses too; use a CogVideoX 1.0 "
            "checkpoint for video to video, or image= with CogVideoX1.5-5B-I2V"
        )
    if video is not None:
        _check_pixels("video", video, 4)
        period, most = config.frame_period, config.max_frames
        if (len(video) - 1) % period or len(video) > most:
            raise ValueError(
                f"video must have {period}N+1 frames (1, {1 + period}, ...), at most {most}; got {len(video)}"
            )
        if num_frames != len(video):
            raise ValueError(
                f"num_frames ({num_frames}) must equal the video's length ({len(video)}) or be unset"
            )
        if sized and video.shape[1:3] != (height, width):
            raise ValueError(
                f"video frames are {video.shape[1]}x{video.shape[2]} (height x width) but the generation size is "
                f"{height}x{width}: resize the video or pass height/width"
            )
        s = DEFAULT_STRENGTH if strength is None else strength
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not 0 < s <= 1:
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        if isinstance(steps, int) and steps_to_run(steps, s) < 1:
            raise ValueError(
                f"strength {s} of {steps} steps runs no step: raise strength or num_inference_steps"
            )
    if image is not None:
        _check_pixels("image", image, 3)
        if sized and image.shape[:2] != (height, width):
            raise ValueError(
                f"image is {image.shape[0]}x{image.shape[1]} (height x width) but the generation size is "
                f"{height}x{width}: resize the image or pass height/width"
            )
    supported = (spatial * config.sample_height, spatial * config.sample_width)
    if config.use_learned_positional_embeddings and sized and (height, width) != supported:
        raise ValueError(
            f"this checkpoint's learned positional embeddings support {supported[0]}x{supported[1]} (height x "
            f"width) only, got {height}x{width}"
        )
