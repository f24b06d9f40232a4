"""The web chat page in a real headless Chromium (Debian's chromium-headless-shell or chromium, driven by
Playwright with the system browser; nothing is downloaded). Without a browser the test is skipped on a developer
machine and fails in CI (CI=true), where .ci/run installs one."""

import io
import os
import shutil
import time
from pathlib import Path

import pytest
from serving import (
    ANSWER,
    REASONING,
    random_checkpoint,
    running_server,
    shared_memorised,
    single_thread,  # noqa: F401 (autouse fixture)
    slow_loader,
)

CANDIDATES = ("chromium-headless-shell", "chromium", "/usr/lib/chromium/chromium-headless-shell")


def find_browser() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path, ci = find_browser(), os.environ.get("CI") == "true"
    if path is None:
        message = "no Chromium found (apt-get install chromium-headless-shell)"
        if ci:
            pytest.fail(message + ": CI must run the browser test")
        pytest.skip(message)
    if ci:
        import playwright.sync_api as sync_api  # in CI a missing driver is a failure, not a skip
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a few ms per forward pass: the stream takes long enough to be seen and stopped
    with running_server(slow_loader(shared_memorised(tmp_path_factory), 0.005)) as s:
        yield s


def test_chat_page_streams_shows_thinking_and_stops(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(server.url + "/")
    expect = pytest.importorskip("playwright.sync_api").expect  # (page.wait_for_function needs eval: CSP forbids it)
    expect(page.locator("#model")).to_contain_text("tiny · ")
    page.fill("#temperature", "0")
    page.fill("#input", "Q")
    page.keyboard.press("Enter")
    answer = page.locator(".msg.assistant").last
    answer.locator(".stats").filter(has_text=" J ").wait_for(timeout=15_000)
    assert answer.locator(".bubble").inner_text() == ANSWER
    thinking = answer.locator("details.thinking")
    assert thinking.is_visible() and thinking.get_attribute("open") is None  # collapsed until clicked
    thinking.locator("summary").click()
    assert thinking.get_attribute("open") is not None
    assert thinking.locator(".text").inner_text() == REASONING
    stats = answer.locator(".stats").inner_text()
    assert "tokens" in stats and "tok/s" in stats and "estimated" in stats and "$" in stats

    # regenerate replaces the last answer; new chat empties the page
    page.fill("#max_tokens", "")
    page.click("#regen")
    expect(page.locator(".msg")).to_have_count(2)
    expect(page.locator("#stop")).to_be_disabled(timeout=10_000)
    assert "tokens" in page.locator(".msg.assistant .stats").last.inner_text()
    page.click("#new")
    assert page.locator(".msg").count() == 0
    page.close()


def test_page_fits_a_phone_screen_and_asks_for_a_key(browser, tmp_path_factory):
    with running_server(slow_loader(shared_memorised(tmp_path_factory), 0.0), api_key="k3y") as s:
        page = browser.new_page(viewport={"width": 375, "height": 700})
        page.goto(s.url + "/")
        page.locator("#keybox").wait_for(state="visible")
        page.fill("#key", "k3y")
        page.click("#savekey")
        pytest.importorskip("playwright.sync_api").expect(page.locator("#model")).to_contain_text("tiny · ")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        for widget in ("#input", "#send", "#stop", "#new", "#temperature"):
            box = page.locator(widget).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, widget
        page.fill("#temperature", "0")
        page.fill("#input", "Q")
        page.click("#send")
        page.locator(".msg.assistant .stats").filter(has_text=" J ").wait_for(timeout=15_000)
        assert page.locator(".msg.assistant .bubble").inner_text() == ANSWER
        page.close()


def test_a_long_answer_can_be_stopped(browser, tmp_path):
    # random weights ramble until the token limit; 20 ms per forward pass makes that two seconds
    with running_server(slow_loader(random_checkpoint(tmp_path / "random"), 0.02)) as s:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(s.url + "/")
        pytest.importorskip("playwright.sync_api").expect(page.locator("#model")).to_contain_text("tiny · ")
        page.fill("#max_tokens", "100")
        page.fill("#input", "tell me everything")
        page.click("#send")
        long = page.locator(".msg.assistant").last
        long.locator(".stats").filter(has_text="tok/s").wait_for(timeout=10_000)
        page.click("#stop")
        long.locator(".stats").filter(has_text="stopped").wait_for(timeout=5_000)
        assert page.is_enabled("#send") and page.is_enabled("#regen")
        deadline = time.monotonic() + 5
        while not s.state.batcher.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        (job,) = s.state.batcher.ended  # the server stopped generating too
        assert job.tokens_after_cancel is not None and job.stats.completion_tokens < 100

        image = page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        from PIL import Image

        colors = Image.open(io.BytesIO(image)).convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50  # text and widgets, not a blank page
        page.close()
