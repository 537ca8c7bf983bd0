"""The web chat page in a real browser: Debian's Chromium, headless, driven by Playwright.

    .venv/bin/python -m pytest tests/test_web.py
    TANDEM_SCREENSHOT=docs/chat.png .venv/bin/python -m pytest tests/test_web.py    # refresh the picture

Types a question into the page served by a live server (the memorising model from
test_server.py), watches the thinking and the answer stream in, checks the thinking sits in a
collapsible block above the answer, and saves a screenshot (to $TANDEM_SCREENSHOT, else to the
test's temp folder). A second test presses Stop mid-generation and checks the server freed the
slot; a third, on a server with an API key, answers the page's key prompt (wrongly, then rightly)
and chats. Skips, saying why, where Chromium or the playwright package is missing (`make test`
installs Debian's chromium; `playwright install` is never needed).
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from test_server import ANSWER, QUESTION, THINKING, LiveServer, build_tokenizer, memorized_model, random_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (make test installs it: apt-get install chromium)")
from playwright import sync_api


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(1)
    return build_tokenizer()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def test_chat_page_streams_thinking_and_answer(browser, tok, tmp_path):
    server = LiveServer(memorized_model(tok), tok, name="demo").start()
    try:
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(server.url + "/")
        sync_api.expect(page.locator("#model")).to_contain_text("demo")
        page.fill("#input", QUESTION)
        page.keyboard.press("Enter")
        answer = page.locator(".turn.assistant .answer")
        sync_api.expect(answer).to_have_text(ANSWER)
        sync_api.expect(page.locator("#send")).to_be_visible()           # the stream has ended
        thinking = page.locator(".turn.assistant details.thinking")
        assert thinking.locator(".thoughts").text_content() == THINKING
        assert thinking.evaluate("d => !d.open")                          # folded once the answer started
        assert thinking.bounding_box()["y"] < answer.bounding_box()["y"]  # above the answer
        sync_api.expect(page.locator(".turn.user")).to_have_text(QUESTION)
        sync_api.expect(page.locator(".turn.assistant .meta")).to_contain_text("tokens")
        thinking.locator("summary").click()                               # expand it for the picture
        sync_api.expect(thinking.locator(".thoughts")).to_be_visible()
        shot = Path(os.environ.get("TANDEM_SCREENSHOT") or tmp_path / "chat.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        server.stop()


def test_stop_button_aborts_and_frees_the_slot(browser, tok):
    server = LiveServer(random_model(tok), tok, name="rand").start()
    try:
        server.slow_down(0.05)
        page = browser.new_page()
        page.goto(server.url + "/")
        sync_api.expect(page.locator("#model")).to_contain_text("rand")
        page.click("#settings summary")
        page.fill("#temperature", "1")
        page.fill("#max-tokens", "80")
        page.fill("#input", "tell me a long story")
        page.click("#send")
        sync_api.expect(page.locator("#stop")).to_be_visible()
        page.wait_for_function("document.querySelector('.turn.assistant').innerText.length > 3")
        page.click("#stop")
        sync_api.expect(page.locator(".turn.assistant .meta")).to_have_text("stopped")
        sync_api.expect(page.locator("#send")).to_be_visible()
        m = server.wait_idle(3.0)
        assert m["tandem_requests_inflight"] == 0 and m["tandem_requests_cancelled_total"] == 1
        assert m["tandem_generation_tokens_total"] < 80
    finally:
        server.stop()


def test_page_asks_for_the_api_key_once_and_then_chats(browser, tok):
    server = LiveServer(memorized_model(tok), tok, name="locked", api_keys=("sesame",)).start()
    try:
        page = browser.new_page()
        answers, asked = iter(["wrong", "sesame"]), []

        def on_dialog(dialog):
            asked.append(dialog.message)
            dialog.accept(next(answers))
        page.on("dialog", on_dialog)
        page.goto(server.url + "/")
        sync_api.expect(page.locator("#model")).to_contain_text("locked")
        assert asked == ["This server needs an API key:", "Wrong API key; try again:"]
        assert page.evaluate("sessionStorage.getItem('tandem-api-key')") == "sesame"
        page.fill("#input", QUESTION)
        page.keyboard.press("Enter")
        sync_api.expect(page.locator(".turn.assistant .answer")).to_have_text(ANSWER)
        page.reload()                                        # the key is kept for the tab: no new prompt
        sync_api.expect(page.locator("#model")).to_contain_text("locked")
        assert len(asked) == 2
    finally:
        server.stop()
