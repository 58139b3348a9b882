"""Hub repo ids resolve through huggingface_hub's cache (offline here: no test may download)."""

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
