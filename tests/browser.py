"""Headless Chromium for tests of the HTML pages: the page's DOM as the browser built it, and a screenshot.

Chromium comes from Debian's ``chromium`` package (``.ci/run`` installs it). A test needing it is skipped when it is
absent, except under ``CI=true``, where it fails (as missing test data does, ``data_paths.require_data``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-extensions", "--hide-scrollbars"]


def require_chromium() -> str:
    """The chromium executable; skips the test when there is none (fails under CI=true)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def render(page: Path, tmp_path: Path, width: int = 1200, height: int = 2000) -> tuple[str, np.ndarray]:
    """Open ``page`` in headless Chromium: ``(DOM as serialised by the browser, screenshot as (H, W, 3) uint8)``."""
    exe = require_chromium()
    profile = tmp_path / "chromium-profile"
    url = page.resolve().as_uri()
    common = [exe, *_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    shot = tmp_path / "screenshot.png"
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    return dom, np.asarray(Image.open(shot).convert("RGB"))


def study_rows(dom: str) -> dict[str, int]:
    """How many ``<tr class="study …" data-status="…">`` rows of each status the browser's DOM holds."""
    counts: dict[str, int] = {}

    class Rows(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "tr" and "study" in (a.get("class") or "").split():
                counts[a.get("data-status") or ""] = counts.get(a.get("data-status") or "", 0) + 1

    Rows().feed(dom)
    return counts


def colour_bands(image: np.ndarray, rgb: tuple[int, int, int], min_pixels: int = 15) -> int:
    """Number of separate horizontal bands of ``image`` whose pixel rows hold at least ``min_pixels`` of ``rgb``
    exactly (e.g. one badge per table row)."""
    hits = (image == np.array(rgb, dtype=image.dtype)).all(axis=2).sum(axis=1) >= min_pixels
    return int(np.count_nonzero(hits[1:] & ~hits[:-1]) + hits[0])


_LAYOUT_PROBE = """<script>window.onload = () => {
  const t = document.querySelector('table'), imgs = [...document.querySelectorAll('img')];
  document.body.setAttribute('data-layout', JSON.stringify({inner: innerWidth,
    scroll: document.documentElement.scrollWidth, right: t ? t.getBoundingClientRect().right : 0,
    images: imgs.map(i => [i.naturalWidth, i.getBoundingClientRect().width])}));
};</script>"""


def layout(page: Path, tmp_path: Path, width: int = 1200) -> dict:
    """How headless Chromium lays ``page`` out in a ``width``-pixel window: ``inner`` (the window's width),
    ``scroll`` (the document's width: more than ``inner`` when it overflows), ``right`` (the first table's right
    edge) and ``images`` (``[natural width, shown width]`` of each image, natural 0 for one that did not decode).

    The page forbids scripts (its Content-Security-Policy); a copy without that line gets a small script that
    writes these figures into the DOM, which ``--dump-dom`` returns.
    """
    exe = require_chromium()
    text = "\n".join(line for line in page.read_text().splitlines() if "Content-Security-Policy" not in line)
    copy = tmp_path / f"layout-{page.name}"
    copy.write_text(text.replace("</body>", _LAYOUT_PROBE + "</body>"))
    dom = subprocess.run([exe, *_FLAGS, f"--user-data-dir={tmp_path / 'chromium-layout'}",
                          f"--window-size={width},900", "--virtual-time-budget=2000", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'data-layout="([^"]+)"', dom)
    assert found, "the layout probe did not run"
    return json.loads(found.group(1).replace("&quot;", '"'))
