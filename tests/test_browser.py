"""A real headless Chromium (Debian's, driven by playwright; no browser download) uses the app end to end, at
desktop and phone widths. Screenshots go to test-artifacts/."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import app
from cogvideox import CogVideoXPipeline
from cogvideox.enhance import PromptEnhancer
from cogvideox.testing import EchoBackend
from cogvideox.video import write_mp4
from webapp import launch, serve, validation

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
DESKTOP, PHONE = {"width": 1280, "height": 1000}, {"width": 390, "height": 844}
IDEA = "a red fox in the snow"
REWRITE = "A red fox trots across a snowy meadow at sunrise while the camera pans slowly beside it."
CAPTION = re.compile(r"^(⌛ expired · )?(.+) · (\d+) frames · (\d+) steps · seed (\d+)$")


@pytest.fixture(scope="module")
def server(tiny_2b, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser-outputs")
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(out / "gradio"))
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    pipe.model_id = "tiny-random"  # as the quick start names it (the README's screenshots are this page's)
    enhancer = PromptEnhancer(EchoBackend(REWRITE), lambda text: pipe.count_tokens(text).n_tokens)
    demo = app.create_demo(pipe, enhancer, output_dir=out, notice=serve.TINY_NOTICE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(
        **launch.launch_options(
            launch.parse_args(["--port", str(port), "--output-dir", str(out)]), app.THEME
        ),
        prevent_thread_lock=True,
        quiet=True,
    )
    try:
        yield demo.local_url, pipe, out
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


@contextmanager
def slow_steps(pipe, seconds: float = 0.2):
    """Each denoising step takes >= `seconds`, so a long job is still running when the test looks at it."""
    pipe.load()
    steps = []

    def slow(*_):
        steps.append(time.monotonic())
        time.sleep(seconds)

    hook = pipe.transformer.register_forward_pre_hook(slow)
    try:
        yield steps
    finally:
        hook.remove()


# Counts the page's writes to localStorage, where gr.BrowserState keeps this browser's gallery and prompt.
COUNT_WRITES = """window.__writes = 0; const setItem = Storage.prototype.setItem;
Storage.prototype.setItem = function (k, v) { window.__writes += 1; return setItem.call(this, k, v); };"""


def visit(browser, url: str, viewport=DESKTOP):
    """A new visitor: a browser context of its own (its own localStorage, as another person's browser)."""
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    context.add_init_script(COUNT_WRITES)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#prompt textarea")
    return page


def captions(page) -> list[str]:
    return page.locator("#gallery .thumbnail-item").all_inner_texts()


def seeds(page) -> list[int]:
    return [int(CAPTION.match(c)[5]) for c in captions(page)]


def set_value(page, selector: str, value) -> None:
    page.locator(selector).fill(str(value))
    page.locator(selector).press("Tab")


def set_steps(page, steps: int) -> None:
    """The Steps slider's box, then a check that the slider itself took it (the page sends the slider's)."""
    for _ in range(3):
        set_value(page, "#steps input[type=number]", steps)
        try:
            page.wait_for_function(
                f"document.querySelector('#steps input[type=range]').value === '{steps}'", timeout=2000
            )
            return
        except Exception:  # a box filled as the accordion opened: fill it again
            continue
    raise AssertionError(f"the Steps slider did not take {steps}")


def click_and_wait_for_a_clip(page, button: str):
    count = page.locator("#gallery .thumbnail-item").count()
    page.locator(button).click()
    page.wait_for_function(
        f"document.querySelectorAll('#gallery .thumbnail-item').length > {count}", timeout=60_000
    )
    page.wait_for_function("!document.querySelector('#generate').disabled")  # unlocked once it is done


def in_view(page, selector: str) -> bool:
    box, height = page.locator(selector).bounding_box(), page.viewport_size["height"]
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height


def text_of(page, selector: str) -> str:
    return page.locator(selector).locator("textarea, input").first.input_value()


def screenshot(page, name: str, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=full_page)


def test_prompt_seeds_gallery_gif_final_and_a_reload(server, browser):
    url, _, out = server
    page = visit(browser, url)
    status = page.inner_text("#model-status")  # the model by name and what it makes; where it runs: the log
    assert "random weights" in status and "tiny-random · up to 2 s at 8 fps, 96×64" in status
    assert "cpu" not in status and "float32" not in status
    assert text_of(page, "#seed-used") == "" and page.locator("#cancel").is_disabled()  # nothing yet
    # Reuse, MP4 and GIF are off until a clip, and a line beside them says so
    assert page.locator("#download-mp4").is_disabled() and page.locator("#reuse").is_disabled()
    assert (
        page.locator("#clip-note").inner_text() == "♻️ Reuse seed, ⬇️ MP4 and 🎞️ GIF: once you have made a clip."
    )

    page.get_by_role("button", name="✨ Enhance prompt").click()  # nothing to enhance: said by the button
    page.locator("#enhance-note").get_by_text("Enhance failed").wait_for()
    assert page.locator("#enhance-note").inner_text().startswith("⚠️ Enhance failed: ")
    assert page.locator("[data-testid='toast-body']").count() == 0  # not a toast in a corner
    screenshot(page, "enhance-refused.png", full_page=False)

    page.locator("#generate").click()  # an empty prompt: refused where it is typed and by the button; no lock
    page.locator("#prompt").get_by_text("is empty: describe the video you want").wait_for()
    page.locator("#run-status").get_by_text("Not started. The prompt is empty").wait_for()
    assert page.locator("#generate").is_enabled() and page.locator("#cancel").is_disabled()

    page.locator("#prompt textarea").fill(IDEA)
    page.wait_for_function("document.querySelector('#token-count').innerText.includes('words left')")
    assert "/ 226 T5 tokens" in page.locator("#token-count .tokens").get_attribute("title")  # the exact count
    page.get_by_role("button", name="✨ Enhance prompt").click()  # shows the rewrite and the original...
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {REWRITE!r}")
    page.get_by_text("Enhanced by echo").wait_for()
    assert not page.locator("#enhance-note").is_visible()  # the failure's line is gone
    page.get_by_role("button", name="↩️ Undo: restore the original").click()  # ...and can undo it
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {IDEA!r}")
    page.get_by_text("Advanced").click()
    set_steps(page, 2)
    click_and_wait_for_a_clip(page, "#generate")
    click_and_wait_for_a_clip(page, "#generate")  # "Randomize seed" is on: another seed, another video
    first, second = seeds(page)[::-1]
    assert first != second and CAPTION.match(captions(page)[0]).group(2, 3, 4) == (IDEA, "17", "2"), captions(
        page
    )
    assert text_of(page, "#seed-used") == str(second) and text_of(page, "#seed") == str(second)
    # ...which the Seed box holds but does not show while Random is on: it is not the next run's
    assert (
        page.evaluate("getComputedStyle(document.querySelector('#seed input')).color") == "rgba(0, 0, 0, 0)"
    )
    assert f"seed {second}" in page.inner_text("#run-status")
    video = page.locator("#result-video video")
    assert video.get_attribute("src").endswith(".mp4") and page.locator("#download-mp4").is_enabled()
    assert page.locator("#reuse").is_enabled() and not page.locator("#clip-note").is_visible()

    with page.expect_download() as gif:  # made on its first click, then downloaded
        page.locator("#make-gif").click()
    assert gif.value.suggested_filename.endswith(".gif") and page.locator("#download-gif").is_visible()

    page.locator("#gallery .thumbnail-item").nth(
        1
    ).click()  # the older clip: shown, its settings and seed fixed
    page.wait_for_function(f"document.querySelector('#seed input').value === '{first}'")
    assert not page.locator("#randomize input").is_checked() and text_of(page, "#seed-used") == str(first)
    assert not page.locator("#download-gif").is_visible()  # that clip has no GIF yet
    click_and_wait_for_a_clip(page, "#final")  # the draft's seed and prompt, 50 steps
    assert captions(page)[0] == f"{IDEA} · 17 frames · 50 steps · seed {first}"

    page.locator("#randomize input").check()
    page.locator("#reuse").click()  # one click: this seed again, and Randomize off
    page.wait_for_function("!document.querySelector('#randomize input').checked")
    assert text_of(page, "#seed") == str(first)
    screenshot(page, "app.png")

    # A reload keeps the gallery and the prompt; a clip whose files expired says so and keeps its settings.
    before = captions(page)
    for path in out.glob(f"{Path(page.locator('#result-video video').get_attribute('src')).stem}.*"):
        path.unlink()  # the clip on screen (the 50-step render): its files are gone
    writes = page.evaluate("window.__writes")
    page.locator("#prompt textarea").fill(IDEA + ", at dusk")
    page.wait_for_function(
        f"window.__writes > {writes}"
    )  # kept in the browser (after the meter's round trip)
    page.reload()
    page.wait_for_function(f"document.querySelectorAll('#gallery .thumbnail-item').length === {len(before)}")
    after = captions(page)
    assert after[0] == f"⌛ expired · {before[0]}" and after[1:] == before[1:]
    assert page.locator("#prompt textarea").input_value() == IDEA + ", at dusk"
    assert f"1 of your {len(before)} clips expired" in page.inner_text("#run-status")
    page.locator("#gallery .thumbnail-item").first.click()
    page.wait_for_selector('#run-status :text("This clip\'s files have expired")')
    page.wait_for_function(f"document.querySelector('#seed input').value === '{first}'")
    screenshot(page, "app-reloaded.png")


def test_cancel_says_where_it_stopped_clears_the_stale_clip_and_unlocks(server, browser):
    url, pipe, _ = server
    page = visit(browser, url)
    page.locator("#prompt textarea").fill(IDEA)
    page.get_by_text("Advanced").click()  # open: the progress must still show beside the buttons
    set_steps(page, 2)
    click_and_wait_for_a_clip(page, "#generate")  # a clip on screen, then a job that is cancelled
    set_steps(page, 100)
    with slow_steps(pipe) as steps:
        page.locator("#generate").click()
        page.wait_for_selector(
            "#run-status :text('Denoising')"
        )  # the progress, with its stage, by the buttons
        assert page.locator("#generate").is_disabled() and page.locator("#draft").is_disabled()
        assert page.locator("#cancel").is_enabled()
        buttons, status = (page.locator(s).bounding_box() for s in ("#run-buttons", "#run-status"))
        assert 0 <= status["y"] - (buttons["y"] + buttons["height"]) < 40  # right under the buttons
        assert not page.locator("#result-video :text('Denoising')").count()  # and not over the video
        screenshot(page, "app-running.png", full_page=False)
        clicked = time.monotonic()
        page.locator("#cancel").click()
        page.wait_for_selector("#run-status :text('Cancelled at step')")
        time.sleep(0.5)
        assert len([t for t in steps if t > clicked]) <= 3 and len(steps) < 100
    stopped = re.search(r"⏹ Cancelled at step (\d+) of 100\.", page.inner_text("#run-status"))
    assert stopped and int(stopped[1]) <= len(steps)
    assert page.locator("#result-video video").count() == 0 and text_of(page, "#seed-used") == ""  # cleared
    assert not page.locator("#final").is_visible() and page.locator("#gallery .thumbnail-item").count() == 1
    page.wait_for_function("!document.querySelector('#generate').disabled")
    assert page.locator("#cancel").is_disabled() and page.inner_text("#cancel") == "⏹ Cancel"
    time.sleep(0.5)
    assert "Error" not in page.inner_text("#run-status") + page.inner_text(
        "#result-video"
    )  # a cancel is no error
    screenshot(page, "app-cancelled.png", full_page=False)

    def out_of_memory(*_):
        hook.remove()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = pipe.transformer.register_forward_pre_hook(out_of_memory)
    page.locator("#generate").click()  # an error unlocks the buttons too
    page.get_by_text("ran out of memory").first.wait_for()
    page.wait_for_function("!document.querySelector('#generate').disabled")
    assert page.locator("#cancel").is_disabled()


def test_two_visitors_each_see_only_their_own_clips_and_a_waiting_job_shows_its_place(server, browser):
    url, pipe, _ = server
    desk, phone = visit(browser, url, DESKTOP), visit(browser, url, PHONE)
    for page, idea in ((desk, "a lighthouse at night"), (phone, "a kite over a beach")):
        page.locator("#prompt textarea").fill(idea)
        page.get_by_text("Advanced").click()
        set_steps(page, 1)
        set_value(page, "#seed input", 100 if page is desk else 200)  # typing a seed unticks Randomize
        assert not page.locator("#randomize input").is_checked()
        click_and_wait_for_a_clip(page, "#generate")
    assert captions(desk) == ["a lighthouse at night · 17 frames · 1 steps · seed 100"]
    assert captions(phone) == ["a kite over a beach · 17 frames · 1 steps · seed 200"]
    for page in (desk, phone):  # and after a reload, each browser still has its own, and only its own
        page.reload()
        page.wait_for_function("document.querySelectorAll('#gallery .thumbnail-item').length === 1")
    assert seeds(desk) == [100] and seeds(phone) == [200]

    # The phone: the presets under the prompt, then the buttons, the result right after them; nothing is wider
    # than the screen.
    tops = {s: phone.locator(s).bounding_box()["y"] for s in ("#run-buttons", "#result-video", "#presets")}
    assert tops["#presets"] < tops["#run-buttons"] < tops["#result-video"]
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(phone, "app-phone.png")

    # The phone's job waits behind the desktop's: its place in the queue shows by its buttons, and its Cancel
    # takes it out of the queue.
    desk.get_by_text("Advanced").click()  # closed again by the reload
    set_steps(desk, 100)
    with slow_steps(pipe):
        desk.locator("#generate").click()
        desk.wait_for_selector("#run-status :text('Denoising')")
        phone.locator("#generate").click()
        phone.wait_for_selector("#run-status :text-matches('queue: 1/1')")
        assert phone.locator("#run-status").is_visible() and in_view(phone, "#run-status")  # scrolled to it
        assert phone.locator("#cancel").is_enabled() and phone.locator("#generate").is_disabled()
        screenshot(phone, "app-phone-queued.png", full_page=False)
        phone.locator("#cancel").click()
        phone.wait_for_selector("#run-status :text('Cancelled before it started')")
        phone.wait_for_function("!document.querySelector('#generate').disabled")
        time.sleep(0.5)
        assert "Error" not in phone.inner_text("#run-status") + phone.inner_text("#result-video")
        desk.locator("#cancel").click()
        desk.wait_for_selector("#run-status :text('Cancelled at step')")
    phone.wait_for_function("!document.querySelector('#generate').disabled")
    assert seeds(phone) == [200] and seeds(desk) == [100]


def test_start_from_a_video_shows_what_it_uses_and_a_smooth_clip_plays_at_16_fps(server, browser, tmp_path):
    url, _, _ = server
    y, x = np.mgrid[0:120, 0:160]
    frames = np.repeat(((x + y) * 200 // 280).astype(np.uint8)[None, ..., None], 24, 0).repeat(3, -1)
    for i, frame in enumerate(frames):
        frame[40:70, i * 5 : i * 5 + 30] = (230, 200, 40)  # a square crossing the picture
    source = write_mp4(frames, tmp_path / "square.mp4", fps=12)  # 2 s: 17 frames at 8 fps
    page = visit(browser, url)
    page.locator("#prompt textarea").fill(IDEA)
    page.get_by_text("Start from a video").click()
    page.locator("#source-video input[type=file]").set_input_files(str(source))
    page.wait_for_selector("#source-note :text('Using 17 frames (2.1 s) of your video, cropped to 96×64.')")
    page.get_by_text("Advanced").click()
    assert page.locator("input[type=radio][value='17']").is_checked()  # Frames: all of the video
    set_steps(page, 2)
    page.locator("#smooth input").check()
    screenshot(page, "app-video.png")
    click_and_wait_for_a_clip(page, "#generate")
    assert "from 17 frames of your video (strength 0.8), smoothed to 33 frames at 16 fps" in page.inner_text(
        "#run-status"
    )
    page.wait_for_function("document.querySelector('#result-video video').duration > 0")
    duration = page.evaluate("document.querySelector('#result-video video').duration")
    assert abs(duration - 33 / 16) < 0.1  # twice the frames, as long as the 17 at 8 fps
    screenshot(page, "app-video-done.png")

    # A file that is not a video it can read: said on upload, and Generate is refused before any job.
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(source.read_bytes()[:400])
    page.locator("#source-video").get_by_label("Clear").click()  # the player gives way to the drop zone
    page.wait_for_function("document.querySelector('#source-note').innerText.trim() === ''")  # cleared too
    page.locator("#source-video input[type=file]").set_input_files(str(broken))
    page.wait_for_selector("#source-note :text('⚠️ broken.mp4')")
    page.locator("#generate").click()
    page.locator("#from-video").get_by_text("broken.mp4 is").first.wait_for()  # said at the input itself
    page.locator("#from-video").scroll_into_view_if_needed()
    screenshot(page, "app-video-refused.png", full_page=False)
    assert page.locator("#generate").is_enabled() and page.locator("#gallery .thumbnail-item").count() == 1


# -- the first screen and a run, by what is on the screen (issue 22) ----------------------------------------------

FIRST_SCREENS = {"desktop": {"width": 1280, "height": 800}, "phone": PHONE}
SCREENS = Path(__file__).resolve().parents[1] / "docs" / "screens"  # the README's, with UPDATE_SCREENS=1


def pixels(page, selector: str) -> np.ndarray:
    """What the screen shows inside `selector`'s box (RGB), from a screenshot of the viewport."""
    from PIL import Image

    box = page.locator(selector).bounding_box()
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    top, left = max(0, int(box["y"]) + 2), max(0, int(box["x"]) + 2)
    return shot[top : int(box["y"] + box["height"]) - 2, left : int(box["x"] + box["width"]) - 2]


def on_screen(page, selector: str, whole: bool = True) -> bool:
    box, size = page.locator(selector).first.bounding_box(), page.viewport_size
    if box is None or box["x"] < 0 or box["x"] + box["width"] > size["width"] + 1:
        return False
    return box["y"] >= 0 and (box["y"] + (box["height"] if whole else 40)) <= size["height"]


@pytest.mark.parametrize("size", FIRST_SCREENS)
def test_the_first_screen_a_refusal_and_a_run_with_its_preview_in_view(server, browser, size):
    url, pipe, _ = server
    page = visit(browser, url, FIRST_SCREENS[size])
    time.sleep(0.5)  # the visit's restore has painted
    screenshot(page, f"first-screen-{size}.png", full_page=False)
    if os.environ.get("UPDATE_SCREENS"):
        SCREENS.mkdir(exist_ok=True)
        page.screenshot(path=SCREENS / f"{size}.png")
    # 1. Without scrolling: the prompt, a preset, Generate and its progress line; the result beside them on a
    # desktop, right under them on a phone. Generate is painted (its violet), not only laid out.
    for selector in ("#prompt", "#presets button", "#generate", "#run-status"):
        assert on_screen(page, selector), selector
    assert on_screen(page, "#result-video", whole=size == "desktop")
    run, result = page.locator("#run-status").bounding_box(), page.locator("#result-video").bounding_box()
    generate = page.locator("#generate").bounding_box()
    if size == "desktop":
        assert result["x"] > generate["x"] + generate["width"] and result["y"] < generate["y"]  # beside
    else:
        assert 0 <= result["y"] - (run["y"] + run["height"]) < 30  # right under the buttons' progress
    violet = pixels(page, "#generate").reshape(-1, 3).mean(0)
    assert violet[2] > violet[1] + 40, violet  # the primary button's colour, on screen
    assert "/" not in page.inner_text("#model-status") and "OPENAI" not in page.inner_text("body")  # no paths

    # 4. A refusal shows by the button pressed: a prompt over the limit starts nothing and says why there.
    page.locator("#prompt textarea").fill("x" * (validation.MAX_PROMPT_CHARS + 1))
    page.locator("#draft").click()
    page.locator("#run-status").get_by_text("Not started. The prompt is").wait_for()
    time.sleep(0.3)  # the prompt box has grown to its most lines: the buttons and the line stay on screen
    assert on_screen(page, "#run-status"), page.locator("#run-status").bounding_box()
    assert page.locator("#draft").is_enabled()

    # 2. A run: the preview plays where the result will be, uncovered and on screen; the progress beside it.
    page.locator("#prompt textarea").fill(IDEA)
    with slow_steps(pipe, 0.3):
        page.locator("#draft").click()
        page.wait_for_selector("#result-video video[src]", timeout=30_000)  # the first preview
        page.wait_for_function("document.querySelector('#result-video video').readyState >= 2")
        page.wait_for_selector("#run-status :text('left')")  # "Denoising, about 0:02 left"
        assert page.inner_text("#generate") == "⏳ Running…" and page.locator("#generate").is_disabled()
        screenshot(page, f"running-{size}.png", full_page=False)
        assert on_screen(page, "#result-video video", whole=size == "desktop") and on_screen(
            page, "#run-status"
        )
        assert not page.locator(
            "#result-video [data-testid='status-tracker']:visible :text('Denoising')"
        ).count()
        shown = pixels(page, "#result-video video").reshape(-1, 3).astype(float)
        assert shown.std(0).mean() > 20, "the preview is not on screen: the box is one colour"
        assert (shown.min(1) > 235).mean() < 0.2, "the preview is covered (white, as Gradio's overlay)"
    page.wait_for_function("!document.querySelector('#generate').disabled", timeout=60_000)

    # 5. Picking a clip in the gallery keeps a status line: which clip.
    page.locator("#gallery .thumbnail-item").first.click()
    page.locator("#run-status").get_by_text("Your clip:").wait_for()
    assert CAPTION.match(page.inner_text("#run-status").removeprefix("▶️ Your clip: ").split(". Its")[0])
