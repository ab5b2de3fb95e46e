"""Real-browser fixtures: Debian's Chromium driven by Playwright, and the real server.

Chromium comes from the distribution (``apt-get install chromium``), never from a
Playwright download. Without it the browser tests skip, unless ``CI`` is set: then
they fail, because CI must run them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from server.config import Settings
from tests.browser.support import LiveServer, PageProblems, running_server
from tests.timing import EVENT_TIMEOUT, HEARTBEAT_INTERVAL

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def find_chromium() -> str | None:
    """``$CHROMIUM`` if set, else Debian's ``chromium``."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for candidate in (*CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        reason = (
            "no Chromium found (looked for $CHROMIUM, /usr/bin/chromium): "
            "install Debian's package with `apt-get install chromium`"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the browser tests must run", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture
def browser_settings() -> Settings:
    """Defaults, with heartbeats fast enough to show that control events are handled."""
    return Settings(port=0, heartbeat_interval=HEARTBEAT_INTERVAL * 5, session_ttl=60.0)


@pytest.fixture
async def live_server(browser_settings: Settings) -> AsyncIterator[LiveServer]:
    async with running_server(browser_settings) as server:
        yield server


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def page_problems() -> PageProblems:
    return PageProblems()


@pytest.fixture
async def page(browser: Browser, page_problems: PageProblems) -> AsyncIterator[Page]:
    """A fresh page; any uncaught JavaScript error or console error fails the test."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(EVENT_TIMEOUT * 1000)
    page = await context.new_page()
    seen = page_problems.seen
    page.on("pageerror", lambda error: seen.append(f"uncaught: {error}"))
    page.on(
        "console",
        lambda message: (
            seen.append(f"console.{message.type}: {message.text}")
            if message.type == "error"
            else None
        ),
    )
    try:
        yield page
    finally:
        await context.close()
    problems = page_problems.unexpected()
    assert not problems, "the page reported errors:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
