"""CogVideoX DDIM and DPM-Solver++(2M) SDE schedulers: the noise schedule, timesteps and the step update.

Numerically these follow diffusers' `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler` (MODEL_NOTES 1.10),
including their quirks: the step target is `t - T // N` whatever the spacing, and the schedule scalars are
0-d float64 tensors so that torch's type promotion (and therefore every rounding) is the same as theirs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from cogvideox.config import SchedulerConfig


def alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """ᾱ_t for t in [0, T): scaled-linear betas, SNR shift, optional zero-terminal-SNR rescale (float64)."""
    if config.trained_betas is not None or config.beta_schedule != "scaled_linear":
        raise ValueError(f"only beta_schedule='scaled_linear' is supported, got {config.beta_schedule!r}")
    t = config.num_train_timesteps
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, t, dtype=torch.float64) ** 2
    alphas_bar = torch.cumprod(1.0 - betas, dim=0)
    # SNR shift (SD3 style): SNR / s, written in terms of ᾱ.
    s = config.snr_shift_scale
    alphas_bar = alphas_bar / (s + (1 - s) * alphas_bar)
    if config.rescale_betas_zero_snr:
        # Lin et al. 2023, Alg. 1: shift √ᾱ so the last step has SNR 0, rescale so the first is unchanged.
        root = alphas_bar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        alphas_bar = root**2
    return alphas_bar


def dynamic_guidance_scale(guidance_scale: float, timestep: int, num_inference_steps: int) -> float:
    """CogVideoXPipeline's `use_dynamic_cfg` scale, 1 + g·(1 − cos(π·((N − t)/N)^5))/2.

    `timestep` is the raw timestep value (999…19), not the step index, exactly as diffusers and SAT do; that
    makes the scale oscillate ("wave-like", CogVideo issue #267) rather than ramp. Reproduced for parity.
    """
    n = num_inference_steps
    return 1 + guidance_scale * ((1 - math.cos(math.pi * ((n - timestep) / n) ** 5.0)) / 2)


def randn(shape: torch.Size, generator: torch.Generator, device: torch.device, dtype: torch.dtype):
    """diffusers' `randn_tensor`: draw on the generator's device in the target dtype, then move.

    On CUDA the CPU draw lands in page-locked memory and is copied without blocking, so the CPU keeps queueing
    the step instead of waiting for the GPU to catch up (PyTorch's pinned allocator keeps the buffer until the
    copy is done).
    """
    pin = device.type == "cuda" and generator.device.type == "cpu"
    noise = torch.empty(shape, dtype=dtype, device=generator.device, pin_memory=pin)
    return torch.randn(shape, generator=generator, dtype=dtype, out=noise).to(device, non_blocking=pin)


class Scheduler(ABC):
    """Schedule and timesteps shared by both samplers; `step` is the sampler-specific update."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)  # (T,) float64
        # ᾱ after the last step; 1 means "fully denoised".
        self.final_alpha_cumprod = (
            torch.tensor(1.0, dtype=torch.float64) if config.set_alpha_to_one else self.alphas_cumprod[0]
        )
        self.num_inference_steps: int | None = None

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Descending int64 timesteps for the configured spacing; also fixes the step size used by `step`."""
        total = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be in [1, {total}], got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        # numpy, as in diffusers, so rounding (half to even) and int casts agree bit for bit.
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            steps = np.linspace(0, total - 1, num_inference_steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            ratio = total // num_inference_steps
            steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.int64)
            steps += self.config.steps_offset
        else:  # trailing
            steps = np.round(np.arange(total, 0, -total / num_inference_steps)).astype(np.int64) - 1
        return torch.from_numpy(steps.copy())

    def _alphas(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ᾱ_t, ᾱ_target, target timestep) for one step from `timestep`."""
        if self.num_inference_steps is None:
            raise RuntimeError("call scheduler.timesteps(num_inference_steps) before step()")
        # diffusers uses a uniform stride even for linspace/leading spacing (diffusers PR #13125).
        target = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_target = self.alphas_cumprod[target] if target >= 0 else self.final_alpha_cumprod
        return self.alphas_cumprod[timestep], alpha_target, target

    def _predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor):
        if self.config.prediction_type == "v_prediction":
            return (alpha_t**0.5) * sample - ((1 - alpha_t) ** 0.5) * model_output
        return (sample - (1 - alpha_t) ** 0.5 * model_output) / alpha_t**0.5  # epsilon

    @abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        prev_timestep: int | None,
        sample: torch.Tensor,
        old_x0: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One denoising step from `timestep`; returns (next sample, predicted x0).

        `prev_timestep` is the timestep of the previous loop iteration (`timesteps[i - 1]`, None at i = 0;
        diffusers' `timestep_back`) and `old_x0` the x0 that iteration returned. The result's dtype follows
        torch promotion of `sample` and `model_output` (fp32 when either is), as in diffusers; the caller
        casts it back to the latent dtype.
        """


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (η = 0); `prev_timestep`, `old_x0` and `generator` are unused."""

    def step(self, model_output, timestep, prev_timestep, sample, old_x0=None, generator=None):
        alpha_t, alpha_target, _ = self._alphas(int(timestep))
        x0 = self._predict_x0(model_output, sample, alpha_t)
        a = ((1 - alpha_target) / (1 - alpha_t)) ** 0.5
        b = alpha_target**0.5 - alpha_t**0.5 * a
        return a * sample + b * x0, x0


class DPMScheduler(Scheduler):
    """SDE-DPM-Solver++(2M) in log-SNR λ = log √(ᾱ / (1 − ᾱ)); stochastic, so it needs `generator`."""

    def step(self, model_output, timestep, prev_timestep, sample, old_x0=None, generator=None):
        if generator is None:
            raise ValueError("the DPM scheduler draws noise every step: pass a seeded torch.Generator")
        alpha_t, alpha_target, target = self._alphas(int(timestep))
        x0 = self._predict_x0(model_output, sample, alpha_t)

        # At t = 999 (ᾱ = 0) and at the end (ᾱ = 1) λ is ∓inf; the multipliers still come out finite.
        lamb = ((alpha_t / (1 - alpha_t)) ** 0.5).log()
        h = ((alpha_target / (1 - alpha_target)) ** 0.5).log() - lamb
        mult_sample = ((1 - alpha_target) / (1 - alpha_t)) ** 0.5 * (-h).exp()
        mult_x0 = (-2 * h).expm1() * alpha_target**0.5
        mult_noise = (1 - alpha_target) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5

        # diffusers always draws this first-order noise, even when it then takes the second-order branch;
        # drawing it too keeps the generator in step with theirs.
        noise = randn(sample.shape, generator, sample.device, sample.dtype)
        if old_x0 is None or prev_timestep is None or target < 0:
            return mult_sample * sample - mult_x0 * x0 + mult_noise * noise, x0

        alpha_back = self.alphas_cumprod[int(prev_timestep)]
        r = (lamb - ((alpha_back / (1 - alpha_back)) ** 0.5).log()) / h
        denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        noise = randn(sample.shape, generator, sample.device, sample.dtype)
        return mult_sample * sample - mult_x0 * denoised + mult_noise * noise, x0


def make_scheduler(config: SchedulerConfig) -> Scheduler:
    cls = DDIMScheduler if config.class_name == "CogVideoXDDIMScheduler" else DPMScheduler
    return cls(config)
