"""A Generate click (or a /generate call) as one value: its fields declared once, here, checked once, then passed
whole to the job and on to the pipeline.

Adding an input to the page takes this dataclass (a field, and what the pipeline gets of it in `pipeline_kwargs`),
the layout (a component in app.py's `inputs` list) and the pipeline; `/generate` gets the parameter by itself
(`endpoint` builds its signature from the fields).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Callable

import gradio as gr

from webapp import loras as offered
from webapp import uploads
from webapp.validation import FULL, check_inputs


@dataclasses.dataclass(frozen=True)
class Request:
    """What a visitor asks for, checked (`Request.check`). The fields up to `loras` are the page's inputs and, in
    this order and with these defaults, /generate's parameters."""

    prompt: str
    negative_prompt: str
    seed: int | None  # None: a random one (the page and the API send -1)
    steps: int
    guidance_scale: float
    num_frames: int
    speed: str = FULL  # Full, Faster or Fastest: the step cache
    video: dict | None = None  # an upload (Gradio's FileData) to start from, changed by `strength`
    strength: float | None = None
    smooth: bool = False  # a frame interpolated between each two, written at twice the fps
    image: dict | None = None  # the first frame, for an image-to-video model
    # {name: strength} of the operator's LoRAs (webapp/loras.py); checked: ((name, strength), ...) of those not 0
    loras: dict | tuple | None = None
    # What `check` made of them: the pipeline's keyword arguments (the upload read, once) and the file read.
    kwargs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    source: uploads.Source | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def check(cls, pipe, values: dict, parallel=None) -> Request:
        """`values` (raw, as JSON sends them: any type) -> a Request; RequestError with a problem per field.
        Cheap for the values; an upload is read here (cogvideox.media), so a file that cannot be used is refused
        before the job is queued, by its field."""
        values = {name: values.get(name, field.default) for name, field in INPUTS.items()}
        kwargs, errors = check_inputs(pipe, **{k: v for k, v in values.items() if k != "loras"})
        loras, problem = offered.check(pipe, values["loras"])
        if problem:
            errors = {**(errors or {}), "loras": problem}
        if not errors and parallel is not None:  # what torchrun's processes can split
            errors = parallel.problems(pipe, kwargs)
        if errors:
            raise RequestError(errors)
        try:
            kwargs, extras = uploads.prepare(pipe, kwargs, values["smooth"])
        except uploads.UploadError as e:  # not a video, damaged, too long, gone
            raise RequestError({e.field: str(e)}) from None
        typed = dict(
            seed=kwargs["seed"],
            steps=kwargs["num_inference_steps"],
            smooth=extras["smooth"],
            guidance_scale=kwargs["guidance_scale"],
            num_frames=kwargs["num_frames"],
            loras=loras,
        )
        return cls(**{**values, **typed}, kwargs=kwargs, source=extras["source"])

    def pipeline_kwargs(self) -> dict:
        """What the pipeline is called with (`pipe(**request.pipeline_kwargs())`)."""
        return dict(self.kwargs)

    def lora_scales(self) -> dict[str, float]:
        """What the job sets on its pipeline before it renders (`pipe.set_loras`): the offered LoRAs not named are 0."""
        return dict(self.loras or ())

    def clip_options(self) -> dict:
        """How the clip's file is written (clips.save_clip): smoothed or not, and the file it started from."""
        return {"smooth": self.smooth, "source": self.source}


# The page's inputs: every field but what `check` derives.
INPUTS = {f.name: f for f in dataclasses.fields(Request) if f.name not in ("kwargs", "source")}
REQUIRED = tuple(name for name, f in INPUTS.items() if f.default is dataclasses.MISSING)


class RequestError(ValueError):
    """A request that cannot be rendered: `problems` maps each field to what is wrong with it."""

    def __init__(self, problems: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()))
        self.problems = problems


def named(values) -> dict:
    """The page's input values, in the order of INPUTS (an image-to-video model's page has `image` too), by name."""
    return dict(zip(INPUTS, values))


class Checked:
    """Requests checked lately, by their values: a click is checked when it locks the buttons, and its validator
    and job (which Gradio calls with the same values) take that Request instead of checking again. A few are kept
    (each may hold a video's frames); the same values from another visitor give the same Request."""

    def __init__(self, pipe, parallel=None, size: int = 8):
        self.pipe, self.parallel, self.size = pipe, parallel, size
        self._lock, self._kept = threading.Lock(), OrderedDict()

    def __call__(self, values: dict) -> Request:
        """The Request of `values` (RequestError if they cannot be rendered), checked at most once while kept."""
        key = _key(values)
        with self._lock:
            found = self._kept.get(key)
            if found is not None:
                self._kept.move_to_end(key)
        if found is None:
            try:
                found = Request.check(self.pipe, values, self.parallel)
            except RequestError as e:
                found = e
            with self._lock:
                self._kept[key] = found
                while len(self._kept) > self.size:
                    self._kept.popitem(last=False)
        if isinstance(found, RequestError):
            raise found
        return found


def _key(values: dict) -> str:
    """The values as JSON canonically writes them (a seed of 7.0 is 7), with their types: `True` is not `1`."""

    def canonical(value):
        if isinstance(value, float) and value.is_integer():
            return ["int", int(value)]
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [canonical(v) for v in value]
        return [type(value).__name__, value]

    return json.dumps(canonical(values), sort_keys=True, default=repr)


def endpoint(run: Callable, name: str, doc: str) -> Callable:
    """`run(values: dict, request, progress)`, a generator, as Gradio calls an endpoint: a parameter per input, named,
    ordered and defaulted as Request declares them (what /generate's API shows), then Gradio's request (after the
    required inputs, where Gradio inserts it) and progress."""
    p = inspect.Parameter
    required = [p(name, p.POSITIONAL_OR_KEYWORD) for name in REQUIRED]
    optional = [
        p(n, p.POSITIONAL_OR_KEYWORD, default=f.default) for n, f in INPUTS.items() if n not in REQUIRED
    ]
    gradio = [
        p("request", p.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
        p("progress", p.POSITIONAL_OR_KEYWORD, default=PROGRESS),
    ]
    signature = inspect.Signature([*required, *gradio, *optional])

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        yield from run({n: given[n] for n in INPUTS}, given["request"], given["progress"])

    call.__signature__, call.__annotations__ = signature, {"request": gr.Request}
    call.__name__ = call.__qualname__ = name
    call.__doc__ = doc
    return call


PROGRESS = gr.Progress()
