"""Every endpoint of the plugin's FastAPI app behind Airflow's real SimpleAuthManager (token from its own
/auth/token), on a populated world and an empty one, including the auth failures."""

import importlib.util
import io

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from tests.support import ROOT

ENDPOINTS = ["/ovtasks/ui/", "/ovtasks/api/whoami", "/ovtasks/api/datasets", "/ovtasks/api/gallery",
             "/ovtasks/api/gallery/00000/0.jpg", "/ovtasks/api/models"]


def _client(settings) -> TestClient:
    from airflow.api_fastapi.app import init_auth_manager

    from ovtasks.ui.app import create_app

    root = FastAPI()
    init_auth_manager(root)  # mounts the simple auth manager's /auth (POST /auth/token)
    root.mount("/ovtasks", create_app(lambda: settings))
    return TestClient(root)


def _login(client, passwords, user) -> dict:
    r = client.post("/auth/token", json={"username": user, "password": passwords[user]})
    assert r.status_code in (200, 201), r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


@pytest.fixture(scope="module")
def own_world(make_ui_world):
    return make_ui_world()


@pytest.fixture(scope="module")
def world(own_world, simple_auth):
    c = _client(own_world[0])
    return c, {u: _login(c, simple_auth, u) for u in simple_auth}


@pytest.fixture(scope="module")
def empty(ui_empty, simple_auth):
    c = _client(ui_empty)
    return c, _login(c, simple_auth, "viewer")


def test_anonymous_and_bad_tokens_are_refused(world):
    c, _ = world
    for url in ENDPOINTS:
        assert c.get(url).status_code == 401, url
        assert c.get(url, headers={"Authorization": "Bearer not-a-jwt"}).status_code in (401, 403), url
    assert c.post("/ovtasks/api/promote", json={}).status_code == 401
    c.cookies.set("_token", "forged")
    try:
        assert c.get("/ovtasks/api/datasets").status_code in (401, 403)
    finally:
        c.cookies.clear()


def test_page_renders_for_a_viewer(world):
    c, h = world
    r = c.get("/ovtasks/ui/", headers=h["viewer"])
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "signed in as viewer" in r.text and 'data-tab="gallery"' in r.text


def test_datasets(world):
    c, h = world
    d = c.get("/ovtasks/api/datasets", headers=h["viewer"]).json()
    assert d["stages"] == {"source": 2, "clean": 2, "pseudo_labelled": 2, "gx_passed": 2, "gx_failed": 0}
    assert d["index"] == "complete"  # ingest, pseudo-label and validate each wrote their part
    assert [r["shard"] for r in d["shards"]] == ["00000", "00001"]
    t = d["totals"]
    assert t["seen"] == 80 and t["seen"] - t["kept"] == sum(d["quarantine_reasons"].values()) > 0
    for r in d["shards"]:
        assert r["ingest"]["seen"] == r["ingest"]["kept"] + r["ingest"]["quarantined"]
        assert r["gx"]["status"] == "passed" and r["pseudo"]["status"] == "complete"
    assert d["trend"]["ingest"] and d["trend"]["ingest"][-1]["seen"] == 80
    assert d["trend"]["validate"] and d["trend"]["validate"][-1]["passed"] == 2


def test_datasets_empty(empty):
    c, h = empty
    d = c.get("/ovtasks/api/datasets", headers=h).json()
    assert d["shards"] == [] and set(d["stages"].values()) == {0} and d["trend"] == {"ingest": [], "pseudo_label": [], "validate": []}


def test_gallery_pages_and_filters(world):
    c, h = world
    g = c.get("/ovtasks/api/gallery?per_page=5", headers=h["viewer"]).json()
    assert g["total"] > 10 and g["pages"] == (g["total"] + 4) // 5 and len(g["items"]) == 5
    p2 = c.get("/ovtasks/api/gallery?per_page=5&page=2", headers=h["viewer"]).json()
    assert {(i["shard"], i["image_id"]) for i in p2["items"]}.isdisjoint({(i["shard"], i["image_id"]) for i in g["items"]})
    cat = sorted(g["categories"])[0]
    f = c.get(f"/ovtasks/api/gallery?category={cat}&per_page=100", headers=h["viewer"]).json()
    assert 0 < f["total"] < g["total"] and all(a["category"] == cat for i in f["items"] for a in i["annotations"])
    assert c.get("/ovtasks/api/gallery?min_score=0.95", headers=h["viewer"]).json()["total"] == 0  # fixture scores are 0.9
    assert c.get("/ovtasks/api/gallery?min_score=2", headers=h["viewer"]).status_code == 422


def test_gallery_empty(empty):
    c, h = empty
    g = c.get("/ovtasks/api/gallery", headers=h).json()
    assert g.pop("index").startswith("missing")  # nothing has run: no stage wrote an index yet
    assert g == {"generator": "maskfree", "page": 1, "per_page": 24, "total": 0, "pages": 0,
                 "filters": {"category": None, "min_score": 0.0}, "categories": {}, "items": []}


def test_thumbnails_have_overlays_and_refuse_bad_names(world, own_world):
    c, h = world
    item = c.get("/ovtasks/api/gallery?per_page=1", headers=h["viewer"]).json()["items"][0]
    url = f"/ovtasks/{item['thumbnail']}"
    r = c.get(url, headers=h["viewer"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    drawn = Image.open(io.BytesIO(r.content))
    assert max(drawn.size) <= own_world[0].ui.thumb_size
    plain = Image.open(io.BytesIO(c.get(url + "?category=no-such-category", headers=h["viewer"]).content))
    import numpy as np

    diff = np.abs(np.asarray(drawn, np.int16) - np.asarray(plain, np.int16)).mean()
    assert diff > 2, "the masks were not drawn"
    assert c.get("/ovtasks/api/gallery/99999/1.jpg", headers=h["viewer"]).status_code == 404
    assert c.get("/ovtasks/api/gallery/..%2F..%2Fetc/1.jpg", headers=h["viewer"]).status_code == 404
    assert c.get(f"/ovtasks/api/gallery/{item['shard']}/123456789.jpg", headers=h["viewer"]).status_code == 404


def test_models_and_empty_models(world, empty):
    c, h = world
    m = c.get("/ovtasks/api/models", headers=h["viewer"]).json()["models"]
    assert [v["version"] for v in m] == ["2", "1"] and m[0]["aliases"] == ["challenger"]
    assert m[0]["gx_status"] == "passed" and m[0]["lineage"]["dag_run"] == "ovtasks_retrain/manual__1"
    assert m[0]["lineage"]["data_manifest_sha256"] == "manifest1" and m[0]["lineage"]["mlflow_run"]
    assert {(r["setting"], r["split"]) for r in m[0]["evaluation"]} == {(s, p) for s in ("generalized", "constrained") for p in ("base", "novel")}
    assert next(r for r in m[0]["evaluation"] if r["split"] == "novel")["mask_AP50"] == 3.0
    ce, he = empty
    assert ce.get("/ovtasks/api/models", headers=he).json() == {"models": []}


def test_promote_needs_admin_and_runs_the_gate(world):
    c, h = world
    for user in ("viewer", "op"):
        r = c.post("/ovtasks/api/promote", json={"reason": "try"}, headers=h[user])
        assert r.status_code == 403 and "refused" in r.json()["detail"], (user, r.text)
        assert c.get("/ovtasks/api/whoami", headers=h[user]).json()["can_promote"] is False
    assert c.get("/ovtasks/api/whoami", headers=h["admin"]).json() == {"user": "admin", "can_promote": True, "why": "role admin"}
    # an unbounded tolerance is a 422 with its reason, never a 500 and never a tag (red-team round three, item 5)
    for body in ('{"tolerance": Infinity}', '{"tolerance": NaN}', '{"tolerance": 1e308}', '{"tolerance": 11}'):
        r = c.post("/ovtasks/api/promote", content=body, headers={**h["admin"], "Content-Type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)
    assert c.get("/ovtasks/api/models", headers=h["viewer"]).status_code == 200
    assert c.post("/ovtasks/api/promote", data="model=ov-maskrcnn", headers={**h["admin"], "Content-Type": "application/x-www-form-urlencoded"}).status_code == 422
    r = c.post("/ovtasks/api/promote", json={"reason": "from the test"}, headers=h["admin"]).json()
    assert r["promoted"] is True and r["challenger"] == "2" and r["champion_after"] == "2"
    again = c.post("/ovtasks/api/promote", json={}, headers=h["admin"]).json()
    assert again["promoted"] is False and "already the champion" in again["reason"]
    m = c.get("/ovtasks/api/models", headers=h["viewer"]).json()["models"]
    assert sorted(m[0]["aliases"]) == ["challenger", "champion"] and m[0]["promotion"]["promoted_by"] == "admin"
    assert m[0]["promotion"]["promotion_reason"] == "from the test"
    assert m[0]["promotion_gate"]["verdict"] == "first" and m[0]["promotion_gate"]["floor"] == 1.0  # the gate's record, for the page


def test_plugin_declares_the_app_and_the_nav_entry():
    spec = importlib.util.spec_from_file_location("ovtasks_plugin", ROOT / "plugins" / "ovtasks_plugin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p = mod.OvtasksPlugin
    assert p.fastapi_apps[0]["url_prefix"] == "/ovtasks" and isinstance(p.fastapi_apps[0]["app"], FastAPI)
    assert p.external_views[0]["href"] == "/ovtasks/ui/" and p.external_views[0]["destination"] == "nav"
