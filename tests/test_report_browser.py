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


def test_the_printed_mlflow_link_opens_on_the_trial_runs(tmp_path, mlflow_server):
    """MLflow 3's UI opens an experiment in the view the browser used last (GenAI, on a fresh
    one). The link a sweep prints names the runs view: a fresh browser lands on the runs
    table, and the study's trial runs are under its parent run."""
    import re

    from tests.conftest import ganbench, write_spec

    sync_api = pytest.importorskip("playwright.sync_api")
    spec = write_spec(tmp_path, name="linked", trials=2, tracking={"uri": mlflow_server.url})
    proc = ganbench("sweep", str(spec), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    url = re.search(r"MLflow runs: (\S+)", proc.stdout).group(1)
    assert url.startswith(mlflow_server.url + "/#/experiments/")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            page.goto(url, wait_until="load")
            page.get_by_text("matching runs").wait_for(timeout=60000)
            text = page.inner_text("body")
            assert "Detect Issues" not in text and "No data available" not in text
            row = page.get_by_role("row").filter(has_text="linked")
            row.get_by_role("button").first.click()  # expand the study's parent run
            page.get_by_text("t1", exact=False).first.wait_for(timeout=30000)
            text = page.inner_text("body")
            trials = set(re.findall(r"\S*__t(\d+)", text))
            assert trials == {"0", "1"}, text[:2000]
        finally:
            browser.close()
