"""What a generation call takes: its limits, the defaults filled in, the checks (ValueError, saying what is
allowed, before any heavy work), and the checked call as one `Call`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

from . import sampling, text
from .cache import resolve_step_cache
from .config import GenerationDefaults, TransformerConfig, VAEConfig

MAX_SEED = 2**32
MAX_GUIDANCE = 100.0  # far past any useful scale (6 is the release's); keeps float math finite
MAX_STEPS = 1000
MAX_SIZE = 4096


@dataclass(frozen=True)
class Call:
    """One generation's arguments, defaults filled in and checked (`CogVideoXPipeline.prepare_call`)."""

    prompt: str
    negative_prompt: str
    num_frames: int
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    use_dynamic_cfg: bool
    step_cache: str | float | None  # as asked for
    threshold: float | None  # what it resolves to
    strength: float | None  # video to video only
    preview_every: int
    has_video: bool
    has_image: bool

    @property
    def prompts(self) -> list[str]:
        """What the text encoder sees: [negative, positive] with CFG (guidance > 1), else the prompt alone."""
        return [self.negative_prompt, self.prompt] if self.guidance > 1.0 else [self.prompt]

    def agreement(self) -> tuple:
        """What every rank of a parallel run must pass alike (the seed aside: rank 0's is taken)."""
        return (
            self.prompt,
            self.negative_prompt,
            self.num_frames,
            self.height,
            self.width,
            self.steps,
            self.guidance,
            self.use_dynamic_cfg,
            self.threshold,
            self.strength,
            not self.has_video,
            not self.has_image,
        )


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return int(value)


def check_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default: CUDA if there is one); ValueError for one this machine does not have.

    Asks the driver how many GPUs there are, but creates no CUDA context or object (ZeroGPU forbids that in the
    main process)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be like cpu, cuda or cuda:1, got {device!r}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"device must be cpu, cuda or mps, got {str(device)!r}")
    return device


def prepare(
    transformer: TransformerConfig,
    vae: VAEConfig,
    prompt,
    negative_prompt,
    num_frames,
    height,
    width,
    num_inference_steps,
    guidance_scale,
    seed,
    use_dynamic_cfg=False,
    step_cache=None,
    preview_every=1,
    video=None,
    image=None,
    strength=None,
) -> Call:
    """A pipeline call's arguments, defaults filled in (a video's length, a random seed) and checked: a `Call`."""
    d = GenerationDefaults.for_model(transformer, vae)
    if num_frames is None:
        num_frames = len(video) if isinstance(video, np.ndarray) and video.ndim == 4 else d.num_frames
    height = d.height if height is None else height
    width = d.width if width is None else width
    steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
    guidance = d.guidance_scale if guidance_scale is None else guidance_scale
    negative_prompt = "" if negative_prompt is None else negative_prompt
    extras = dict(
        step_cache=step_cache, preview_every=preview_every, video=video, image=image, strength=strength
    )
    check_arguments(
        transformer, vae, prompt, negative_prompt, num_frames, height, width, steps, guidance, seed, **extras
    )
    if video is not None:
        strength = float(sampling.DEFAULT_STRENGTH if strength is None else strength)
    return Call(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_frames=num_frames,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        seed=secrets.randbelow(MAX_SEED) if seed is None else int(seed),
        use_dynamic_cfg=use_dynamic_cfg,
        step_cache=step_cache,
        threshold=resolve_step_cache(step_cache),
        strength=strength,
        preview_every=preview_every,
        has_video=video is not None,
        has_image=image is not None,
    )


def check_arguments(
    transformer: TransformerConfig,
    vae: VAEConfig,
    prompt,
    negative_prompt,
    num_frames,
    height,
    width,
    num_inference_steps,
    guidance_scale,
    seed,
    step_cache=None,
    preview_every=1,
    video=None,
    image=None,
    strength=None,
) -> None:
    """Raise ValueError, saying what is allowed, for any argument out of range for this model. No heavy work."""
    if not isinstance(prompt, str) or text.is_blank(prompt):
        raise ValueError("prompt must be a non-empty string (invisible characters alone do not count)")
    if not isinstance(negative_prompt, str):
        raise ValueError("negative_prompt must be a string")
    size = (num_frames, height, width, num_inference_steps)
    sampling.check_conditioning(transformer, vae.spatial_compression, video, image, strength, *size)
    check_size(transformer, vae, num_frames, height, width)
    check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
    # Compared, not converted: float(10**400) would raise OverflowError.
    if not 1 <= guidance_scale <= MAX_GUIDANCE:  # NaN fails too
        shown = guidance_scale if abs(guidance_scale) < 1e12 else "a number out of range"
        raise ValueError(f"guidance_scale must be in [1, {MAX_GUIDANCE:g}], got {shown}")
    if seed is not None:
        check_int("seed", seed, 0, MAX_SEED - 1)
    resolve_step_cache(step_cache)
    check_int("preview_every", preview_every, 1)


def check_size(transformer: TransformerConfig, vae: VAEConfig, num_frames, height, width) -> None:
    """num_frames `period`·N+1 up to the model's most (8N+1 up to 49 for CogVideoX 1.0, 16N+1 up to 161 for 1.5);
    height and width multiples of 16 up to MAX_SIZE, and for 1.5 within its rotary table's grid (768x1360)."""
    period, most = transformer.frame_period, transformer.max_frames
    check_int("num_frames", num_frames, 1, most)
    if (num_frames - 1) % period:
        raise ValueError(
            f"num_frames must be {period}N+1 (1, {1 + period}, {1 + 2 * period}, ...) and at most {most}, "
            f"got {num_frames}"
        )
    for name, value, most_pixels in zip(("height", "width"), (height, width), max_size(transformer, vae)):
        if check_int(name, value, 16, most_pixels) % 16:
            raise ValueError(f"{name} must be a positive multiple of 16 (at most {most_pixels}), got {value}")


def max_size(transformer: TransformerConfig, vae: VAEConfig) -> tuple[int, int]:
    """The largest (height, width) a call may ask for, multiples of 16: MAX_SIZE, and for CogVideoX 1.5 the
    sample grid of its sliced rotary table (768x1360 as released; diffusers slices the same table)."""
    if transformer.patch_size_t is None:
        return MAX_SIZE // 16 * 16, MAX_SIZE // 16 * 16
    s = vae.spatial_compression
    return tuple(
        min(n * s, MAX_SIZE) // 16 * 16 for n in (transformer.sample_height, transformer.sample_width)
    )


def takes_video(transformer: TransformerConfig) -> bool:
    """Video to video (`video=`): CogVideoX 1.0 text-to-video checkpoints (diffusers' reference refuses 1.5's)."""
    return not transformer.image_to_video and transformer.patch_size_t is None


def size_follows_image(transformer: TransformerConfig) -> bool:
    """CogVideoX 1.5 image to video makes its video in the image's shape; 1.0's learned positions fix the size."""
    return transformer.image_to_video and transformer.patch_size_t is not None


def image_video_size(
    transformer: TransformerConfig, vae: VAEConfig, image_height: int, image_width: int
) -> tuple[int, int]:
    """The (height, width) to make a video from an image of this size: the model's default, except where the size
    follows the image (CogVideoX 1.5 I2V, THUDM's rule: multiples of 16, the short side the default's 768, the long
    side up to 1360). The image's aspect ratio is kept within the grid: a landscape image is the default's height
    and up to the grid's width; a portrait one is at most the grid's height (768: the rotary table has no more
    rows), its width from the ratio. An image more elongated than the grid allows (wider than 1360:768, or
    narrower than 768:1360) is center-cropped to that ratio."""
    d = GenerationDefaults.for_model(transformer, vae)
    if not size_follows_image(transformer):
        return d.height, d.width
    most_h, most_w = max_size(transformer, vae)
    short = min(d.height, d.width, most_h)
    ratio = min(max(image_width / image_height, short / most_w), most_w / short)

    def sixteens(pixels: float) -> int:
        return max(16, round(pixels / 16) * 16)

    if ratio >= 1:
        return short, min(sixteens(short * ratio), most_w)
    height = min(sixteens(short / ratio), most_h)
    return height, min(sixteens(height * ratio), most_w)
