"""Text (+ a video or an image) -> video: encode the prompt with T5 (and the pixels with the VAE), denoise latents
with the transformer (CFG), decode with the VAE."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from torch.nn.attention import SDPBackend

from . import __version__, sampling, text
from . import quantize as _quantize

# MAX_SEED is re-exported: the app and the tests take the seed range from here.
from .arguments import MAX_SEED as MAX_SEED
from .arguments import Call, check_arguments, check_device, prepare
from .cache import StepCache
from .config import (
    GenerationDefaults,
    SchedulerConfig,
    TransformerConfig,
    VAEConfig,
    latent_frames,
    read_json,
)
from .layers import fastest_sdpa_backend
from .loading import ALL_PATTERNS, load_module, release_freed_memory, resolve_model
from .lora import LoraSet
from .offload import Offloader, default_working_bytes
from .preview import LatentPreview, every
from .sampling import Condition, guided
from .scheduler import make_scheduler

if TYPE_CHECKING:
    from .parallel import Parallel

SCHEDULER_NAMES = {"ddim": "CogVideoXDDIMScheduler", "dpm": "CogVideoXDPMScheduler"}
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


@contextmanager
def _timed(timings: dict, key: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t


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
        quantize: str | None = None,
    ):
        self.root, self.model_id, self.device, self.dtype = root, model_id, device, dtype
        self.compile, self.quantize = compile, quantize
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
        self.loras = LoraSet(self.transformer_config, self._lora_place)
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
        quantize: str | None = None,
    ) -> CogVideoXPipeline:
        """`model`: a local folder in the released layout, a Hub repo id, or "tiny-random" (a tiny model with random
        weights, written once in the temp dir: the CLI's and the app's offline model). Reads configs and the
        tokenizer only.

        dtype defaults to the model's: FP16 for 2B, BF16 for 5B (FP16 gives black videos there); FP32 on CPU.
        memory_mode: "resident", "model" or "sequential"; None picks one from free device memory at load.
        scheduler: "ddim" or "dpm"; None uses the class the checkpoint's scheduler config names.
        compile: torch.compile the transformer (slow first step, faster after).
        quantize: None, "int8" (needs torchao) or "fp8": the transformer's and T5's Linear weights stored in 8 bits
        (`cogvideox.quantize`), about half their memory.
        """
        device = check_device(device)
        quantize = _quantize.check_quantize(quantize, device)
        if str(model) == "tiny-random":
            from .testing import tiny_random_checkpoint

            root = tiny_random_checkpoint()
        else:
            root = resolve_model(model)
        if isinstance(dtype, str):
            dtype = {
                "fp16": torch.float16,
                "float16": torch.float16,
                "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16,
                "fp32": torch.float32,
                "float32": torch.float32,
            }.get(dtype)
            if dtype is None:
                raise ValueError("dtype must be one of fp16, bf16, fp32")
        if dtype is None:
            rotary = read_json(root / "transformer" / "config.json").get(
                "use_rotary_positional_embeddings", False
            )
            dtype = torch.float32 if device.type == "cpu" else (torch.bfloat16 if rotary else torch.float16)
        if memory_mode is not None and memory_mode not in Offloader.MODES:
            raise ValueError(f"memory_mode must be one of {Offloader.MODES}, got {memory_mode!r}")
        return cls(root, str(model), device, dtype, memory_mode or "auto", scheduler, compile, quantize)

    # -- limits and validation (cheap: no weights needed) -------------------------------------------------

    @property
    def fps(self) -> int:
        return GenerationDefaults.for_model(self.transformer_config, self.vae_config).fps

    @property
    def max_frames(self) -> int:
        return self.transformer_config.max_frames

    @property
    def defaults(self) -> dict:
        """num_frames, height, width, num_inference_steps, guidance_scale, fps: what a call leaves out."""
        return GenerationDefaults.for_model(self.transformer_config, self.vae_config).as_dict()

    @property
    def loaded(self) -> bool:
        return self.transformer is not None

    @property
    def needs_image(self) -> bool:
        """An image-to-video checkpoint: every call needs `image=` (a uint8 (H, W, 3) array)."""
        return self.transformer_config.image_to_video

    def count_tokens(self, prompt: str) -> text.TokenCount:
        return text.count_tokens(self.tokenizer, prompt, self.transformer_config.max_text_seq_length)

    def validate(self, *args, **kwargs) -> None:
        """Raise ValueError, saying what is allowed, for any argument out of range. No heavy work.

        The arguments are `__call__`'s checked ones: prompt, negative_prompt, num_frames, height, width,
        num_inference_steps, guidance_scale, seed, step_cache=None, preview_every=1, video=None, image=None,
        strength=None (`arguments.check_arguments`)."""
        check_arguments(self.transformer_config, self.vae_config, *args, **kwargs)

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
        # With 8-bit weights, T5's and the transformer's Linear weights go to 8 bits as they load
        text_encoder = text.load_text_encoder(self.root / "text_encoder", self.dtype, self.quantize)
        convert = None
        report("loading transformer", 0.5)
        with torch.device("meta"):
            transformer = CogVideoXTransformer(self.transformer_config)
            vae = CogVideoXVAE(self.vae_config)
        if self.quantize:
            convert = _quantize.converter(transformer, self.quantize)
        transformer = load_module(transformer, self.root / "transformer", self.dtype, convert)
        if self.quantize:  # a Linear whose weight the checkpoint names otherwise: none today
            _quantize.quantize_linears(transformer, self.quantize)
        report("loading VAE", 0.9)
        vae = load_module(vae, self.root / "vae", self.dtype)
        release_freed_memory()
        modules = {"text_encoder": text_encoder, "transformer": transformer, "vae": vae}
        self.offloader.place(modules, working=self.working_memory())
        report(self.offloader.describe(), 0.95)
        if self.compile:
            transformer.compile_blocks()
        self.text_encoder, self.transformer, self.vae = text_encoder, transformer, vae
        if self.loras.loras:
            report("folding LoRAs", 0.97)
            self.loras.reload()
        report("ready", 1.0)

    # -- LoRA (cogvideox/lora.py): folded into the transformer's weights -------------------------------------

    def load_lora(self, source: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA at `scale` (in [-LORA_MAX_SCALE, LORA_MAX_SCALE], 4): a .safetensors file, a folder holding one,
        a Hub repo id (downloaded like weights). Returns its name: `name`, else the file's stem (a folder's name for
        diffusers' pytorch_lora_weights.safetensors). Checked against this model first: a missing, damaged or unknown
        file, a key that matches no layer, a shape that does not fit is a ValueError naming the file and the first
        bad key, and nothing changes. Folded into the weights now if they are loaded, else when they load."""
        return self.loras.load(source, scale, name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        self.loras.set({**self.loras.scales, name: scale})

    def set_loras(self, scales: Mapping[str, float]) -> None:
        """Every loaded LoRA's scale at once, those left out 0 (loaded, not applied): only the layers whose sum
        changed are written, none when nothing did (cheap to call before every run)."""
        self.loras.set(scales)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (all when None): its layers get their checkpoint weights back, bit for bit."""
        self.loras.unload(name)

    def _lora_place(self):
        return (self.transformer, self.offloader, self.root / "transformer") if self.loaded else None

    def working_memory(self) -> int:
        """Predicted bytes a denoising step needs above the weights at this model's default size (CFG on, 16-bit):
        what the memory mode is picked for (offload.default_working_bytes)."""
        return default_working_bytes(self.transformer_config, self.vae_config)

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
        # 1. Check the inputs, defaults filled in (ValueError before any weights load)
        call = prepare(
            self.transformer_config,
            self.vae_config,
            prompt,
            negative_prompt,
            num_frames,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            seed,
            use_dynamic_cfg,
            step_cache,
            preview_every,
            video,
            image,
            strength,
        )
        if preview is not None and not callable(preview):
            raise ValueError(f"preview must be a function (step, total, frames), got {preview!r}")
        # 2. A parallel run: the degrees fit, and every rank runs the same call with rank 0's seed
        if parallel is not None:
            call, callback, preview = self.join_parallel(parallel, call, callback, preview)
        # 3.-8. Load, encode, denoise, decode
        return self.generate(call, video, image, callback, on_stage, preview, parallel)

    def generate(self, call: Call, video, image, callback, on_stage, preview, parallel) -> GenerationResult:
        """`__call__`'s stages after the checks: weights, prompt, start latents, denoising, frames, settings."""
        stage = on_stage or (lambda name: None)
        timings, t0 = {}, time.perf_counter()
        # 3. Weights
        with _timed(timings, "load"):
            if not self.loaded:
                stage("loading model")
                self.load()
        # 4. Prompt embeddings: [negative, positive] with CFG
        stage("encoding text")
        with _timed(timings, "text"):
            embeds = self.encode_prompts(call.prompts)  # (B, 226, D)
        # 5. The start video's or image's latents
        condition = None
        if video is not None or image is not None:
            stage(f"encoding {'video' if video is not None else 'image'}")
            with _timed(timings, "encode"):
                condition = self.encode_condition(video if video is not None else image, call.strength)
        # 6. Denoising loop
        stage("denoising")
        with _timed(timings, "denoise"):
            latents = self.sample(call, embeds, condition, callback, preview, parallel, timings)
        # 7. Latents to frames (rank 0 only)
        stage("decoding")
        with _timed(timings, "decode"):
            frames = self.decode(latents) if parallel is None or parallel.is_main else None
        timings["total"] = time.perf_counter() - t0
        # 8. What was made, for the sidecar
        settings = self.settings_of(call, condition, parallel)
        return GenerationResult(frames, call.seed, self.fps, settings, settings["dropped_tokens"], timings)

    def join_parallel(self, parallel: Parallel, call: Call, callback, preview):
        """Before any weights: the degrees fit this model and size, every rank agrees on the call (and takes rank
        0's seed), cancelling on any rank stops them all, and only rank 0 previews."""
        parallel.check(
            self.transformer_config,
            self.vae_config,
            call.num_frames,
            call.height,
            call.width,
            call.guidance > 1,
            self.compile,
        )
        seed = parallel.agree(call.seed, call.agreement())
        return (
            replace(call, seed=seed),
            parallel.shared_callback(callback),
            (preview if parallel.is_main else None),
        )

    def sample(
        self, call: Call, embeds, condition, callback, preview, parallel, timings: dict
    ) -> torch.Tensor:
        """The denoising stage: the step cache and the preview set up for this call, then `denoise`."""
        run = call.steps if call.strength is None else sampling.steps_to_run(call.steps, call.strength)
        cache = (
            None
            if call.threshold is None
            else StepCache.for_model(call.threshold, self.transformer_config, run)
        )
        on_x0 = None
        if preview is not None:
            # One preview frame per latent frame of the video: CogVideoX 1.5's padding in front is not shown
            pad, shown = self.padding_frames(call.num_frames), self.latent_preview()
            on_x0 = every(call.preview_every, lambda x0: shown(x0[:, pad:]), preview)
        latents = self.denoise(
            embeds,
            call.seed,
            call.num_frames,
            call.height,
            call.width,
            call.steps,
            call.guidance,
            callback,
            call.use_dynamic_cfg,
            cache,
            on_x0,
            condition,
            parallel,
        )
        if cache is not None:
            timings["steps_computed"] = cache.computed
        # CogVideoX 1.5: the frames padded in front (`latent_shape`) go, as diffusers drops them, before decoding
        return latents[:, self.padding_frames(call.num_frames) :]

    def settings_of(self, call: Call, condition: Condition | None, parallel: Parallel | None) -> dict:
        """The generation's settings as the sidecar keeps them (JSON-ready)."""
        count = self.count_tokens(call.prompt)
        step_cache = call.step_cache
        settings = {
            "prompt": call.prompt,
            "negative_prompt": call.negative_prompt,
            "seed": call.seed,
            "num_inference_steps": call.steps,
            "mode": "text-to-video" if condition is None else f"{condition.kind}-to-video",
            "strength": call.strength,
            "guidance_scale": float(call.guidance),
            "use_dynamic_cfg": call.use_dynamic_cfg,
            "step_cache": step_cache if step_cache is None or isinstance(step_cache, str) else call.threshold,
            "num_frames": call.num_frames,
            "height": call.height,
            "width": call.width,
            "fps": self.fps,
            "model": self.model_id,
            "scheduler": self.scheduler.config.class_name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": self.quantize,
            "dropped_tokens": count.dropped_tokens,
            "cogvideox_version": __version__,
        }
        if parallel is not None:
            settings["parallel"] = {"cfg": parallel.cfg, "sp": parallel.sp}
        if loras := self.loras.describe():
            settings["loras"] = loras
        return settings

    def denoise(
        self,
        embeds,
        seed,
        num_frames,
        height,
        width,
        steps,
        guidance,
        callback=None,
        dynamic_cfg=False,
        step_cache: StepCache | None = None,
        on_x0: Callable | None = None,
        condition: Condition | None = None,
        parallel: Parallel | None = None,
    ):
        """The sampler: CFG over [negative, positive] embeds; returns latents (1, F, C, h, w) in the model dtype.

        It starts from noise, or from `condition`, a video's or an image's VAE posterior (`sampling.start`).
        on_x0(step, total, x0) sees each step's predicted clean latents (read only: the DPM scheduler keeps them
        as state)."""
        shape = self.latent_shape(num_frames, height, width)
        generator = torch.Generator("cpu").manual_seed(seed)
        begin = sampling.start(
            self.scheduler,
            steps,
            shape,
            generator,
            self.device,
            self.dtype,
            self.vae_config.condition_scale,
            condition,
        )
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

    def padding_frames(self, num_frames: int) -> int:
        """Latent frames added in front so that CogVideoX 1.5's temporal patches (`patch_size_t`) tile them; 0 for
        1.0. The transformer denoises them with the rest; `sample` drops them (diffusers' `additional_frames`)."""
        return latent_frames(num_frames, self.transformer_config, self.vae_config)[1]

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """(1, F, C, h, w) of the latents denoised for one video of this size, CogVideoX 1.5's padding included."""
        s = self.vae_config.spatial_compression
        return (
            1,
            sum(latent_frames(num_frames, self.transformer_config, self.vae_config)),
            self.transformer_config.out_channels,
            height // s,
            width // s,
        )

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
        _, frames, _, height, width = latent_shape  # CogVideoX 1.5: padded, two latent frames a token
        tokens = frames // c.temporal_patch * (height // p) * (width // p)
        key = (batch, c.num_attention_heads, text_len + tokens, c.attention_head_dim)
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
