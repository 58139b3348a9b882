"""A real headless Chromium (Debian's, driven by playwright; no browser download) uses the app end to end."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

import app
from cogvideox import CogVideoXPipeline
from cogvideox.enhance import PromptEnhancer
from cogvideox.testing import EchoBackend

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
IDEA = "a red fox in the snow"
REWRITE = "A red fox trots across a snowy meadow at sunrise while the camera pans slowly beside it."


@pytest.fixture(scope="module")
def server(tiny_2b, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser-outputs")
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(out / "gradio"))
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    enhancer = PromptEnhancer(EchoBackend(REWRITE), lambda text: pipe.count_tokens(text).n_tokens)
    demo = app.create_demo(pipe, enhancer, output_dir=out, notice=app.TINY_NOTICE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(**app.launch_options(app.parse_args(["--port", str(port), "--output-dir", str(out)])),
                prevent_thread_lock=True, quiet=True)  # fmt: skip
    try:
        yield demo.local_url, pipe
    finally:
        demo.close()
        env.undo()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):  # CI installs it (make browser-deps): a missing browser there is a failure
            pytest.fail("no chromium on CI: `make browser-deps` should have installed Debian's")
        pytest.skip("no chromium: `make browser-deps` installs Debian's")
    with playwright.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def click_and_wait_for_a_clip(page, button: str):
    count = page.locator("#gallery .thumbnail-item").count()
    page.get_by_role("button", name=button).click()
    page.wait_for_function(
        f"document.querySelectorAll('#gallery .thumbnail-item').length > {count}", timeout=60_000
    )


def generate(page, seed: int, steps: int = 2):
    for selector, value in (("#seed input", seed), ("#steps input[type=number]", steps)):
        page.locator(selector).fill(str(value))
        page.locator(selector).press("Tab")
    click_and_wait_for_a_clip(page, "🎬 Generate")


def test_prompt_generate_video_gallery_and_screenshot(server, browser):
    url = server[0]
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#prompt textarea")
    assert "random weights" in page.inner_text("#model-status")

    page.locator("#prompt textarea").fill(IDEA)
    page.wait_for_function("document.querySelector('#token-count').innerText.includes('/ 226 T5 tokens')")
    page.get_by_role("button", name="✨ Enhance prompt").click()  # shows the rewrite and the original...
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {REWRITE!r}")
    page.get_by_text("Enhanced by echo").wait_for()
    page.get_by_role("button", name="↩️ Undo: restore the original").click()  # ...and can undo it
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {IDEA!r}")
    page.get_by_text("Advanced").click()
    generate(page, seed=11)
    generate(page, seed=22)

    video = page.locator("#result-video video")
    assert video.get_attribute("src").endswith(".mp4")
    assert page.locator("#download-mp4").is_enabled() and page.locator("#download-gif").is_enabled()
    captions = page.locator("#gallery .thumbnail-item").all_inner_texts()
    assert captions == ["seed 22 · 2 steps", "seed 11 · 2 steps"]  # newest first

    page.locator("#gallery .thumbnail-item").nth(1).click()  # the older clip: shown, settings restored
    page.wait_for_function("document.querySelector('#seed input').value === '11'")
    click_and_wait_for_a_clip(page, "🎬 Render final (50 steps)")  # the draft's seed and prompt, 50 steps
    newest = page.locator("#gallery .thumbnail-item").first.inner_text()
    assert "seed 11 · 50 steps" in newest and page.locator("#seed input").input_value() == "11"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "app.png", full_page=True)

    other = browser.new_context().new_page()  # another visitor sees none of these clips
    other.goto(url)
    other.wait_for_selector("#prompt textarea")
    assert other.locator("#gallery .thumbnail-item").count() == 0
    assert other.locator("#prompt textarea").input_value() == ""
    other.wait_for_function("/^[0-9]+$/.test(document.querySelector('#seed input').value)")  # a fresh seed


def test_the_cancel_button_stops_the_job_at_the_next_step(server, browser):
    url, pipe = server
    pipe.load()
    steps = []

    def slow(*_):  # each step takes >= 0.2 s, so a 100-step job is still running when Cancel is clicked
        steps.append(time.monotonic())
        time.sleep(0.2)

    hook = pipe.transformer.register_forward_pre_hook(slow)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.locator("#prompt textarea").fill(IDEA)
        page.get_by_text("Advanced").click()
        page.locator("#steps input[type=number]").fill("100")
        page.locator("#steps input[type=number]").press("Tab")
        page.get_by_role("button", name="🎬 Generate").click()
        page.wait_for_selector("#result-video :text('Denoising')")  # the progress bar, with the stage
        clicked = time.monotonic()
        page.get_by_role("button", name="⏹ Cancel").click()
        time.sleep(1.0)
        after = [t for t in steps if t > clicked]
        assert len(after) <= 3, f"{len(after)} steps ran after Cancel"
        assert len(steps) < 100 and page.locator("#gallery .thumbnail-item").count() == 0
    finally:
        hook.remove()
