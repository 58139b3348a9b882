"""The released config.json files (MODEL_NOTES 1.3-1.5, verbatim) parse into the presets."""

import pytest

from cogvideox.config import PRESETS, SchedulerConfig, TransformerConfig, VAEConfig

TRANSFORMER_2B = {
    "_class_name": "CogVideoXTransformer3DModel",
    "_diffusers_version": "0.30.0.dev0",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 64,
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 16,
    "max_text_seq_length": 226,
    "norm_elementwise_affine": True,
    "norm_eps": 1e-05,
    "num_attention_heads": 30,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": 2,
    "sample_frames": 49,
    "sample_height": 60,
    "sample_width": 90,
    "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0,
    "text_embed_dim": 4096,
    "time_embed_dim": 512,
    "timestep_activation_fn": "silu",
    "use_rotary_positional_embeddings": False,
}
VAE_2B = {
    "_class_name": "AutoencoderKLCogVideoX",
    "_diffusers_version": "0.32.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512],
    "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 3,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_height": 480,
    "sample_width": 720,
    "scaling_factor": 1.15258426,
    "shift_factor": None,
    "temporal_compression_ratio": 4,
    "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
    "invert_scale_latents": False,
}
SCHEDULER_2B = {
    "_class_name": "CogVideoXDDIMScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}


def test_released_2b_configs_parse_into_the_preset():
    assert TransformerConfig.from_dict(TRANSFORMER_2B) == PRESETS["2b"]["transformer"]
    assert VAEConfig.from_dict(VAE_2B) == PRESETS["2b"]["vae"]
    assert SchedulerConfig.from_dict(SCHEDULER_2B) == PRESETS["2b"]["scheduler"]
    t = PRESETS["2b"]["transformer"]
    assert t.inner_dim == 1920 and PRESETS["5b"]["transformer"].inner_dim == 3072


def test_5b_differs_where_the_release_does():
    five = {
        **TRANSFORMER_2B,
        "num_attention_heads": 48,
        "num_layers": 42,
        "use_rotary_positional_embeddings": True,
    }
    assert TransformerConfig.from_dict(five) == PRESETS["5b"]["transformer"]
    assert VAEConfig.from_dict({**VAE_2B, "scaling_factor": 0.7}) == PRESETS["5b"]["vae"]
    assert SchedulerConfig.from_dict({**SCHEDULER_2B, "snr_shift_scale": 1.0}) == PRESETS["5b"]["scheduler"]


def test_5b_i2v_differs_where_the_release_does():
    """CogVideoX-5b-I2V (MODEL_NOTES 1.7): image latents beside the noise (in_channels 32), learned positions."""
    i2v = {
        **TRANSFORMER_2B,
        "num_attention_heads": 48,
        "num_layers": 42,
        "in_channels": 32,
        "use_rotary_positional_embeddings": True,
        "use_learned_positional_embeddings": True,
    }
    config = TransformerConfig.from_dict(i2v)
    assert config == PRESETS["5b-i2v"]["transformer"]
    assert config.image_to_video and not PRESETS["5b"]["transformer"].image_to_video
    assert config.latent_grid == (13, 60, 90)
    assert not TransformerConfig.from_dict({**i2v, "in_channels": 16}).image_to_video  # 16 in, 16 out: T2V


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (TransformerConfig, {**TRANSFORMER_2B, "patch_size_t": 2}, "1.5"),
        (TransformerConfig, {**TRANSFORMER_2B, "in_channels": 24}, "in_channels"),
        (TransformerConfig, {**TRANSFORMER_2B, "mystery_option": 1}, "mystery_option"),
        (VAEConfig, {**VAE_2B, "use_quant_conv": True}, "quant"),
        (SchedulerConfig, {**SCHEDULER_2B, "_class_name": "EulerDiscreteScheduler"}, "scheduler must be"),
    ],
)
def test_unsupported_checkpoints_are_refused_clearly(cls, data, message):
    with pytest.raises(ValueError, match=message):
        cls.from_dict(data)
