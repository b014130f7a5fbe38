"""A headless Chromium for the explorer page: find one on this machine, and take a screenshot.

Playwright for Python drives it, launched with the system's Chromium (Debian's ``chromium``
package; ``scripts/setup.sh`` installs it when missing) rather than a browser Playwright downloads.
Both are optional: :func:`screenshot` returns why it took none instead of failing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = ["CHROMIUM_ENV", "find_chromium", "screenshot"]

log = logging.getLogger(__name__)

# An explicit browser executable (any Chromium or Chrome), tried first.
CHROMIUM_ENV = "LATENTSEARCH_CHROMIUM"
# Debian installs the browser itself here and a shell wrapper as /usr/bin/chromium.
_KNOWN = ("/usr/lib/chromium/chromium",)
_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium executable: ``$LATENTSEARCH_CHROMIUM``, Debian's, or one on PATH."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if os.access(given, os.X_OK) else None
    for path in _KNOWN:
        if os.access(path, os.X_OK):
            return path
    for name in _NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(url: str, path: Path, *, width: int = 1360, height: int = 900, timeout_s: float = 30.0) -> str:
    """Load the explorer page at ``url`` in headless Chromium, wait until it shows the decoded image
    and the nearest items, and save a PNG to ``path``. Returns ``""`` when saved, else why not (no
    browser, no Playwright, the page did not finish)."""
    executable = find_chromium()
    if executable is None:
        return f"no Chromium found (apt-get install chromium, or set {CHROMIUM_ENV})"
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        return "Playwright is not installed (pip install playwright)"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(url, timeout=timeout_s * 1000)
                page.wait_for_selector("#neighbours li", timeout=timeout_s * 1000)
                page.wait_for_selector("#decoded[src]", timeout=timeout_s * 1000)
                path.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(path), full_page=True)
            finally:
                browser.close()
    except Error as exc:
        log.warning("explorer screenshot failed: %s", exc)
        return f"the browser failed: {str(exc).splitlines()[0]}"
    return ""
