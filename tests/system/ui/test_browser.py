"""The plugin's page in a real headless Chromium, served by a real `airflow api-server` that loaded the
plugin from plugins/: log in through /auth/token, open the page with the JWT cookie, check what it
renders on each tab, and save screenshots under test-output/ui/."""

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By

from ovtasks.orchestration.rest import get_token
from tests.support import ROOT
from tests.support.browser import chrome, find, find_browser, screenshot, wait_for

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

    d = chrome(browser, driver, tmp_path / "chromedriver.log")
    try:
        d.get(f"{base}/api/v2/version")  # on the origin first, so the cookie can be set for it
        d.add_cookie({"name": "_token", "value": token, "path": "/"})
        d.get(f"{base}/ovtasks/ui/")
        table = find(d, "table#shards")
        text = table.text
        assert "00000" in text and "00001" in text and "passed" in text
        page = find(d, "body").text
        assert "signed in as admin" in page and "Quarantine reasons" in page and "Trend across runs" in page
        screenshot(d, OUT / "datasets.png")

        find(d, 'nav button[data-tab="gallery"]').click()
        wait_for(d, "const i = document.querySelectorAll('#g-grid img'); return i.length > 0 && "
                        "[...i].every(x => x.complete && x.naturalWidth > 0)", timeout=60)
        assert len(d.find_elements(By.CSS_SELECTOR, "#g-grid .tile")) == 12
        assert "page 1 of" in find(d, "#g-page").text
        screenshot(d, OUT / "gallery.png")

        find(d, 'nav button[data-tab="models"]').click()
        wait_for(d, "return document.querySelector('#m-list').innerText.includes('challenger')")
        models = find(d, "#m-list").text
        assert "ovtasks-ov-maskrcnn v2" in models and "generalized" in models and "novel" in models
        find(d, "#promote").click()
        wait_for(d, "return getComputedStyle(document.querySelector('#promote-result')).display !== 'none'")
        assert find(d, "#promote-result").text.split(":")[0] in ("Promoted", "Not promoted")
        wait_for(d, "return document.querySelector('#m-list').innerText.includes('gate vs champion')")  # the gate's verdict
        screenshot(d, OUT / "models.png")

        # Airflow's own UI shows the page from its navigation (an external view in an iframe)
        d.get(f"{base}/plugin/ovtasks")
        wait_for(d, "const f = document.querySelector('iframe'); return f && f.src.includes('/ovtasks/ui/')", timeout=60)
        screenshot(d, OUT / "airflow-nav.png")
    except Exception:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        d.quit()
    for name in ("datasets", "gallery", "models", "airflow-nav"):
        assert (OUT / f"{name}.png").stat().st_size > 10_000, name
