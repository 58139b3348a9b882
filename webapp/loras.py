"""The LoRAs the operator offers (`--lora-dir`): each `*.safetensors` file there is a choice, named by its stem,
loaded at start-up on every pipeline at scale 0 (cogvideox/lora.py folds none until a job asks). A visitor picks
from that list by name, a strength each (`Request.loras`, {name: strength}); no path or URL is ever taken from a
visitor. Each job sets every pipeline's scales afresh (`pipe.set_loras`), so one visitor's LoRAs never reach the
next visitor's clip.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gradio as gr

from cogvideox.config import LORA_MAX_SCALE

LABEL = "Styles (LoRA)"  # the page's words, and its refusals'


def offered_files(folder: str | Path) -> list[Path]:
    """The `*.safetensors` files in `folder`, by name; ValueError when it is not a folder or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--lora-dir {folder} is not a folder")
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        raise ValueError(f"--lora-dir {folder} holds no .safetensors file")
    return files


def load_offered(pipe, files: list[Path]) -> None:
    """Each offered file on `pipe` at scale 0, checked against its model now (read, not folded): a file that
    cannot be used stops the start-up in one line naming it."""
    for file in files:
        try:
            pipe.load_lora(file, 0.0, name=file.stem)
        except ValueError as e:
            raise SystemExit(f"error: --lora-dir: {' '.join(str(e).split())}") from None


def names(pipe) -> list[str]:
    """The LoRAs a visitor may pick on this pipeline (those the operator offered), in file order."""
    return list(pipe.loras.loras) if pipe is not None else []


def check(pipe, value) -> tuple[tuple[tuple[str, float], ...], str | None]:
    """A request's `loras` ({name: strength}, None or {} for none) -> ((name, strength) pairs of those not 0, in
    the offered order), or a problem in words naming the choices."""
    if value is None or value == {} or value == []:
        return (), None
    choices = names(pipe)
    if not choices:
        return (), "are not offered on this server: send none"
    listed = ", ".join(choices)
    if not isinstance(value, dict):
        return (), f"must be {{name: strength}} with names from: {listed}"
    for name, scale in value.items():
        if name not in choices:
            # Echoed only when plain (a message may be shown as HTML): a path, yes; markup, no.
            plain = isinstance(name, str) and re.fullmatch(r"[\w./:-]{1,60}", name)
            return (), f"has no LoRA {f'named {name!r}' if plain else 'by that name'}: choose from {listed}"
        number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not number or not math.isfinite(scale) or not abs(scale) <= LORA_MAX_SCALE:
            return (), f"{name}'s strength must be a number from {-LORA_MAX_SCALE:g} to {LORA_MAX_SCALE:g}"
    return tuple((n, float(value[n])) for n in choices if value.get(n)), None


# -- the page ----------------------------------------------------------------------------------------------------


def inputs(pipe) -> tuple[list[gr.Slider], gr.JSON]:
    """A strength slider per offered LoRA (0: off), closed under LABEL, and the hidden value the job reads
    ({name: strength}, kept in step with the sliders in the browser: `connect`). Nothing shows without LoRAs."""
    sliders = []
    if choices := names(pipe):
        with gr.Accordion(LABEL, open=False, elem_id="loras"):
            for i, name in enumerate(choices):
                sliders.append(
                    gr.Slider(
                        -LORA_MAX_SCALE,
                        LORA_MAX_SCALE,
                        0.0,
                        step=0.05,
                        label=name,
                        info="0: off, 1: as trained",
                        elem_id=f"lora-{i}",
                    )
                )
    value = gr.JSON({}, visible=False)
    value.api_info = lambda: {
        "type": "object",
        "additionalProperties": {"type": "number"},
        "description": f"optional: {{name: strength}} of this server's LoRAs"
        f" ({', '.join(choices) or 'none offered'}), each from {-LORA_MAX_SCALE:g} to {LORA_MAX_SCALE:g}"
        " (1: as trained)",
    }
    return sliders, value


def connect(sliders: list[gr.Slider], value: gr.JSON, choices: list[str]) -> None:
    """Each slider's change writes the job's value in the browser, at once (no round trip before a click)."""
    js = f"(...v) => Object.fromEntries({json.dumps(choices)}.map((n, i) => [n, v[i]]).filter(([n, s]) => s))"
    for slider in sliders:
        slider.change(None, sliders, value, js=js, queue=False, api_visibility="private")


def restored(settings: dict, choices: list[str]) -> tuple:
    """The sliders' values and the job's value as a clip had them (a LoRA no longer offered: left out)."""
    used = settings.get("loras")
    kept = {}
    for entry in used if isinstance(used, list) else []:
        if isinstance(entry, dict) and entry.get("name") in choices:
            scale = entry.get("scale")
            if (
                isinstance(scale, (int, float))
                and not isinstance(scale, bool)
                and abs(scale) <= LORA_MAX_SCALE
            ):
                kept[entry["name"]] = float(scale)
    return *(kept.get(n, 0.0) for n in choices), kept


def described(settings: dict) -> list[str]:
    """ "name strength" for each LoRA a clip was made with (its caption's words)."""
    used = settings.get("loras")
    return [
        f"{e['name']} {e['scale']:g}"
        for e in (used if isinstance(used, list) else [])
        if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("scale"), (int, float))
    ]
