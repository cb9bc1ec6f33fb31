"""Headless Chromium for the report tests: render a page, count its images that failed to decode.

The flags keep Chromium off the network (this machine's closed network refuses its background
connections) and give the page's scripts a fixed time budget.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]

# Appended to a copy of the page: once loaded, it writes how many images it has and how many
# failed to decode into attributes of <body>, which --dump-dom then shows.
_IMAGE_PROBE = (
    "<script>window.addEventListener('load', () => {"
    "const imgs = Array.from(document.images);"
    "const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;"
    "document.body.setAttribute('data-images', imgs.length);"
    "document.body.setAttribute('data-broken', bad);});</script></body>"
)


def chromium() -> str:
    """The Chromium executable; skips the test when none is installed."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return name
    pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run does)")


def chromium_command(workdir: Path) -> list[str]:
    """Chromium with the test flags and a fresh profile under ``workdir``."""
    return [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}"]


def rendered_dom(report: Path, workdir: Path) -> str:
    """The DOM of ``report`` after load, with ``data-images`` / ``data-broken`` on <body>."""
    probe = workdir / "probe.html"
    page = report.read_text(encoding="utf-8")
    probe.write_text(page.replace("</body>", _IMAGE_PROBE), encoding="utf-8")
    dom = subprocess.run(
        [*chromium_command(workdir), "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout
