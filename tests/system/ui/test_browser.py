"""The plugin's page in a real headless Chromium, served by a real `airflow api-server` that loaded the
plugin from plugins/: log in through /auth/token, open the page with the JWT cookie, check what it
renders on each tab, and save screenshots under test-output/ui/."""

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from ovtasks.orchestration.rest import get_token
from tests.support.webdriver import Chrome, find_browser

from tests.support import ROOT
OUT = Path(os.environ.get("TEST_OUT", ROOT / "test-output")) / "ui"


def test_page_in_headless_chromium(api_server, tmp_path):
    browser, driver = find_browser()
    if not (browser and driver):
        print("\nSKIP browser test: Debian chromium / chromium-driver not installed (make test installs them)", file=sys.stderr)
        pytest.skip("chromium / chromedriver not installed")
    base, log = api_server
    token = get_token(base, "admin", "test-only-admin")
    # the plugin is registered: its app answers behind auth and its nav entry is listed
    with pytest.raises(urllib.error.HTTPError) as anon:
        urllib.request.urlopen(f"{base}/ovtasks/api/datasets", timeout=10)
    assert anon.value.code == 401
    req = urllib.request.Request(f"{base}/api/v2/plugins", headers={"Authorization": f"Bearer {token}"})
    plugins = json.loads(urllib.request.urlopen(req, timeout=10).read())["plugins"]
    ours = next(p for p in plugins if p["name"] == "ovtasks")
    assert ours["external_views"][0]["href"] == "/ovtasks/ui/" and ours["fastapi_apps"]

    chrome = Chrome(browser, driver, tmp_path / "chromedriver.log")
    try:
        chrome.get(f"{base}/api/v2/version")  # on the origin first, so the cookie can be set for it
        chrome.add_cookie("_token", token)
        chrome.get(f"{base}/ovtasks/ui/")
        table = chrome.find("table#shards")
        text = chrome.text(table)
        assert "00000" in text and "00001" in text and "passed" in text
        page = chrome.text(chrome.find("body"))
        assert "signed in as admin" in page and "Quarantine reasons" in page and "Trend across runs" in page
        chrome.screenshot(OUT / "datasets.png")

        chrome.click(chrome.find('nav button[data-tab="gallery"]'))
        chrome.wait_for("const i = document.querySelectorAll('#g-grid img'); return i.length > 0 && "
                        "[...i].every(x => x.complete && x.naturalWidth > 0)", timeout=60)
        assert len(chrome.find_all("#g-grid .tile")) == 12
        assert "page 1 of" in chrome.text(chrome.find("#g-page"))
        chrome.screenshot(OUT / "gallery.png")

        chrome.click(chrome.find('nav button[data-tab="models"]'))
        chrome.wait_for("return document.querySelector('#m-list').innerText.includes('challenger')")
        models = chrome.text(chrome.find("#m-list"))
        assert "ovtasks-ov-maskrcnn v2" in models and "generalized" in models and "novel" in models
        chrome.click(chrome.find("#promote"))
        chrome.wait_for("return getComputedStyle(document.querySelector('#promote-result')).display !== 'none'")
        assert chrome.text(chrome.find("#promote-result")).split(":")[0] in ("Promoted", "Not promoted")
        chrome.wait_for("return document.querySelector('#m-list').innerText.includes('gate vs champion')")  # the gate's verdict
        chrome.screenshot(OUT / "models.png")

        # Airflow's own UI shows the page from its navigation (an external view in an iframe)
        chrome.get(f"{base}/plugin/ovtasks")
        chrome.wait_for("const f = document.querySelector('iframe'); return f && f.src.includes('/ovtasks/ui/')", timeout=60)
        chrome.screenshot(OUT / "airflow-nav.png")
    except Exception:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        chrome.quit()
    for name in ("datasets", "gallery", "models", "airflow-nav"):
        assert (OUT / f"{name}.png").stat().st_size > 10_000, name
