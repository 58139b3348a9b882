"""The app on several processes: `torchrun --nproc-per-node N app.py --parallel cfg,sp` denoises each clip on all N
(cogvideox/parallel.py). Rank 0 serves the page as the app always does; the other ranks build no page and serve
nothing: they wait for rank 0's jobs, one at a time.

Each job, on a gloo group of its own (CPU, objects pickled, and a timeout of a year: a rank may wait days for the
next job): rank 0 broadcasts the job's checked pipeline kwargs, its seed drawn (None: stop); every rank checks
them, loads the weights if it has not yet, and all agree they did; then every rank calls
`pipe(**kwargs, parallel=layout)`, rank 0 with its progress, cancel and preview callbacks (its cancel stops every
rank at the same step: the library's per-step all-reduce of the callbacks' answers).

When a job fails:
- bad input: rank 0 checks a job before it broadcasts it (validation.check_inputs and `Session.problems`, as the
  page does before the queue). Every rank checks it again (the library's checks, on the same kwargs) before any
  weights or collective, so a ValueError is raised by every rank alike, and every rank goes on to the next job.
- loading: a rank that cannot load the weights (a missing file, out of memory) says so in the agreement; every
  rank raises `LoadFailed`, which the page shows, and goes on.
- anything else while the ranks exchange activations (out of memory mid-step, a lost peer): the other ranks wait
  in a collective that will not complete, and torch.distributed cannot call it off. The failing rank says so in
  one line and exits, and torchrun stops the others (`torchrun --max-restarts K` starts the app again). Rank 0's
  decode comes after the last collective: out of memory there is an ordinary job error, the next job runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from cogvideox.offload import is_out_of_memory
from cogvideox.parallel import (
    Parallel,
    check_degrees,
    degrees,
    init_from_torchrun,
    torchrun_device,
    video_tokens,
)
from cogvideox.pipeline import MAX_SEED, GenerationCancelled
from webapp.validation import frame_counts

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
WAIT_FOR_JOBS = timedelta(days=365)
STOP_WAIT_S = 30.0  # on shutdown: for a running job to stop at its next step, then for the stop message


class StartError(ValueError):
    """Why --parallel cannot start; `everywhere`: each rank may have its own reason (its model), so each says it."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


class LoadFailed(RuntimeError):
    """A rank could not load the weights: raised on every rank (none of them started the collectives)."""


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())  # CUDA errors run over several lines
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_flags(args, zero_gpu: bool) -> None:
    """StartError, in one line, for what --parallel cannot run with; before any process group."""
    if zero_gpu:
        raise StartError("--parallel is not for a ZeroGPU Space, which lends one GPU per job; leave it unset")
    if args.devices is not None:
        raise StartError(
            "give --devices (a job on each GPU at once) or --parallel (each clip on all of torchrun's "
            "processes), not both"
        )
    if missing := [name for name in TORCHRUN_ENV if name not in os.environ]:
        raise StartError(
            f"--parallel runs under torchrun: torchrun --nproc-per-node N app.py --parallel {args.parallel} "
            f"... ({missing[0]} is not set)"
        )


def layouts(modes: str, world: int) -> dict[bool, tuple[int, int] | str]:
    """(cfg, sp) with guidance on (True) and off (False), or why that cannot run; StartError if neither can."""
    found = {}
    for cfg_on in (True, False):
        try:
            found[cfg_on] = degrees(modes, world, cfg_on)
        except ValueError as e:
            found[cfg_on] = str(e)
    if all(isinstance(v, str) for v in found.values()):
        raise StartError(found[True])
    return found


class Session:
    """This process's part in the app's parallel jobs, after `start`: rank 0 calls `run` for each job and `stop`
    at its end; the other ranks call `serve`, which returns once rank 0 stops."""

    def __init__(self, modes: str, found: dict[bool, tuple[int, int] | str]):
        self.modes, self.rank, self.world = modes, dist.get_rank(), dist.get_world_size()
        built: dict[tuple[int, int], Parallel] = {}  # the same subgroups on every rank, in the same order
        self.layouts = {}
        for cfg_on, degree in found.items():
            if isinstance(degree, tuple) and degree not in built:
                built[degree] = Parallel(*degree)
            self.layouts[cfg_on] = built[degree] if isinstance(degree, tuple) else degree
        self.control = dist.new_group(backend="gloo", timeout=WAIT_FOR_JOBS)
        self.stopping = threading.Event()
        self.broken: str | None = None  # set once the ranks can no longer run a job together
        self._lock = threading.Lock()

    # -- what the page says and checks ---------------------------------------------------------------------

    def describe(self, device: torch.device) -> str:
        """How each clip is rendered: "1 clip on 2 GPUs: CFG parallel" (with guidance, where that matters)."""
        layout = next(v for v in self.layouts.values() if isinstance(v, Parallel))
        if layout.sp == 1:
            kind = "CFG parallel"
        elif layout.cfg == 1:
            kind = "sequence parallel"
        else:
            kind = f"CFG × sequence parallel, {layout.cfg} × {layout.sp}"
        where = "GPUs" if device.type == "cuda" else f"{device.type} processes"
        return f"1 clip on {self.world} {where}: {kind}"

    def _refusal(self, cfg_on: bool) -> str | None:
        """Why no layout fits a job with (True) or without guidance, in the words of the field's check."""
        found = self.layouts[cfg_on]
        if not isinstance(found, str):
            return None
        if "sp" not in self.modes.split(","):
            return (
                f"must be above 1 on this server: each clip's two guidance passes run on its two processes "
                f"(--parallel {self.modes})"
            )
        return f"must be {'1' if cfg_on else 'above 1'} on this server (--parallel {self.modes}: {found})"

    def layout(self, kwargs: dict) -> Parallel:
        """The layout for this job (CFG parallel needs guidance); ValueError saying why none fits."""
        cfg_on = kwargs["guidance_scale"] > 1
        if refusal := self._refusal(cfg_on):
            raise ValueError(f"guidance_scale {refusal}")
        return self.layouts[cfg_on]

    def problems(self, pipe, kwargs: dict) -> dict:
        """{field: problem} of a request that passed validation.check_inputs but that these ranks cannot split."""
        cfg_on = kwargs["guidance_scale"] > 1
        if refusal := self._refusal(cfg_on):
            return {"guidance_scale": refusal}
        d = pipe.defaults
        try:
            self.layouts[cfg_on].check(
                pipe.transformer_config,
                pipe.vae_config,
                kwargs["num_frames"],
                d["height"],
                d["width"],
                cfg_on,
                pipe.compile,
            )
        except ValueError as e:
            return {"num_frames": str(e)}
        return {}

    # -- a job -----------------------------------------------------------------------------------------------

    def run(
        self,
        pipe,
        kwargs: dict,
        callback,
        on_stage,
        preview=None,
        preview_every: int = 1,
        load_progress=None,
        loras: dict | None = None,
    ):
        """Rank 0: the job on every rank, with its LoRA scales (`pipe.set_loras` on each); its result (frames here).
        Raises what `pipe` raises, and LoadFailed."""
        layout = self.layout(kwargs)
        with self._lock:
            if self.stopping.is_set() or self.broken:
                raise GenerationCancelled("cancelled: the server is stopping")
            seed = secrets.randbelow(MAX_SEED) if kwargs.get("seed") is None else kwargs["seed"]
            kwargs = {**kwargs, "seed": seed}
            self._send((kwargs, loras or {}))
            self._check(pipe, kwargs, loras or {})
            self._agree_loaded(pipe, load_progress)

            def step(i: int, total: int) -> bool:  # a server stopping stops the job: every rank, at this step
                return not self.stopping.is_set() and callback(i, total) is not False

            return self._call(
                pipe,
                kwargs,
                layout,
                callback=step,
                on_stage=on_stage,
                preview=preview,
                preview_every=preview_every,
            )

    def serve(self, pipe) -> None:
        """Ranks > 0: run rank 0's jobs until it says stop. A job that fails on every rank alike is over; one that
        leaves the ranks apart (see the module's notes) ends this process, and torchrun then stops the others."""
        while (job := self._receive()) is not None:
            kwargs, loras = job
            try:
                self._check(pipe, kwargs, loras)
                self._agree_loaded(pipe)
                self._call(pipe, kwargs, self.layout(kwargs))
            except (ValueError, GenerationCancelled, LoadFailed):
                continue
            except Exception as e:
                why = self.broken or f"process {self.rank} of {self.world}: {one_line(e)}"
                print(
                    f"error: {why}; every process stops (torchrun --max-restarts restarts the app)",
                    file=sys.__stderr__,
                    flush=True,
                )
                os._exit(1)

    def _call(self, pipe, kwargs: dict, layout: Parallel, on_stage=None, **rank0):
        stage = ["checks"]

        def staged(name: str) -> None:
            stage[0] = name
            if on_stage is not None:
                on_stage(name)

        try:
            return pipe(**kwargs, parallel=layout, on_stage=staged, **rank0)
        except (ValueError, GenerationCancelled):
            raise  # raised on every rank alike: the checks before any collective, the agreed cancel
        except Exception as e:
            if stage[0] != "decoding":  # rank 0 decodes alone, after the last collective
                self.broken = f"process {self.rank} of {self.world} failed mid-run ({one_line(e)})"
            raise

    def _check(self, pipe, kwargs: dict, loras: dict) -> None:
        """Every rank: the library's checks of the job, on the same kwargs, before any weights or collectives (so
        a ValueError is every rank's); then the job's LoRA scales (every rank loaded the same LoRAs at start-up),
        folded now if the weights are loaded, else as they load."""
        d = pipe.defaults
        size = kwargs.get("num_frames"), kwargs.get("height", d["height"]), kwargs.get("width", d["width"])
        pipe.validate(
            kwargs["prompt"],
            kwargs["negative_prompt"],
            *size,
            kwargs["num_inference_steps"],
            kwargs["guidance_scale"],
            kwargs["seed"],
            kwargs.get("step_cache"),
            1,
            kwargs.get("video"),
            kwargs.get("image"),
            kwargs.get("strength"),
        )
        self.layout(kwargs).check(
            pipe.transformer_config, pipe.vae_config, *size, kwargs["guidance_scale"] > 1, pipe.compile
        )
        pipe.set_loras(loras)

    def _agree_loaded(self, pipe, progress=None) -> None:
        """Each rank loads the weights if it has not yet; LoadFailed on every rank if any could not."""
        error, out_of_memory = None, False
        if not pipe.loaded:
            try:
                pipe.load(progress=progress)
            except Exception as e:  # no collective has started: every rank hears of it below
                error, out_of_memory = one_line(e), is_out_of_memory(e)
        if out_of_memory:
            pipe.release()  # outside the except block, whose traceback holds what was loaded so far
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=self.control)
        if failed := next(((r, e) for r, e in enumerate(errors) if e is not None), None):
            raise LoadFailed(
                f"process {failed[0]} of {self.world} could not load {pipe.model_id}: {failed[1]}"
            )

    # -- messages ------------------------------------------------------------------------------------------

    def _send(self, message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.control)

    def _receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def stop(self, wait_s: float = STOP_WAIT_S) -> bool:
        """Rank 0: tell the other ranks to exit (a running job is cancelled at its next step first). False when that
        could not be done within `wait_s` (then exiting non-zero lets torchrun stop them)."""
        self.stopping.set()
        if self.broken or not self._lock.acquire(timeout=wait_s):
            return False
        try:
            sent = []
            sender = threading.Thread(target=lambda: sent.append(self._send(None)), daemon=True)
            sender.start()
            sender.join(min(wait_s, 5.0))  # a rank already gone: the send may never finish
            return bool(sent)
        finally:
            self._lock.release()


def start(args, open_pipeline, zero_gpu: bool = False):
    """Every rank: the checks, this rank's pipeline (configs and tokenizer, as the app loads it), the process group
    and the Session. Returns (session, pipeline, notice); StartError in one line for what cannot run."""
    check_flags(args, zero_gpu)
    try:
        device = torchrun_device(args.device)
    except ValueError as e:
        raise StartError(f"--parallel: {e}") from None
    found = layouts(args.parallel, int(os.environ["WORLD_SIZE"]))
    try:
        pipe, notice = open_pipeline(args, device)
    except Exception as e:  # this rank's model (a folder on one node only): each rank says its own
        raise StartError(f"the model {args.model} is unavailable: {one_line(e)}", everywhere=True) from None
    tokens = video_tokens(
        pipe.transformer_config,
        pipe.vae_config,
        frame_counts(pipe)[0],
        pipe.defaults["height"],
        pipe.defaults["width"],
    )
    for cfg_on, degree in found.items():  # against the model: its heads, compiled blocks, the shortest clip
        if isinstance(degree, tuple):
            try:
                check_degrees(pipe.transformer_config, *degree, cfg_on, tokens, pipe.compile)
            except ValueError as e:
                found[cfg_on] = str(e)
    if all(isinstance(v, str) for v in found.values()):
        raise StartError(f"--parallel {args.parallel}: {found[True]}")
    init_from_torchrun(device.type)
    return Session(args.parallel, found), pipe, notice


def main(args, open_pipeline, serve_page, zero_gpu: bool = False) -> None:
    """Every rank of `torchrun ... app.py --parallel`: rank 0 calls serve_page(pipe, notice, session) and, once it
    returns or raises, stops the others; they run its jobs until then, quietly (rank 0 speaks for all)."""
    rank = int(os.environ.get("RANK", "0"))
    with contextlib.ExitStack() as quiet:
        if rank != 0:
            devnull = quiet.enter_context(open(os.devnull, "w"))
            quiet.enter_context(contextlib.redirect_stdout(devnull))
            quiet.enter_context(contextlib.redirect_stderr(devnull))
        try:
            session, pipe, notice = start(args, open_pipeline, zero_gpu)
        except StartError as e:
            if rank == 0:
                raise SystemExit(f"error: {e}") from None
            if e.everywhere:
                print(f"error: process {rank}: {e}", file=sys.__stderr__, flush=True)
            raise SystemExit(1) from None
        if rank != 0:
            session.serve(pipe)
            dist.destroy_process_group()
            return
        try:
            serve_page(pipe, notice, session)
        finally:
            if not session.stop():
                why = session.broken or "a job did not stop in time"
                print(f"error: {why}: stopping every process", file=sys.__stderr__, flush=True)
                os._exit(1)
            dist.destroy_process_group()
