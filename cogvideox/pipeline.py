"""Text (+ a video or an image) -> video: encode the prompt with T5 (and the pixels with the VAE), denoise latents
with the transformer (CFG), decode with the VAE."""

from __future__ import annotations

import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from torch.nn.attention import SDPBackend

from . import __version__, sampling, text
from .cache import StepCache, resolve_step_cache
from .config import SchedulerConfig, TransformerConfig, VAEConfig, read_json
from .layers import fastest_sdpa_backend
from .loading import ALL_PATTERNS, load_module, resolve_model
from .offload import Offloader
from .preview import LatentPreview, every
from .sampling import Condition, guided
from .scheduler import make_scheduler

if TYPE_CHECKING:
    from .parallel import Parallel

SCHEDULER_NAMES = {"ddim": "CogVideoXDDIMScheduler", "dpm": "CogVideoXDPMScheduler"}
MAX_SEED = 2**32
MAX_GUIDANCE = 100.0  # far past any useful scale (6 is the release's); keeps float math finite
EMBED_CACHE_SIZE = 32


class GenerationCancelled(Exception):
    """The per-step callback returned False: the run stopped, nothing went wrong."""


@dataclass
class GenerationResult:
    frames: np.ndarray | None  # (T, H, W, 3) uint8; None on the ranks other than 0 of a parallel run
    seed: int
    fps: int
    settings: dict
    dropped_tokens: int = 0
    timings: dict = field(default_factory=dict)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
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


class CogVideoXPipeline:
    """CogVideoX text to video, video to video (`video=`) and, with an I2V checkpoint, image to video (`image=`).
    Construction reads configs only; weights load on first use (or `load()`)."""

    def __init__(
        self,
        root: Path,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
        memory_mode: str,
        scheduler: str | None = None,
        compile: bool = False,
    ):
        self.root, self.model_id, self.device, self.dtype = root, model_id, device, dtype
        self.compile = compile
        self.transformer_config = TransformerConfig.from_json(root / "transformer" / "config.json")
        self.vae_config = VAEConfig.from_json(root / "vae" / "config.json")
        sched = read_json(root / "scheduler" / "scheduler_config.json")
        if scheduler is not None:
            if scheduler.lower() not in SCHEDULER_NAMES:
                raise ValueError(f"scheduler must be one of {sorted(SCHEDULER_NAMES)}, got {scheduler!r}")
            sched["_class_name"] = SCHEDULER_NAMES[scheduler.lower()]
        self.scheduler = make_scheduler(
            SchedulerConfig.from_dict(sched, source=root / "scheduler" / "scheduler_config.json")
        )
        self.offloader = Offloader(self.device, memory_mode)
        self.tokenizer = text.load_tokenizer(root / "tokenizer")
        self.text_encoder = self.transformer = self.vae = None
        self._embed_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._latent_preview: LatentPreview | None = None
        # (B, heads, S, head_dim) of the attention -> the fastest SDPA kernel there (None: PyTorch's pick).
        self.attention_backends: dict[tuple, SDPBackend | None] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        memory_mode: str | None = None,
        scheduler: str | None = None,
        compile: bool = False,
    ) -> CogVideoXPipeline:
        """`model`: a local folder in the released layout, a Hub repo id, or "tiny-random" (a tiny model with random
        weights, written once in the temp dir: the CLI's and the app's offline model). Reads configs and the
        tokenizer only.

        dtype defaults to the model's: FP16 for 2B, BF16 for 5B (FP16 gives black videos there); FP32 on CPU.
        memory_mode: "resident", "model" or "sequential"; None picks one from free device memory at load.
        scheduler: "ddim" or "dpm"; None uses the class the checkpoint's scheduler config names.
        compile: torch.compile the transformer (slow first step, faster after).
        """
        device = check_device(device)
        if str(model) == "tiny-random":
            from .testing import tiny_random_checkpoint

            root = tiny_random_checkpoint()
        else:
            root = resolve_model(model)
        if isinstance(dtype, str):
            dtype = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                     "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}.get(dtype)  # fmt: skip
            if dtype is None:
                raise ValueError("dtype must be one of fp16, bf16, fp32")
        if dtype is None:
            rotary = read_json(root / "transformer" / "config.json").get(
                "use_rotary_positional_embeddings", False
            )
            dtype = torch.float32 if device.type == "cpu" else (torch.bfloat16 if rotary else torch.float16)
        if memory_mode is not None and memory_mode not in Offloader.MODES:
            raise ValueError(f"memory_mode must be one of {Offloader.MODES}, got {memory_mode!r}")
        return cls(root, str(model), device, dtype, memory_mode or "auto", scheduler, compile)

    # -- limits and validation (cheap: no weights needed) -------------------------------------------------

    @property
    def fps(self) -> int:
        return 8

    @property
    def max_frames(self) -> int:
        return self.transformer_config.sample_frames

    @property
    def defaults(self) -> dict:
        s = self.vae_config.spatial_compression
        return {
            "num_frames": self.transformer_config.sample_frames,
            "height": self.transformer_config.sample_height * s,
            "width": self.transformer_config.sample_width * s,
            "num_inference_steps": 50,
            "guidance_scale": 6.0,
            "fps": self.fps,
        }

    @property
    def loaded(self) -> bool:
        return self.transformer is not None

    @property
    def needs_image(self) -> bool:
        """An image-to-video checkpoint: every call needs `image=` (a uint8 (H, W, 3) array)."""
        return self.transformer_config.image_to_video

    def count_tokens(self, prompt: str) -> text.TokenCount:
        return text.count_tokens(self.tokenizer, prompt, self.transformer_config.max_text_seq_length)

    def validate(self, prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale,
                 seed, step_cache=None, preview_every=1, video=None, image=None, strength=None):  # fmt: skip
        """Raise ValueError, saying what is allowed, for any argument out of range. No heavy work."""
        if not isinstance(prompt, str) or text.is_blank(prompt):
            raise ValueError("prompt must be a non-empty string (invisible characters alone do not count)")
        if not isinstance(negative_prompt, str):
            raise ValueError("negative_prompt must be a string")
        sampling.check_conditioning(self.transformer_config, self.vae_config.spatial_compression, video, image,
                                    strength, num_frames, height, width, num_inference_steps)  # fmt: skip
        temporal = int(self.vae_config.temporal_compression_ratio)
        _check_int("num_frames", num_frames, 1, self.max_frames)
        if (num_frames - 1) % (2 * temporal):
            raise ValueError(
                f"num_frames must be 8N+1 (1, 9, 17, ...) and at most {self.max_frames}, got {num_frames}"
            )
        for name, value in (("height", height), ("width", width)):
            if _check_int(name, value, 16, 4096) % 16:
                raise ValueError(f"{name} must be a positive multiple of 16 (at most 4096), got {value}")
        _check_int("num_inference_steps", num_inference_steps, 1, 1000)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        # Compared, not converted: float(10**400) would raise OverflowError.
        if not 1 <= guidance_scale <= MAX_GUIDANCE:  # NaN fails too
            shown = guidance_scale if abs(guidance_scale) < 1e12 else "a number out of range"
            raise ValueError(f"guidance_scale must be in [1, {MAX_GUIDANCE:g}], got {shown}")
        if seed is not None:
            _check_int("seed", seed, 0, MAX_SEED - 1)
        resolve_step_cache(step_cache)
        _check_int("preview_every", preview_every, 1)

    # -- loading -------------------------------------------------------------------------------------------

    def load(self, progress: Callable[[str, float], None] | None = None) -> None:
        """Load the weights (downloading them from the Hub if needed) and place them per the memory mode."""
        if self.loaded:
            return
        from transformers.utils import logging as hf_logging

        from .transformer import CogVideoXTransformer
        from .vae import CogVideoXVAE

        def report(stage: str, fraction: float, detail: str = "") -> None:
            # The detail (a folder) goes to the terminal only: the page may be public.
            print(f"[cogvideox] {stage}{detail} ({fraction:.0%})", file=sys.stderr, flush=True)
            if progress is not None:
                progress(stage, fraction)

        complete = all(
            any((self.root / c).glob("*.safetensors")) for c in ("transformer", "vae", "text_encoder")
        )
        if not complete and not Path(self.model_id).expanduser().is_dir():
            # A Hub snapshot that has only the configs so far.
            report("downloading weights", 0.0, f" of {self.model_id} from the Hugging Face Hub")
            self.root = resolve_model(self.model_id, ALL_PATTERNS)
        report("loading weights", 0.05, f" from {self.root}")
        report("loading text encoder", 0.1)
        hf_logging.disable_progress_bar()
        text_encoder = text.load_text_encoder(self.root / "text_encoder", self.dtype)
        report("loading transformer", 0.5)
        with torch.device("meta"):
            transformer = CogVideoXTransformer(self.transformer_config)
            vae = CogVideoXVAE(self.vae_config)
        transformer = load_module(transformer, self.root / "transformer", self.dtype)
        report("loading VAE", 0.9)
        vae = load_module(vae, self.root / "vae", self.dtype)
        self.offloader.place({"text_encoder": text_encoder, "transformer": transformer, "vae": vae})
        report(self.offloader.describe(), 0.95)
        if self.compile:
            transformer.compile_blocks()
        self.text_encoder, self.transformer, self.vae = text_encoder, transformer, vae
        report("ready", 1.0)

    def release(self) -> None:
        """Free what the last run left on the device (after an out-of-memory error, say); weights stay loaded.

        Unused tensors go back to this device's cache; the cache goes back to the driver only when no other
        pipeline on a GPU shares the process, as torch.cuda.empty_cache() empties every GPU's (offload.py)."""
        self.offloader.release()

    # -- generation ------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), 226, D) in the pipeline dtype, from the cache where possible (same prompt, new seed)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if missing:
            ids = text.tokenize(self.tokenizer, missing, self.transformer_config.max_text_seq_length)
            with self.offloader.use(self.text_encoder):
                embeds = text.encode(self.text_encoder, ids).to(device="cpu", dtype=self.dtype)
            for p, e in zip(missing, embeds):
                self._embed_cache[p] = e
        for p in prompts:
            self._embed_cache.move_to_end(p)
        while len(self._embed_cache) > EMBED_CACHE_SIZE:
            self._embed_cache.popitem(last=False)
        return torch.stack([self._embed_cache[p] for p in prompts]).to(self.device)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        callback: Callable[[int, int], bool | None] | None = None,
        on_stage: Callable[[str], None] | None = None,
        use_dynamic_cfg: bool = False,
        step_cache: str | float | None = None,
        preview: Callable[[int, int, np.ndarray], object] | None = None,
        preview_every: int = 1,
        video: np.ndarray | None = None,
        image: np.ndarray | None = None,
        strength: float | None = None,
        parallel: Parallel | None = None,
    ) -> GenerationResult:
        """Generate one video.

        callback(step, total) after every step; returning False cancels (GenerationCancelled).
        step_cache: None computes every step; "quality" or "fast" (TeaCache thresholds 0.1, 0.2) or a threshold
        >= 0 skips the transformer blocks on steps that would change little (0 computes every step).
        preview(step, total, frames) every `preview_every` steps and after the last: uint8 (F, h, w, 3), one
        frame per latent frame at latent resolution, of the clean video predicted at that step.
        video: uint8 (T, H, W, 3) at the generation size, 8N+1 frames (num_frames defaults to T): video to video,
        its latents noised to `strength` in (0, 1] (default 0.8: the last int(steps·strength) steps run).
        image: uint8 (H, W, 3) at the generation size: image to video, for checkpoints that need it (needs_image).
        parallel: a `cogvideox.parallel.Parallel` (CFG and/or sequence parallel over torch.distributed), passed on
        every rank with the same arguments; only rank 0 decodes: the other ranks' `frames` is None.
        """
        d = self.defaults
        if num_frames is None:
            num_frames = len(video) if isinstance(video, np.ndarray) and video.ndim == 4 else d["num_frames"]
        height = d["height"] if height is None else height
        width = d["width"] if width is None else width
        steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance = d["guidance_scale"] if guidance_scale is None else guidance_scale
        negative_prompt = "" if negative_prompt is None else negative_prompt
        self.validate(prompt, negative_prompt, num_frames, height, width, steps, guidance, seed,
                      step_cache, preview_every, video, image, strength)  # fmt: skip
        if video is not None:
            strength = float(sampling.DEFAULT_STRENGTH if strength is None else strength)
        if preview is not None and not callable(preview):
            raise ValueError(f"preview must be a function (step, total, frames), got {preview!r}")
        threshold = resolve_step_cache(step_cache)
        seed = secrets.randbelow(MAX_SEED) if seed is None else int(seed)
        if parallel is not None:  # before any weights: the degrees fit, and every rank runs the same call
            parallel.check(self.transformer_config, self.vae_config, num_frames, height, width, guidance > 1,
                           self.compile)  # fmt: skip
            seed = parallel.agree(seed, (prompt, negative_prompt, num_frames, height, width, steps, guidance,
                                         use_dynamic_cfg, threshold, strength, video is None, image is None))  # fmt: skip
            callback = parallel.shared_callback(callback)
            preview = preview if parallel.is_main else None
        stage = on_stage or (lambda name: None)
        timings, t0 = {}, time.perf_counter()

        if not self.loaded:
            stage("loading model")
            self.load()
        timings["load"] = time.perf_counter() - t0

        stage("encoding text")
        t = time.perf_counter()
        cfg = guidance > 1.0
        embeds = self.encode_prompts([negative_prompt, prompt] if cfg else [prompt])  # (B, 226, D)
        timings["text"] = time.perf_counter() - t

        condition = None
        if video is not None or image is not None:
            stage(f"encoding {'video' if video is not None else 'image'}")
            t = time.perf_counter()
            condition = self.encode_condition(video if video is not None else image, strength)
            timings["encode"] = time.perf_counter() - t

        stage("denoising")
        t = time.perf_counter()
        run = steps if strength is None else sampling.steps_to_run(steps, strength)
        cache = None if threshold is None else StepCache.for_model(threshold, self.transformer_config, run)
        on_x0 = None if preview is None else every(preview_every, self.latent_preview(), preview)
        latents = self.denoise(embeds, seed, num_frames, height, width, steps, guidance, callback, use_dynamic_cfg,
                               cache, on_x0, condition, parallel)  # fmt: skip
        timings["denoise"] = time.perf_counter() - t
        if cache is not None:
            timings["steps_computed"] = cache.computed

        stage("decoding")
        t = time.perf_counter()
        frames = self.decode(latents) if parallel is None or parallel.is_main else None
        timings["decode"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0

        count = self.count_tokens(prompt)
        settings = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "num_inference_steps": steps,
            "mode": "text-to-video" if condition is None else f"{condition.kind}-to-video",
            "strength": strength,
            "guidance_scale": float(guidance),
            "use_dynamic_cfg": use_dynamic_cfg,
            "step_cache": step_cache if step_cache is None or isinstance(step_cache, str) else threshold,
            "num_frames": num_frames,
            "height": height,
            "width": width,
            "fps": self.fps,
            "model": self.model_id,
            "scheduler": self.scheduler.config.class_name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dropped_tokens": count.dropped_tokens,
            "cogvideox_version": __version__,
        }
        if parallel is not None:
            settings["parallel"] = {"cfg": parallel.cfg, "sp": parallel.sp}
        return GenerationResult(frames, seed, self.fps, settings, count.dropped_tokens, timings)

    def denoise(self, embeds, seed, num_frames, height, width, steps, guidance, callback=None, dynamic_cfg=False,
                step_cache: StepCache | None = None, on_x0: Callable | None = None,
                condition: Condition | None = None, parallel: Parallel | None = None):  # fmt: skip
        """The sampler: CFG over [negative, positive] embeds; returns latents (1, F, C, h, w) in the model dtype.

        It starts from noise, or from `condition`, a video's or an image's VAE posterior (`sampling.start`).
        on_x0(step, total, x0) sees each step's predicted clean latents (read only: the DPM scheduler keeps them
        as state)."""
        s = self.vae_config.spatial_compression
        shape = (1, (num_frames - 1) // int(self.vae_config.temporal_compression_ratio) + 1,
                 self.transformer_config.out_channels, height // s, width // s)  # fmt: skip
        generator = torch.Generator("cpu").manual_seed(seed)
        begin = sampling.start(self.scheduler, steps, shape, generator, self.device, self.dtype,
                               self.vae_config.scaling_factor, condition)  # fmt: skip
        latents, timesteps, total = begin.latents, begin.timesteps, len(begin.timesteps)
        # Wrappers of the model call forward(latents, text_embeds, timestep), applied in order (innermost first).
        wrappers = [] if step_cache is None else [step_cache.wrap]
        if begin.image_latents is not None:
            wrappers.append(sampling.with_image(begin.image_latents))
        if parallel is not None:  # outermost: each CFG rank runs its row of the batch
            wrappers.append(parallel.split_cfg)
        forward = self.transformer if parallel is None else parallel.shard(self.transformer)
        for wrap in wrappers:
            forward = wrap(forward)
        predict = guided(forward, embeds, guidance, total, dynamic_cfg)
        old_x0 = None
        backend = self.attention_kernel(embeds.shape[0], embeds.shape[1], shape)
        with self.offloader.use(self.transformer), self.transformer.attention_kernel(backend):
            for i, t in enumerate(timesteps.tolist()):
                pred = predict(latents, t)
                prev_t = int(timesteps[i - 1]) if i > 0 else None
                latents, old_x0 = self.scheduler.step(pred, t, prev_t, latents, old_x0, generator)
                latents = latents.to(self.dtype)
                if on_x0 is not None:
                    on_x0(i + 1, total, old_x0)
                if callback is not None and callback(i + 1, total) is False:
                    raise GenerationCancelled(f"cancelled after step {i + 1} of {total}")
        return latents

    def encode_condition(self, pixels: np.ndarray, strength: float | None = None) -> Condition:
        """A uint8 video (T, H, W, 3) (to be noised to `strength`) or image (H, W, 3) -> its VAE posterior."""
        x = sampling.pixels_to_tensor(pixels, self.device, self.dtype)  # (1, 3, T, H, W) in [-1, 1]
        with self.offloader.use(self.vae):
            moments = self.vae.encode(x, moments=True)  # (1, 2C, F, h, w)
        if pixels.ndim == 4:
            return Condition(moments, "video", strength)
        return Condition(moments, "image")

    def latent_preview(self) -> LatentPreview:
        """The latent -> RGB map of previews, fitted to this checkpoint's VAE on first use (a few encoder passes
        on small synthetic clips), then kept."""
        if self._latent_preview is None:
            self.load()
            with self.offloader.use(self.vae):
                self._latent_preview = LatentPreview.fit(self.vae, self.device, self.dtype)
        return self._latent_preview

    def attention_kernel(self, batch: int, text_len: int, latent_shape: tuple) -> SDPBackend | None:
        """The fastest SDPA kernel for the transformer's attention at this video size, timed on first use."""
        c, p = self.transformer_config, self.transformer_config.patch_size
        _, frames, _, height, width = latent_shape
        key = (
            batch,
            c.num_attention_heads,
            text_len + frames * (height // p) * (width // p),
            c.attention_head_dim,
        )
        if key not in self.attention_backends:
            if self.compile and self.attention_backends:
                # The compiled blocks are traced with the kernel they call: another would recompile every block
                # (one graph serves every size). The first pick stands, and nothing is timed in vain.
                self.attention_backends[key] = next(iter(self.attention_backends.values()))
            else:
                self.attention_backends[key] = fastest_sdpa_backend(key, self.dtype, self.device)
        return self.attention_backends[key]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(1, F, C, h, w) latents -> (T, H, W, 3) uint8 frames; on out-of-memory, retry with tiling."""
        z = rearrange(latents, "b f c h w -> b c f h w") * (1 / self.vae_config.scaling_factor)
        with self.offloader.use(self.vae):
            video = self.offloader.decode_with_retry(self.vae, z)  # (1, 3, T, H, W) in [-1, 1]
        video = (video[0].float() / 2 + 0.5).clamp(0, 1)
        return rearrange((video * 255).round().to(torch.uint8), "c t h w -> t h w c").cpu().numpy()
