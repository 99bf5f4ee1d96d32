"""Debian's /usr/bin/chromium driven by Playwright's Python package (never `playwright install`).

Without chromium the browser tests skip, unless DIALOOP_REQUIRE_BROWSER=1 (CI), where they fail.
Screenshots go to $DIALOOP_SCREENSHOTS (default: a `dialoop-screenshots` folder in the temp dir).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium): browser tests cannot run"
        if os.environ.get("DIALOOP_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    folder = Path(
        os.environ.get("DIALOOP_SCREENSHOTS") or Path(tempfile.gettempdir()) / "dialoop-screenshots"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder
