"""Scheduler parity with diffusers (test-only oracle) and closed-form checks."""

import dataclasses
import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from cogvideox.config import PRESETS, SchedulerConfig
from cogvideox.scheduler import DDIMScheduler, DPMScheduler, dynamic_guidance_scale, make_scheduler

SHAPE = (1, 3, 4, 6, 8)  # (B, F, C, H, W), tiny


def reference(config: SchedulerConfig):
    kwargs = dataclasses.asdict(config)
    cls = {"CogVideoXDDIMScheduler": CogVideoXDDIMScheduler, "CogVideoXDPMScheduler": CogVideoXDPMScheduler}
    return cls[kwargs.pop("class_name")](**kwargs)


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the transformer's v-prediction, returned in fp32 like the pipeline's."""
    return (0.3 * x + math.sin(float(t))).float()


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [50, 1, 7, 100])
def test_timesteps_match_diffusers(spacing, steps):
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref = reference(config)
    ref.set_timesteps(steps)
    ours = make_scheduler(config).timesteps(steps)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref.timesteps)


def test_trailing_timesteps_values():
    assert make_scheduler(SchedulerConfig()).timesteps(50).tolist() == list(range(999, 0, -20))


@pytest.mark.parametrize("steps", [0, 1001])
def test_timesteps_reject_bad_counts(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler(SchedulerConfig()).timesteps(steps)


@pytest.mark.parametrize("preset", ["2b", "5b"])
def test_alphas_cumprod_match_diffusers(preset):
    config = PRESETS[preset]["scheduler"]
    ours = make_scheduler(config).alphas_cumprod
    assert ours.dtype == torch.float64
    assert torch.equal(ours, reference(config).alphas_cumprod)
    assert ours[-1] == 0  # zero terminal SNR


def test_alphas_cumprod_measured_values():
    """Values measured from the released 2B/5B configs (MODEL_NOTES 1.10), independent of diffusers."""
    a2 = make_scheduler(PRESETS["2b"]["scheduler"]).alphas_cumprod
    a5 = make_scheduler(PRESETS["5b"]["scheduler"]).alphas_cumprod
    for t, want in [(979, 2.7e-5), (499, 0.0960), (19, 0.9466), (0, 0.9975)]:
        assert a2[t].item() == pytest.approx(want, rel=2e-2)
    assert a5[499].item() == pytest.approx(0.2424, rel=1e-3)
    assert a5[19].item() == pytest.approx(0.9810, rel=1e-3)


def test_make_scheduler_picks_class_and_rejects_other_betas():
    assert isinstance(make_scheduler(SchedulerConfig()), DDIMScheduler)
    assert isinstance(make_scheduler(SchedulerConfig(class_name="CogVideoXDPMScheduler")), DPMScheduler)
    with pytest.raises(ValueError, match="scaled_linear"):
        make_scheduler(SchedulerConfig(beta_schedule="linear"))


def test_step_requires_timesteps():
    with pytest.raises(RuntimeError, match="timesteps"):
        make_scheduler(SchedulerConfig()).step(torch.zeros(2), 999, None, torch.zeros(2))


def run_pair(class_name: str, dtype: torch.dtype, steps: int = 50, seed: int = 0):
    """Run our scheduler and diffusers' side by side, each on its own trajectory, like the pipeline loop."""
    config = dataclasses.replace(PRESETS["2b"]["scheduler"], class_name=class_name)
    ours, ref = make_scheduler(config), reference(config)
    timesteps = ours.timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(timesteps, ref.timesteps)
    gen_ours, gen_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123)).to(dtype)
    x_ours, x_ref, x0_ours, x0_ref = start, start.clone(), None, None
    max_diff = 0.0
    for i, t in enumerate(timesteps):
        back = timesteps[i - 1] if i > 0 else None
        if class_name == "CogVideoXDPMScheduler":
            x_ours, x0_ours = ours.step(fake_model(x_ours, t), t, back, x_ours, x0_ours, gen_ours)
            x_ref, x0_ref = ref.step(
                fake_model(x_ref, t), x0_ref, t, back, x_ref, generator=gen_ref, return_dict=False
            )
        else:
            x_ours, x0_ours = ours.step(fake_model(x_ours, t), t, back, x_ours)
            x_ref, x0_ref = ref.step(fake_model(x_ref, t), t, x_ref, return_dict=False)
        assert x_ours.dtype == x_ref.dtype
        x_ours, x_ref = x_ours.to(dtype), x_ref.to(dtype)  # the pipeline's cast back to the latent dtype
        max_diff = max(max_diff, (x_ours - x_ref).abs().max().item(), (x0_ours - x0_ref).abs().max().item())
    assert torch.isfinite(x_ours).all()
    return x_ours, max_diff


@pytest.mark.parametrize("class_name", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trajectory_matches_diffusers(class_name, dtype):
    _, max_diff = run_pair(class_name, dtype)
    assert max_diff <= 1e-5


def test_dpm_is_reproducible_from_the_seed():
    a, _ = run_pair("CogVideoXDPMScheduler", torch.float32, steps=10, seed=7)
    b, _ = run_pair("CogVideoXDPMScheduler", torch.float32, steps=10, seed=7)
    c, _ = run_pair("CogVideoXDPMScheduler", torch.float32, steps=10, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_dpm_requires_generator():
    sched = make_scheduler(SchedulerConfig(class_name="CogVideoXDPMScheduler"))
    sched.timesteps(50)
    with pytest.raises(ValueError, match="Generator"):
        sched.step(torch.zeros(2), 999, None, torch.zeros(2))


def test_ddim_step_closed_form():
    """MODEL_NOTES 1.10: x̂0 = √ᾱ_t·x − √(1−ᾱ_t)·v; a = √((1−ᾱ_p)/(1−ᾱ_t)); b = √ᾱ_p − √ᾱ_t·a; x_p = a·x + b·x̂0."""
    sched = make_scheduler(PRESETS["2b"]["scheduler"])
    sched.timesteps(50)
    x, v = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    at, ap = sched.alphas_cumprod[979].item(), sched.alphas_cumprod[959].item()
    x0 = math.sqrt(at) * x - math.sqrt(1 - at) * v
    a = math.sqrt((1 - ap) / (1 - at))
    want = a * x + (math.sqrt(ap) - math.sqrt(at) * a) * x0
    got, got_x0 = sched.step(v, 979, 999, x)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("t", "target"), [(979, 959), (19, None)])
def test_ddim_step_with_exact_velocity_lands_on_the_forward_process(t, target):
    """With the true v for x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, DDIM (η=0) must give √ᾱ_p·x0 + √(1−ᾱ_p)·ε exactly."""
    sched = make_scheduler(PRESETS["2b"]["scheduler"])
    sched.timesteps(50)
    x0, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    at = sched.alphas_cumprod[t]
    ap = sched.alphas_cumprod[target] if target is not None else torch.tensor(1.0, dtype=torch.float64)
    xt = at.sqrt() * x0 + (1 - at).sqrt() * eps
    v = at.sqrt() * eps - (1 - at).sqrt() * x0
    got, got_x0 = sched.step(v, t, t + 20, xt)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, ap.sqrt() * x0 + (1 - ap).sqrt() * eps, rtol=0, atol=1e-12)


def test_dynamic_guidance_scale_matches_measured_values():
    """g = 6, N = 50 with the raw timestep (MODEL_NOTES 1.11: 2.29, 2.54, 6.97, 6.42, 2.79, 4.27)."""
    timesteps = make_scheduler(SchedulerConfig()).timesteps(50)[:6].tolist()
    got = [dynamic_guidance_scale(6.0, t, 50) for t in timesteps]
    assert got == pytest.approx([2.29, 2.54, 6.97, 6.42, 2.79, 4.27], abs=6e-3)
