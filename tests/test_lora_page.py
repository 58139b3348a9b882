"""The page's LoRAs (issue 24, item 5): the operator's --lora-dir files offered by name, a visitor's {name: strength}
checked once, each job setting its own, the gallery keeping them; served for real on loopback (gradio_client)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client

import app
from cogvideox import CogVideoXPipeline
from cogvideox.config import LORA_MAX_SCALE
from cogvideox.testing import free_port, write_tiny_lora
from cogvideox.video import read_mp4, write_mp4
from webapp import clips, launch, loras, serve
from webapp.request import Request, RequestError

ROOT = Path(__file__).resolve().parents[1]
GOOD = dict(
    prompt="a lighthouse at dusk", negative_prompt="", seed=3, steps=1, guidance_scale=6.0, num_frames=9
)


@pytest.fixture(scope="module")
def lora_dir(tiny_2b, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_tiny_lora(folder / "style.safetensors", tiny_2b, seed=1)
    write_tiny_lora(folder / "motion.safetensors", tiny_2b, seed=2)
    return folder


def offering(tiny_2b, lora_dir) -> CogVideoXPipeline:
    """A pipeline as the app opens it with --lora-dir (serve.open_pipeline): every file loaded at scale 0."""
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    args = launch.parse_args(["--lora-dir", str(lora_dir)])
    loras.load_offered(pipe, args.lora_files)
    return pipe


@pytest.fixture(scope="module")
def server(tiny_2b, lora_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("app") / "outputs"
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out)))
    pipe = offering(tiny_2b, lora_dir)
    demo = app.create_demo(pipe, output_dir=out)
    args = launch.parse_args(["--port", str(free_port()), "--output-dir", str(out)])
    demo.launch(**launch.launch_options(args), prevent_thread_lock=True, quiet=True)
    try:
        yield demo, pipe
    finally:
        demo.close()
        env.undo()


def test_a_request_takes_offered_names_within_the_bound(tiny_2b, lora_dir):
    pipe = offering(tiny_2b, lora_dir)
    assert loras.names(pipe) == ["motion", "style"]
    for scale in (LORA_MAX_SCALE, -LORA_MAX_SCALE, 0.8):
        assert Request.check(pipe, {**GOOD, "loras": {"style": scale}}).loras == (("style", scale),)
    both = Request.check(pipe, {**GOOD, "loras": {"style": 1, "motion": 0.5}})
    assert both.lora_scales() == {"motion": 0.5, "style": 1.0}
    assert Request.check(pipe, {**GOOD, "loras": {"style": 0}}).loras == ()  # 0: off, as none
    assert Request.check(pipe, GOOD).loras == ()
    refused = {
        "over": {"style": LORA_MAX_SCALE + 0.01},
        "under": {"style": -LORA_MAX_SCALE - 0.01},
        "nan": {"style": float("nan")},
        "bool": {"style": True},
        "text": {"style": "1"},
        "path": {"../x": 1.0},
        "url": {"https://example.org/x.safetensors": 1.0},
        "markup": {"<img src=x onerror=alert(1)>": 1.0},
        "list": [["style", 1.0]],
    }
    for case, value in refused.items():
        with pytest.raises(RequestError) as e:
            Request.check(pipe, {**GOOD, "loras": value})
        assert set(e.value.problems) == {"loras"}, case
        said = e.value.problems["loras"]
        assert ("motion, style" in said) if case in ("path", "url", "list", "markup") else "-4 to 4" in said
        assert "<" not in said and ("'../x'" in said) == (case == "path")  # a name echoed only when plain
    # A page with no LoRAs offered refuses any.
    bare = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    with pytest.raises(RequestError, match="not offered"):
        Request.check(bare, {**GOOD, "loras": {"style": 1.0}})


def test_a_bad_lora_dir_stops_the_start_up_in_one_line(tiny_2b, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        launch.parse_args(["--lora-dir", str(tmp_path / "none")])
    assert e.value.code == 2 and "--lora-dir" in capsys.readouterr().err
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    with pytest.raises(SystemExit) as e:
        loras.load_offered(pipe, launch.parse_args(["--lora-dir", str(tmp_path)]).lora_files)
    said = str(e.value.code)
    assert said.startswith("error: --lora-dir") and "broken.safetensors" in said and "\n" not in said


def test_no_lora_ui_when_none_offered(tiny_2b, lora_dir, tmp_path):
    def sliders(demo):
        config = demo.get_config_file()
        labels = {c["props"].get("label") for c in config["components"]}
        return labels & {"style", "motion", loras.LABEL}

    bare = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    assert sliders(app.create_demo(bare, output_dir=tmp_path)) == set()
    offered = app.create_demo(offering(tiny_2b, lora_dir), output_dir=tmp_path)
    assert sliders(offered) == {"style", "motion", loras.LABEL}
    accordion = next(
        c for c in offered.get_config_file()["components"] if c["props"].get("label") == loras.LABEL
    )
    assert accordion["props"]["open"] is False


def frames(path) -> np.ndarray:
    return read_mp4(path).astype(np.float32)


@pytest.mark.slow
def test_generate_with_loras_is_the_librarys_and_does_not_reach_the_next_visitor(
    server, tiny_2b, lora_dir, tmp_path
):
    demo, _ = server
    client = Client(demo.local_url, verbose=False)
    plain = client.predict(**GOOD, api_name="/generate")
    # The documented call (docs/app.md), as written.
    (call,) = re.findall(r"`(client\.predict\([^`]*loras=[^`]*\))`", (ROOT / "docs" / "app.md").read_text())
    styled = eval(call, {"client": client})  # our own docs
    again = client.predict(**GOOD, api_name="/generate")  # the next visitor, without: untouched by the last
    assert styled[2]["loras"][0]["name"] == "style" and styled[2]["loras"][0]["scale"] == 0.8
    assert "loras" not in again[2]
    documented = dict(zip(GOOD, ["a lighthouse at dusk", "", 3, 1, 6.0, 9]))  # the call's, in order
    assert documented == GOOD
    baseline = frames(plain[0])
    # The library with that LoRA, the same seed: the same video (through the same encoder).
    lib = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    lib.load_lora(lora_dir / "style.safetensors", 0.8)
    keys = ("prompt", "negative_prompt", "seed", "guidance_scale", "num_frames")
    result = lib(**{k: documented[k] for k in keys}, num_inference_steps=1)
    expected = frames(write_mp4(result.frames, tmp_path / "lib.mp4", fps=result.fps))
    got = frames(styled[0])
    assert np.abs(got - expected).mean() < 1.0
    assert np.abs(got - baseline).mean() > 10 * max(np.abs(got - expected).mean(), 0.1)
    assert np.array_equal(frames(plain[0]), frames(again[0]))
    # The gallery: the caption names it, and picking the clip restores its sliders.
    clip = {"name": "x.mp4", "mp4": styled[0], "gif": "", "seed": styled[1], "settings": styled[2]}
    assert "style 0.8" in clips.caption(clip) and clips.done_text(clip).endswith(", with style 0.8.")
    assert loras.restored(styled[2], ["motion", "style"]) == (0.0, 0.8, {"style": 0.8})


def test_an_unknown_lora_is_refused_over_http_by_its_field(server):
    demo, pipe = server
    lines = serve.startup_lines(launch.parse_args([]), pipe, demo)  # the operator's log names what is offered
    assert "  LoRAs offered on the page (2): motion, style" in lines
    client = Client(demo.local_url, verbose=False)
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"][
        "parameters"
    ]
    # Text to video: no image (a State holds its place, out of the API), the LoRAs last, none by default.
    assert [p["parameter_name"] for p in params][-3:] == ["strength", "smooth", "loras"]
    assert (
        params[-1]["parameter_default"] in (None, {}) and "motion, style" in params[-1]["type"]["description"]
    )
    with pytest.raises(Exception, match="choose from motion, style"):
        client.predict(**GOOD, loras={"../x": 1.0}, api_name="/generate")


def test_an_expired_clip_keeps_its_offered_loras_in_the_browsers_copy(tiny_2b, lora_dir, tmp_path):
    pipe = offering(tiny_2b, lora_dir)
    settings = {**GOOD, "num_inference_steps": 1, "loras": [{"name": "style", "scale": 0.8, "sha256": "ab"}]}
    del settings["steps"]
    clip = {"name": "20261206-120000-0123456789abcdef.mp4", "mp4": str(tmp_path / "gone.mp4"), "seed": 3}
    (entry,) = clips.browser_copy([{**clip, "settings": settings}])
    assert entry["loras"] == [{"name": "style", "scale": 0.8}]
    kept = clips.from_browser(entry, tmp_path, pipe)  # its files gone: the browser's copy, checked
    assert kept["settings"]["loras"] == [{"name": "style", "scale": 0.8}] and "style 0.8" in clips.caption(
        kept
    )
    for tampered in ([{"name": "../x", "scale": 1.0}], [{"name": "style", "scale": 9.0}], "style"):
        assert "loras" not in clips.from_browser({**entry, "loras": tampered}, tmp_path, pipe)["settings"]


@pytest.fixture(scope="module")
def chromium():
    """As tests/test_browser.py's `browser`: Debian's Chromium, or a skip where it is missing (not on CI)."""
    import test_browser

    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(test_browser.CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail("no chromium on CI: `make browser-deps` should have installed Debian's")
        pytest.skip("no chromium: `make browser-deps` installs Debian's")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=test_browser.CHROMIUM, args=test_browser.ARGS)
        yield browser
        browser.close()


@pytest.mark.slow
@pytest.mark.browser
def test_in_the_browser_a_slider_reaches_the_job_and_a_gallery_clip_restores_it(server, chromium):
    """The sliders write the job's value in the page (JavaScript): only a browser runs that."""
    from test_browser import click_and_wait_for_a_clip, set_steps, set_value

    page = chromium.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(server[0].local_url)
    page.locator("#prompt textarea").fill("a lighthouse at dusk")
    page.locator("#advanced").get_by_text("Advanced").click()
    set_steps(page, 1)
    page.get_by_text(loras.LABEL).click()
    set_value(page, "#lora-1 input[type=number]", 0.8)  # style
    click_and_wait_for_a_clip(page, "#generate")
    assert "style 0.8" in page.locator("#gallery .thumbnail-item").first.inner_text()
    set_value(page, "#lora-1 input[type=number]", 0)
    page.locator("#gallery .thumbnail-item").first.click()  # its settings back, its LoRA with them
    page.wait_for_function("document.querySelector('#lora-1 input[type=number]').value === '0.8'")
    page.close()
