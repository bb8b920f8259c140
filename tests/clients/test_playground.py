"""The browser playground at /playground: its files as served (open without a key, nothing external), then the page in
a real Chromium (apt's, driven by Playwright) against the real server: it asks for the key, streams a chat reply,
creates, forks and deletes sessions, and ingests a file in parts with a progress bar."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from client_helpers import API_KEY, MODEL_NAME, write_text_file

from famserve.clients import FamserveClient

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
PLAYGROUND_FILES = ["/playground", "/playground/playground.js", "/playground/playground.css"]
SCREENSHOT_ENV = "FAMSERVE_PLAYGROUND_SCREENSHOT"  # set to a path to keep the final screenshot (docs/playground.png)
WAIT_MS = 60_000  # the tiny model on a busy 2-core machine


@pytest.mark.parametrize("path, media_type", list(zip(PLAYGROUND_FILES, ["text/html", "text/javascript", "text/css"])))
def test_files_are_served_without_a_key(server, path: str, media_type: str) -> None:
    response = httpx.get(server.url + path, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == media_type
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    assert not re.search(r"(https?:)?//[a-z0-9]", response.text)  # no CDN, no external URL of any kind
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401  # the API itself stays closed


def chromium() -> str | None:
    """apt's chromium (installed on the spot where we may); None when there is none."""
    if shutil.which("chromium") is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900, check=False)
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[test])")
    path = chromium()
    if path is None:
        pytest.skip("chromium is not installed and apt-get could not install it")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server) -> Iterator:
    """The playground at 1280x800, connected with the API key; fails the test on any script error."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete session …?"
    page.goto(server.url + "/playground")
    expect(page.locator("#status")).to_contain_text("401", timeout=WAIT_MS)  # no key yet: the API says so
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_label("Model")).to_have_value(MODEL_NAME, timeout=WAIT_MS)
    expect(page.locator("#status")).to_have_text(f"connected to {MODEL_NAME}")
    yield page
    context.close()
    assert errors == []


def send(page, message: str) -> None:
    """Send a chat message and wait for the reply to finish."""
    from playwright.sync_api import expect

    replies = page.locator(".message.assistant")
    count = replies.count()
    page.get_by_label("Message").fill(message)
    page.get_by_label("Message").press("Enter")
    expect(replies.nth(count).locator(".info")).to_contain_text("finish:", timeout=WAIT_MS)


def test_chat_streams_the_reply(page) -> None:
    from playwright.sync_api import expect

    page.get_by_label("Max tokens").fill("24")
    # Greedy, so the reply is the same every run: sampled, it could end on the end-of-turn token after a few
    # tokens and leave too few deltas to count (a fresh-clone CI run saw 5).
    page.get_by_label("Temperature").fill("0")
    # Count how often the reply's text changes while it streams.
    page.locator("#transcript").evaluate("""transcript => {
        window.textUpdates = 0;
        new MutationObserver(() => window.textUpdates++).observe(transcript,
            {subtree: true, characterData: true, childList: true});
    }""")
    send(page, "Hello there")
    reply = page.locator(".message.assistant").last
    info = re.compile(r"finish: (length|stop) · 19 prompt \+ (\d+) generated tokens")
    expect(reply.locator(".info")).to_have_text(info)
    assert int(info.search(reply.locator(".info").inner_text()).group(2)) > 5
    assert reply.locator(".text").inner_text() != ""
    assert page.evaluate("window.textUpdates") > 5  # many deltas, not one final answer
    expect(page.locator("#mode")).to_have_text("bswa (L=8 M=1 S=4)")
    send(page, "And again")  # stateless: the page sends the history
    expect(page.locator(".message.assistant").last.locator(".info")).to_contain_text("generated tokens")


def test_sessions_panel(page, server, tmp_path: Path, count_tokens) -> None:
    from playwright.sync_api import expect

    page.get_by_label("System prompt (optional)").fill("You answer briefly.")
    page.get_by_role("button", name="Create session").click()
    session_id = page.locator("#d-id")
    expect(session_id).to_have_text(re.compile(r"^sess_"), timeout=WAIT_MS)
    created = session_id.inner_text()
    expect(page.get_by_role("radio", name=re.compile(created))).to_be_checked()
    expect(page.locator("#d-turns")).to_have_text("0")

    page.get_by_label("Max tokens").fill("8")
    send(page, "What is feedback attention memory?")
    expect(page.locator("#d-turns")).to_have_text("1")

    text_file = write_text_file(tmp_path / "notes.txt", 40_000)
    page.goto(f"{server.url}/playground?ingest_part_bytes=8192")  # several parts (the page keeps the key)
    expect(page.get_by_label("Model")).to_have_value(MODEL_NAME, timeout=WAIT_MS)
    page.get_by_role("radio", name=re.compile(created)).check()
    with FamserveClient(server.url, api_key=API_KEY) as client:
        before = client.get_session(created).tokens_processed
        page.get_by_label("Text file to ingest").set_input_files(str(text_file))
        page.get_by_role("button", name="Ingest file").click()
        expect(page.locator("#status")).to_have_text(re.compile(r"^ingested notes\.txt"), timeout=4 * WAIT_MS)
        tokens = count_tokens(text_file.read_text())
        assert client.get_session(created).tokens_processed == before + tokens  # parts cut where tokens agree
    assert page.locator("#ingest-progress").evaluate("bar => bar.value") == 1
    expect(page.locator("#ingest-status")).to_contain_text(f"{tokens:,} tokens · ")
    expect(page.locator("#d-tokens")).to_have_text(f"{before + tokens:,}")

    page.get_by_role("button", name="Fork").click()
    expect(session_id).not_to_have_text(created, timeout=WAIT_MS)
    fork = session_id.inner_text()
    expect(page.locator("#d-tokens")).to_have_text(f"{before + tokens:,}")
    expect(page.get_by_role("radio", name=re.compile(fork))).to_be_checked()
    if os.environ.get(SCREENSHOT_ENV):
        page.screenshot(path=os.environ[SCREENSHOT_ENV])
    page.get_by_role("button", name="Delete").click()
    expect(page.locator("#session-details")).to_be_hidden(timeout=WAIT_MS)
    expect(page.get_by_role("radio", name=re.compile(fork))).to_have_count(0)
    expect(page.get_by_role("radio", name=re.compile(created))).to_have_count(1)
