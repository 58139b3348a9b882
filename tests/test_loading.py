"""Hub repo ids resolve through huggingface_hub's cache (offline here: no test may download)."""

import json
import shutil

import numpy as np
import pytest

from cogvideox import CogVideoXPipeline
from cogvideox.loading import CheckpointError, load_state_dict_from_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tiny_2b, tmp_path, monkeypatch):
    """The tiny checkpoint laid out as huggingface_hub caches a downloaded repo; the Hub itself unreachable."""
    repo = tmp_path / "hub" / "models--someone--tiny-cogvideox"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_2b, repo / "snapshots" / COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_a_hub_id_loads_from_the_cache_like_a_folder(hub_cache, tiny_2b):
    by_id = CogVideoXPipeline.from_pretrained("someone/tiny-cogvideox", device="cpu")
    assert by_id.root == hub_cache
    by_path = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    a = by_id("a butterfly", num_inference_steps=1, num_frames=9, seed=11)
    b = by_path("a butterfly", num_inference_steps=1, num_frames=9, seed=11)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.settings["model"] == "someone/tiny-cogvideox"


def test_an_uncached_hub_id_offline_names_the_problem(hub_cache):
    with pytest.raises(CheckpointError, match="someone/not-cached"):
        CogVideoXPipeline.from_pretrained("someone/not-cached", device="cpu")


def test_sharded_weights_load_through_their_index(tiny_2b):
    folder = tiny_2b / "text_encoder"
    assert len(list(folder.glob("*.safetensors"))) > 1  # the writer shards T5 like the release
    state = load_state_dict_from_dir(folder)
    assert "shared.weight" in state and "encoder.final_layer_norm.weight" in state


def test_a_missing_shard_is_named(tiny_2b, tmp_path):
    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_2b / "text_encoder", folder)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_state_dict_from_dir(folder)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _set(component, key, value, name="config.json"):
    def mutate(root):
        path = root / component / name
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))

    return mutate


# (fault, how to make it, what the message must name). Each is found while loading, before any denoising.
FAULTS = [
    (
        "truncated transformer",
        lambda r: _truncate(r / "transformer" / "diffusion_pytorch_model.safetensors"),
        "transformer/diffusion_pytorch_model.safetensors",
    ),
    (
        "truncated T5 shard",
        lambda r: _truncate(sorted((r / "text_encoder").glob("*.safetensors"))[0]),
        "text_encoder",
    ),
    (
        "config null",
        lambda r: (r / "transformer" / "config.json").write_text("null"),
        "transformer/config.json",
    ),
    ("config a list", lambda r: (r / "vae" / "config.json").write_text("[1, 2]"), "vae/config.json"),
    (
        "scheduler null",
        lambda r: (r / "scheduler" / "scheduler_config.json").write_text("null"),
        "scheduler_config.json",
    ),
    ("T5 config null", lambda r: (r / "text_encoder" / "config.json").write_text("null"), "text_encoder"),
    ("layers a string", _set("transformer", "num_layers", "2"), "'num_layers' must be a whole number"),
    ("layers zero", _set("transformer", "num_layers", 0), "'num_layers' must be positive"),
    ("VAE scale zero", _set("vae", "scaling_factor", 0), "'scaling_factor' must be positive"),
    (
        "VAE scale NaN",
        _set("vae", "scaling_factor", float("nan")),
        "'scaling_factor' must be a finite number",
    ),
    ("groups", _set("vae", "norm_num_groups", 5), "multiples of 'norm_num_groups'"),
    (
        "timesteps zero",
        _set("scheduler", "num_train_timesteps", 0, "scheduler_config.json"),
        "scheduler_config.json: 'num_train_timesteps' must be positive",
    ),
    ("beta a string", _set("scheduler", "beta_start", "x", "scheduler_config.json"), "'beta_start'"),
    (
        "garbage tokenizer",
        lambda r: (r / "tokenizer" / "spiece.model").write_bytes(b"garbage" * 10),
        "tokenizer",
    ),
    (
        "tokenizer config null",
        lambda r: (r / "tokenizer" / "tokenizer_config.json").write_text("null"),
        "tokenizer",
    ),
    (
        "shard index null",
        lambda r: next((r / "text_encoder").glob("*.index.json")).write_text("null"),
        "text_encoder",
    ),
    ("VAE weights missing", lambda r: (r / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "vae"),
    ("VAE config missing", lambda r: (r / "vae" / "config.json").unlink(), "vae/config.json"),
    ("wrong shapes", _set("transformer", "text_embed_dim", 64), "do not fit CogVideoXTransformer"),
]


def broken_checkpoint(tiny_2b, tmp_path, mutate):
    root = tmp_path / "broken"
    shutil.copytree(tiny_2b, root)
    mutate(root)
    return root


@pytest.mark.parametrize(("fault", "mutate", "named"), FAULTS, ids=[f[0] for f in FAULTS])
def test_every_checkpoint_fault_is_a_checkpoint_error_naming_the_file_before_denoising(
    tiny_2b, tmp_path, fault, mutate, named
):
    root = broken_checkpoint(tiny_2b, tmp_path, mutate)
    steps = []
    with pytest.raises(CheckpointError) as caught:
        pipe = CogVideoXPipeline.from_pretrained(root, device="cpu")
        pipe("a ship", num_inference_steps=1, num_frames=9, seed=1, callback=lambda s, n: steps.append(s))
    assert named in str(caught.value) and str(root) in str(caught.value)
    assert steps == []  # found while loading: no step ran


def test_config_values_on_both_sides_of_each_bound_are_told_apart():
    from cogvideox.config import SchedulerConfig, TransformerConfig, VAEConfig

    TransformerConfig(num_layers=1, freq_shift=0)
    with pytest.raises(ValueError, match="'num_layers' must be positive"):
        TransformerConfig(num_layers=0)
    with pytest.raises(ValueError, match="'freq_shift' must not be negative"):
        TransformerConfig(freq_shift=-1)
    with pytest.raises(ValueError, match="whole number"):
        TransformerConfig(num_layers=True)
    VAEConfig(scaling_factor=1e-9, shift_factor=-0.5)  # a shift may be negative; a scale may not
    with pytest.raises(ValueError, match="'scaling_factor' must be positive"):
        VAEConfig(scaling_factor=-1e-9)
    with pytest.raises(ValueError, match="'block_out_channels' item 2 must be a whole number"):
        VAEConfig(block_out_channels=(128, 256, 256.5, 512))
    SchedulerConfig(steps_offset=0, beta_start=1e-6)
    with pytest.raises(ValueError, match="'steps_offset' must not be negative"):
        SchedulerConfig(steps_offset=-1)


def test_cli_names_a_broken_checkpoint_in_one_line_and_exits_2(tiny_2b, tmp_path):
    import subprocess
    import sys

    root = broken_checkpoint(tiny_2b, tmp_path, _set("vae", "scaling_factor", 0))
    proc = subprocess.run(
        [sys.executable, "-m", "cogvideox", "--model", root, "--prompt", "x", "--output", tmp_path / "a.mp4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {root / 'vae' / 'config.json'}: 'scaling_factor' must be positive, got 0"
    ]
