"""CogVideoX 1.5 in the benchmarks (issue 23 item 5): the memory prediction per mode and card, and the GPU check's
1.5 section, run on the CPU with the tiny 1.5 checkpoint (its CUDA-only numbers recorded as such) or skipped with
a line where the released weights are not downloaded."""

import json

import pytest

from benchmarks import bench_memory, gpu_check, memory15
from cogvideox.config import PRESETS


def test_the_released_15_latents_are_padded_to_whole_temporal_patches():
    t, v = PRESETS["1.5"]["transformer"], PRESETS["1.5"]["vae"]
    assert bench_memory.latent_shape(t, v, 81, 768, 1360) == (1, 22, 16, 96, 170)  # 21 latent frames + 1
    assert bench_memory.latent_shape(t, v, 161, 768, 1360) == (1, 42, 16, 96, 170)  # 41 + 1
    two_b = PRESETS["2b"]
    assert bench_memory.latent_shape(two_b["transformer"], two_b["vae"], 49, 480, 720) == (1, 13, 16, 60, 90)


def test_cards_are_named_by_the_peak_with_its_allowance():
    assert memory15.fits(11.6) == "24 / 16 / 12 GB"
    assert memory15.fits(12.0) == "24 / 16 / 12 GB" and memory15.fits(12.01) == "24 / 16 GB"
    assert memory15.fits(21.2) == "24 GB" and memory15.fits(24.01) == "none of 24 / 16 / 12 GB"


def test_memory15_predicts_every_mode_and_says_it_is_a_prediction(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory15, "TINY_FRAMES", (17,))  # seconds a frame count on meta tensors: op by op
    out = tmp_path / "memory15.json"
    assert memory15.main(["--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PREDICTION, not a measurement (meta tensors on the CPU, no GPU ran" in printed
    assert (
        "| H100 | 465 / 322 / 260 / 204 s | ali-vilab/TeaCache, TeaCache4CogVideoX1.5/README.md |" in printed
    )
    assert "| H100 | ~550 s |" in printed and "| A100 | ~1000 s |" in printed
    data = json.loads(out.read_text())
    assert data["prediction"] is True and data["cards_gib"] == [24, 16, 12]
    assert data["runs"]["17"]["latent_shape"] == [1, 6, 4, 4, 6]  # 5 latent frames padded to 6
    for run in data["runs"].values():
        assert set(run["stages_gib"]) == {"text", "denoise", "decode untiled", "decode tiled"}
        peak = {r["mode"]: r["peak"] for r in run["modes"] if r["decode"] == "tiled"}
        assert 0 < peak["sequential"] <= peak["model"] <= peak["resident"]
        assert run["step_work"]["attention_tflop"] > 0
    assert out.with_suffix(".md").read_text() in printed
    assert "| 17 | sequential |" in printed


def _v15(tmp_path, *argv) -> dict:
    out = tmp_path / "g.json"
    run = gpu_check.Run(
        gpu_check.parse_args(["--device", "cpu", "--sections", "v15", "--out", str(out), *argv])
    )
    try:
        run.section("v15", gpu_check.CHECKS["v15"])
    finally:
        run.cleanup()
    return json.loads(out.read_text())["sections"]["v15"]


def test_gpu_check_skips_15_with_a_line_when_it_is_not_downloaded(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    section = _v15(tmp_path)
    assert section["status"] == "skipped" and section["verdict"] == "n/a"
    assert section["reason"].startswith("THUDM/CogVideoX1.5-5B is not downloaded (Hugging Face cache ")
    assert "huggingface-cli download THUDM/CogVideoX1.5-5B" in section["reason"]


@pytest.mark.slow
def test_gpu_check_runs_15_on_the_tiny_checkpoint(tiny_15, tmp_path):
    section = _v15(tmp_path, "--v15-model", str(tiny_15), "--v15-modes", "sequential")
    assert section["status"] == "ok" and section["verdict"] == "pass", section
    run = section["modes"]["sequential"]
    assert run["frames_shape"] == [1, 32, 48, 3] and run["fps"] == 16
    assert run["stage_peaks_gib"].startswith("skipped: needs CUDA") and run["peak_gib"] is None
    assert len(run["step_s"]) == 1 and run["extrapolated_50_steps_s"] > 50 * run["s_per_step"]
    md = (tmp_path / "g.md").read_text()
    assert (
        "| mode | load s | text s | s/step | decode s | peak GiB | 50 steps s (extrapolated) | frames |" in md
    )
    assert "| v15 | ok | pass |" in md
