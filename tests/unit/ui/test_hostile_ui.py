"""The UI plugin on hostile stores (manifests are input, not trusted): script in counts, manifests that are
not objects, path tricks in generator, keys and checksums, a quote in a registered-model name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ovtasks.core.config import ConfigError, load_settings
from ovtasks.data import catalog
from ovtasks.ui import data

SCRIPT = "<img src=x onerror=alert(document.cookie)>"


def _settings(d: Path):
    return load_settings(env={"OVTASKS_DATA_DIR": str(d)})


def _write(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_counts_from_manifests_reach_the_page_only_as_numbers(tmp_path):
    _write(tmp_path / "clean" / "shards" / "00000.manifest.json",
           {"status": "complete", "counts": {"seen": SCRIPT, "kept": [1], "quarantined": {SCRIPT: SCRIPT, "too_small": 3}}})
    _write(tmp_path / "clean" / "shards" / "00001.manifest.json", [1, 2, 3])  # not an object
    _write(tmp_path / "pseudo" / "maskfree" / "00000.manifest.json", {"status": SCRIPT, "counts": {"images": SCRIPT, "annotations": 7}})
    _write(tmp_path / "pseudo" / "maskfree" / "00001.manifest.json", "just a string")
    _write(tmp_path / "pseudo" / "maskfree" / "validation_report.json", {"shards": [{"shard": "00000", "success": "yes", "reasons": SCRIPT}, 5]})
    d = catalog.datasets(_settings(tmp_path))
    rows = {r["shard"]: r for r in d["shards"]}
    assert rows["00000"]["ingest"]["seen"] is None and rows["00000"]["ingest"]["kept"] is None
    assert d["quarantine_reasons"] == {"too_small": 3}
    assert rows["00000"]["pseudo"] == {"status": "partial", "images": None, "labelled": None, "annotations": 7, "quarantined": None}
    assert rows["00000"]["gx"]["status"] == "failed" and rows["00000"]["gx"]["reasons"] == []
    assert SCRIPT not in json.dumps({k: v for k, v in d.items() if k != "shards"}) and d["totals"]["annotations"] == 7


def test_the_page_escapes_every_count_it_shows():
    """Every interpolation of a count in page.html goes through esc() (numbers from the server, escaped anyway)."""
    import re

    page = (Path(data.__file__).with_name("page.html")).read_text()
    for raw in ("${s.source}", "${t.kept}", "${i.seen ?? \"\"}", "${p.images ?? \"\"}", "${r.mask_AP50 ?? \"\"}", "<td class=\"n\">${v}</td>"):
        assert raw not in page, raw
    assert len(re.findall(r"\$\{esc\((?:s|t)\.", page)) == 8


@pytest.fixture
def client(tmp_path):
    from ovtasks.ui.app import create_app

    s = _settings(tmp_path)
    return TestClient(create_app(lambda: s, auth_dependency=lambda: object()))


def test_no_unauthenticated_schema_and_no_paths_in_generator(client):
    for url in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(url).status_code == 404, url
    for url in ("/api/datasets?generator=../x", "/api/gallery?generator=..%2F..%2Fetc", "/api/gallery/00000/1.jpg?generator=../x"):
        assert client.get(url).status_code == 422, url
    assert client.get("/api/datasets?generator=grounded").status_code == 200
    with pytest.raises(catalog.NotFound):
        catalog.datasets(load_settings(env={}), "../x")


def test_thumbnails_of_keys_with_slashes_and_a_hostile_checksum(tmp_path):
    from ovtasks.ingest.pipeline import ingest
    from tests.support.shard_builders import flatten, good_sample, tar_of

    src = tmp_path / "src"
    src.mkdir()
    (src / "00000.tar").write_bytes(tar_of(flatten({"dir/000000001": good_sample(1), "dir/000000002": good_sample(2)})))
    s = _settings(tmp_path)
    ingest(str(src), str(tmp_path / "clean"), s, workers=1)
    p = data.THUMBS.path(s, "00000", "dir/000000002")
    assert p.is_file() and p.parent.parent == Path(s.data_dir) / "cache" / "ui"
    m = tmp_path / "clean" / "shards" / "00000.manifest.json"
    doc = json.loads(m.read_text())
    doc["files"]["shards/00000.tar"]["sha256"] = "/../../../../tmp/evil"
    m.write_text(json.dumps(doc))
    with pytest.raises(data.NotFound, match="sha256"):
        data.THUMBS.path(s, "00000", "dir/000000001")


def test_a_quote_in_a_registered_model_name_is_refused():
    with pytest.raises(ConfigError, match="model_name"):
        load_settings(env={"OVTASKS_REGISTRY__MODEL_NAME": "x' OR name LIKE '%"})
