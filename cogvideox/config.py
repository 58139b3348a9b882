"""Frozen configs read from a checkpoint's `config.json` files, plus the released presets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreachable, incomplete or corrupt; the message names the file."""


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the annotation `hint` (int, float, bool, str, tuple[X, ...], X | None), or None."""
    if isinstance(hint, types.UnionType):
        if value is None and type(None) in hint.__args__:
            return None
        (hint,) = [h for h in hint.__args__ if h is not type(None)]
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            return "must be a non-empty list"
        problems = [_type_problem(v, hint.__args__[0]) for v in value]
        return next((f"item {i} {p}" for i, p in enumerate(problems) if p), None)
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "must be a finite number"
    return None if isinstance(value, hint) else f"must be {hint.__name__}"


def _check_fields(config, may_be_zero_or_negative: frozenset[str] = frozenset()) -> None:
    """Types as annotated; every number (and list item) positive unless named. ValueError naming the field."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = _type_problem(value, hints[f.name])
        if problem:
            raise ValueError(f"{f.name!r} {problem}, got {value!r}")
        numbers = value if isinstance(value, tuple) else (value,)
        numeric = [v for v in numbers if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if f.name not in may_be_zero_or_negative and any(v <= 0 for v in numeric):
            raise ValueError(f"{f.name!r} must be positive, got {value!r}")


def _from_dict(cls, data: Any, ignore: frozenset[str] = frozenset(), source: str | Path = "config"):
    """Build `cls` from a config dict: private (`_`) keys and `ignore` are dropped, others must be fields.

    Any problem is a CheckpointError naming `source` (the file) and the field."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key.startswith("_") or key in ignore:
            continue
        if key not in fields:
            raise CheckpointError(f"{source}: {cls.__name__}: unsupported config key {key!r}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_json(path: str | Path) -> dict[str, Any]:
    """A config file's JSON object; CheckpointError (naming the file) when missing, unreadable or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing config file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"corrupt config file {path}: expected a JSON object, got {type(data).__name__}"
        )
    return data


@dataclass(frozen=True)
class TransformerConfig:
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True
    ofs_embed_dim: int | None = None

    def __post_init__(self):
        _check_fields(self, frozenset({"freq_shift"}))
        if self.freq_shift < 0:
            raise ValueError(f"'freq_shift' must not be negative, got {self.freq_shift}")
        self._check_version_15()
        if self.in_channels not in (self.out_channels, 2 * self.out_channels):
            raise ValueError(
                f"'in_channels' must equal 'out_channels' ({self.out_channels}; text to video) or twice it "
                f"(image to video: noise and image latents), got {self.in_channels}"
            )
        if self.activation_fn != "gelu-approximate" or self.timestep_activation_fn != "silu":
            raise ValueError(
                "only activation_fn='gelu-approximate' and timestep_activation_fn='silu' are supported"
            )
        if not self.norm_elementwise_affine:
            raise ValueError("norm_elementwise_affine=False is not supported")

    def _check_version_15(self) -> None:
        """CogVideoX 1.5's fields (temporal patches, the I2V `ofs` embedding) in the combinations released."""
        if self.patch_size_t is not None and (
            not self.use_rotary_positional_embeddings or self.use_learned_positional_embeddings
        ):
            raise ValueError(
                "'patch_size_t' (CogVideoX 1.5) needs use_rotary_positional_embeddings=true and "
                "use_learned_positional_embeddings=false, as released"
            )
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise ValueError(
                f"'ofs_embed_dim' must equal 'time_embed_dim' ({self.time_embed_dim}): the two embeddings are "
                f"added; got {self.ofs_embed_dim}"
            )

    @property
    def temporal_patch(self) -> int:
        """Latent frames per token: 2 for CogVideoX 1.5 (`patch_size_t`), 1 before."""
        return self.patch_size_t or 1

    @property
    def max_frames(self) -> int:
        """The most frames a call may ask for. CogVideoX 1.0: the training length (49). CogVideoX 1.5 was trained
        on 81 frames and released for up to 161 (10 s at 16 fps; THUDM's README), twice its length."""
        return self.sample_frames if self.patch_size_t is None else 2 * self.sample_frames - 1

    @property
    def frame_period(self) -> int:
        """Frame counts are `period·N + 1`: 8N+1 for 1.0 (README), 16N+1 for 1.5 (two latent frames a token)."""
        return 2 * self.temporal_compression_ratio * self.temporal_patch

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def image_to_video(self) -> bool:
        """An I2V checkpoint: the image's latents enter beside the noisy latents, on the channel axis."""
        return self.in_channels == 2 * self.out_channels

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        """(frames, height, width) of latents at the sample size; the learned position table covers exactly these."""
        frames = (self.sample_frames - 1) // self.temporal_compression_ratio + 1
        return frames, self.sample_height, self.sample_width

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "config") -> TransformerConfig:
        return _from_dict(cls, data, ignore=frozenset({"dropout"}), source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> TransformerConfig:
        return cls.from_dict(read_json(path), source=path)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self):
        _check_fields(self, frozenset({"shift_factor", "latents_mean"}))
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"'block_out_channels' {self.block_out_channels} must be multiples of 'norm_num_groups' "
                f"({self.norm_num_groups})"
            )
        if self.use_quant_conv or self.use_post_quant_conv:
            raise ValueError("VAE quant convs are not supported (no released CogVideoX VAE uses them)")
        if self.act_fn != "silu":
            raise ValueError("only act_fn='silu' is supported")
        if len(self.block_out_channels) != len(self.down_block_types):
            raise ValueError("block_out_channels and down_block_types differ in length")

    @property
    def condition_scale(self) -> float:
        """What a start image's or video's VAE latents are multiplied by: the scaling factor, or its inverse with
        `invert_scale_latents` (CogVideoX 1.5, trained so; diffusers' image-to-video pipeline does the same).
        Sampled latents are always divided by the scaling factor before decoding."""
        return 1 / self.scaling_factor if self.invert_scale_latents else self.scaling_factor

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "config") -> VAEConfig:
        return _from_dict(cls, data, frozenset({"mid_block_add_attention", "sample_size"}), source)

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        return cls.from_dict(read_json(path), source=path)


FPS_15 = 16  # CogVideoX 1.5's frame rate (THUDM's README: 16N+1 frames at 16 fps)


@dataclass(frozen=True)
class GenerationDefaults:
    """What a call leaves out: the model's training size (from its configs) and the release's sampling settings
    (CogVideoX's reference: 50 steps, guidance 6, 8 fps; 16 fps for CogVideoX 1.5). The pipeline, the CLI and the
    app all read these."""

    num_frames: int
    height: int
    width: int
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    fps: int = 8

    @classmethod
    def for_model(cls, transformer: TransformerConfig, vae: VAEConfig) -> GenerationDefaults:
        s = vae.spatial_compression
        fps = cls.fps if transformer.patch_size_t is None else FPS_15
        return cls(
            transformer.sample_frames, transformer.sample_height * s, transformer.sample_width * s, fps=fps
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def latent_frames(num_frames: int, transformer: TransformerConfig, vae: VAEConfig) -> tuple[int, int]:
    """(latent frames of a `num_frames` video, frames added in front so that CogVideoX 1.5's temporal patches
    (`patch_size_t`) tile them: 0 for 1.0)."""
    frames = (num_frames - 1) // int(vae.temporal_compression_ratio) + 1
    return frames, -frames % transformer.temporal_patch


# The released models' (2B and 5B alike: 49 frames of 720x480), for whoever has no pipeline at hand.
RELEASE_DEFAULTS = GenerationDefaults.for_model(TransformerConfig(), VAEConfig())


# A LoRA's scale is in [-LORA_MAX_SCALE, LORA_MAX_SCALE]: trained LoRAs work near 1, past ±2 they mostly burn the
# video; diffusers sets no bound, ComfyUI's loader allows ±20 or ±100 by version. Here, torch-free: the CLI's check.
LORA_MAX_SCALE = float(os.environ.get("COGVIDEOX_LORA_MAX_SCALE", 4))


SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    class_name: str = "CogVideoXDDIMScheduler"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "v_prediction"
    sample_max_value: float = 1.0
    timestep_spacing: str = "trailing"
    rescale_betas_zero_snr: bool = True
    snr_shift_scale: float = 3.0

    def __post_init__(self):
        _check_fields(self, frozenset({"steps_offset"}))
        if self.steps_offset < 0:
            raise ValueError(f"'steps_offset' must not be negative, got {self.steps_offset}")
        if self.class_name not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.class_name!r}")
        if self.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if self.timestep_spacing not in ("trailing", "leading", "linspace"):
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "config") -> SchedulerConfig:
        if isinstance(data, dict) and "_class_name" in data:
            data = {**data, "class_name": data["_class_name"]}
        return _from_dict(cls, data, source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> SchedulerConfig:
        return cls.from_dict(read_json(path), source=path)


# The released models, as their config.json files describe them (MODEL_NOTES 1.3-1.7).
PRESETS: dict[str, dict[str, Any]] = {
    "2b": {
        "transformer": TransformerConfig(),
        "vae": VAEConfig(),
        "scheduler": SchedulerConfig(),
    },
    "5b": {
        "transformer": TransformerConfig(
            num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True
        ),
        "vae": VAEConfig(scaling_factor=0.7),
        "scheduler": SchedulerConfig(snr_shift_scale=1.0),
    },
    "5b-i2v": {
        "transformer": TransformerConfig(
            num_attention_heads=48,
            num_layers=42,
            in_channels=32,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
        ),
        "vae": VAEConfig(scaling_factor=0.7),
        "scheduler": SchedulerConfig(snr_shift_scale=1.0),
    },
    # CogVideoX 1.5 (MODEL_NOTES 1.7): two latent frames a token, RoPE sliced from the 96x170 sample grid.
    "1.5": {
        "transformer": TransformerConfig(
            num_attention_heads=48,
            num_layers=42,
            use_rotary_positional_embeddings=True,
            patch_size_t=2,
            patch_bias=False,
            sample_frames=81,
            sample_height=96,
            sample_width=170,
        ),
        "vae": VAEConfig(scaling_factor=0.7, invert_scale_latents=True),
        "scheduler": SchedulerConfig(snr_shift_scale=1.0),
    },
    "1.5-i2v": {
        "transformer": TransformerConfig(
            num_attention_heads=48,
            num_layers=42,
            in_channels=32,
            use_rotary_positional_embeddings=True,
            patch_size_t=2,
            patch_bias=False,
            ofs_embed_dim=512,
            sample_frames=81,
            sample_height=96,
            sample_width=170,
        ),
        "vae": VAEConfig(scaling_factor=0.7, invert_scale_latents=True),
        "scheduler": SchedulerConfig(snr_shift_scale=1.0),
    },
}
