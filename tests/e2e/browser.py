"""What the browser tests share: Debian's chromium driven by Playwright (never a browser Playwright
downloads), a page of a fresh browser on the test's Airflow, Airflow's login, and screenshots kept
in a folder of each test module's under `.artifacts/screenshots/`, a failure's page among them."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".artifacts" / "screenshots"
TIMEOUT_MS = 30_000


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set, so the browser test must run; .ci/run installs chromium)")
    pytest.skip(f"{what}; CI is not set. Install it with: apt-get install -y chromium")


def chromium_path() -> str:
    """Debian's chromium, and Playwright to drive it: asked for before Airflow starts, so that a skip
    costs nothing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright is not installed (requirements-dev.txt)")
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    _missing("Debian's chromium is not installed")
    raise AssertionError("unreachable")


@contextmanager
def browser_page(chromium: str, base_url: str, screenshots: Path, height: int = 1000) -> Iterator:
    """A page of a new headless chromium on `base_url`; `screenshots` emptied of an earlier run's files."""
    from airflow_services import write_artifact_gitignore
    from playwright.sync_api import sync_playwright

    write_artifact_gitignore()
    screenshots.mkdir(parents=True, exist_ok=True)
    for old in screenshots.iterdir():
        if old.is_file():
            old.unlink()
    with sync_playwright() as playwright:
        # --no-sandbox: Playwright's default for Chromium (CI runs as root); no /dev/shm in small containers.
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--disable-dev-shm-usage"])  # fmt: skip
        context = browser.new_context(viewport={"width": 1440, "height": height}, base_url=base_url)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


@contextmanager
def failure_kept(page, screenshots: Path) -> Iterator[None]:
    """On a failure, the page as it was: `failure.png`, `failure.html` and its frames' HTML."""
    try:
        yield
    except BaseException:
        page.screenshot(path=screenshots / "failure.png", full_page=True)
        (screenshots / "failure.html").write_text(page.content())
        for number, frame in enumerate(page.frames[1:], start=1):  # the plugin's pages are in a frame
            (screenshots / f"failure-frame-{number}.html").write_text(frame.content())
        raise


def log_in(page, services, screenshot: Path | None = None) -> None:
    """Airflow's own login page (Simple auth manager); `screenshot`: where to keep it, before signing in."""
    from playwright.sync_api import expect

    page.goto("/")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)
    page.locator("input[name=username]").fill(services.username)
    page.locator("input[name=password]").fill(services.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"^(?!.*/auth/login).*$"))
    expect(page.get_by_role("button", name="Browse")).to_be_visible()
