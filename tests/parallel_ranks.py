"""ranks.Session without the page, on every process of `torchrun --nproc-per-node 2 tests/parallel_ranks.py MODEL
OUT` (tests/test_app_parallel.py runs it on CPU): rank 0 sends jobs as the app does, and some the app would refuse
first, and records what each gave in OUT/rank0.json; rank 1 serves them as the app's other ranks do.

The faults are rank 1's own: its first weight load fails (a file missing on its node), and once rank 0 has recorded,
a last job (seed 5) runs out of memory as it starts denoising, which ends rank 1 and then, through torchrun, rank 0.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# The app's modules, as `python app.py` finds them; not the page's: the app's other ranks import no Gradio either.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvideox.pipeline import CogVideoXPipeline, GenerationCancelled
from webapp import ranks

JOB = dict(
    prompt="a red fox trots through fresh snow",
    negative_prompt="",
    num_inference_steps=2,
    guidance_scale=6.0,
    num_frames=9,
    step_cache=None,
    video=None,
    image=None,
    strength=None,
)


def fail_once(pipe) -> None:
    load = pipe.load

    def failing(progress=None):
        pipe.load = load
        raise OSError(f"no such file: {pipe.root}/transformer/diffusion_pytorch_model.safetensors")

    pipe.load = failing


def fail_mid_run(pipe, seed: int) -> None:
    denoise = pipe.denoise

    def out_of_memory(embeds, job_seed, *args, **kwargs):
        if job_seed == seed:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return denoise(embeds, job_seed, *args, **kwargs)

    pipe.denoise = out_of_memory


def rank0(session, pipe, out: Path) -> None:
    records = {}

    def job(name, callback=lambda i, n: True, **change):
        try:
            result = session.run(pipe, {**JOB, **change}, callback=callback, on_stage=lambda name: None)
        except (ValueError, GenerationCancelled, ranks.LoadFailed) as e:
            records[name] = {"error": type(e).__name__, "message": str(e)}
            return
        np.save(out / f"{name}.npy", result.frames)
        records[name] = {"seed": result.seed, "parallel": result.settings["parallel"]}

    job("bad_frames", seed=1, num_frames=10)  # the library refuses it on every rank, before any collective
    job("load_fails", seed=2)  # rank 1 cannot load: every rank hears it
    job("first", seed=7)
    job("cancelled", seed=3, callback=lambda i, n: False)  # rank 0's cancel stops rank 1 at the same step
    job("drawn_seed", seed=None)
    job("no_guidance", seed=4, guidance_scale=1.0)  # refused before it is sent: no layout fits
    (out / "rank0.json").write_text(json.dumps(records))
    job("mid_run", seed=5)  # rank 1 fails in its first step and exits; torchrun then stops this rank
    (out / "rank0.json").write_text(json.dumps({**records, "mid_run": "rank 0 went on: it should not have"}))


def open_pipeline(args, device):
    return CogVideoXPipeline.from_pretrained(args.model, device=device), ""


def main(model: str, out: Path) -> None:
    args = SimpleNamespace(model=model, device="cpu", devices=None, parallel="cfg")  # as app.py's parse_args
    session, pipe, _notice = ranks.start(args, open_pipeline)
    if session.rank == 0:
        rank0(session, pipe, out)
    else:
        fail_once(pipe)
        fail_mid_run(pipe, seed=5)
        session.serve(pipe)  # never returns: the last job ends this process


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
