"""The committed report pages, opened in a real headless Chromium at a laptop's width."""

import shutil
from pathlib import Path

import pytest

REPORTS = sorted((Path(__file__).parent.parent / "reports").glob("*/index.html"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")]
# What a closed network needs: no sandbox as root, no GPU, no calls home.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.parametrize("page_path", REPORTS, ids=lambda p: p.parent.name)
def test_report_page_loads_whole_and_fits_a_laptop_screen(page_path, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), "
                                   "i.complete && i.naturalWidth > 0])")
            assert images, "a report page shows its plots"
            assert [src for src, ok in images if not ok] == []  # every image loads
            assert errors == []
            # Readable at 1280 px: nothing runs off the page sideways.
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
            page.screenshot(path=str(tmp_path / f"{page_path.parent.name}.png"),
                            full_page=True)
        finally:
            browser.close()
    assert (tmp_path / f"{page_path.parent.name}.png").stat().st_size > 0
