"""The summary index: the Datasets and Gallery answers from it equal a full scan of the manifests and shard
JSONs, page by page and across chunk boundaries; it is merged, replaced and rebuilt as the stages write."""

import json
from pathlib import Path

import numpy as np
import pytest

from ovtasks.core.config import load_settings
from ovtasks.core.storage import open_store
from ovtasks.data import catalog
from ovtasks.data.summary_index import GalleryCounts, chunk_of, grid_index, ingest_index
from ovtasks.ui import data as ui_data

SHARDS = ["00998", "00999", "01000", "01001", "01002", "02000"]  # three chunks: 00, 01, 02
CATS = ["ball", "box", "star"]


def _write(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _world(root: Path) -> None:
    rng = np.random.default_rng(0)
    report = []
    for i, shard in enumerate(SHARDS):
        _write(root / "laion" / f"{shard}.json", {})  # not a shard: only *.tar counts
        (root / "laion" / f"{shard}.tar").write_bytes(b"")
        q = {"too_small": int(rng.integers(0, 3)), "punsafe": 1}
        _write(root / "clean" / "shards" / f"{shard}.manifest.json",
               {"status": "complete" if i != 3 else "partial", "counts": {"seen": 10 + sum(q.values()), "kept": 10, "quarantined": q}})
        if shard == "02000":
            continue  # ingested, not pseudo-labelled yet
        images, anns = [], []
        for j in range(int(rng.integers(2, 7))):
            image_id = i * 100 + j
            images.append({"id": image_id, "key": f"{shard}-{j}", "width": 64, "height": 48, "caption": "a thing"})
            for _ in range(int(rng.integers(0, 4))):
                anns.append({"id": len(anns) + 1000 * i, "image_id": image_id, "category_id": 1, "category_name": str(rng.choice(CATS)),
                             "score": float(rng.choice([0.0, 0.05, 0.3, 0.31, 0.5, 0.77, 0.95, 1.0])), "bbox": [1, 2, 3, 4],
                             "segmentation": {"size": [48, 64], "counts": "0"}})
        coco = {"images": images, "annotations": anns, "categories": []}
        _write(root / "pseudo" / "maskfree" / f"{shard}.json", coco)
        manifest = {"status": "complete", "counts": {"images": len(images), "labelled": len(images), "annotations": len(anns),
                                                     "quarantined": 0}, "files": {f"pseudo/maskfree/{shard}.json": {"sha256": shard}}}
        if i % 2:  # half the manifests predate the recorded gallery counts
            manifest["gallery"] = GalleryCounts.from_coco(coco)
        _write(root / "pseudo" / "maskfree" / f"{shard}.manifest.json", manifest)
        report.append({"shard": shard, "success": i != 1, "reasons": [] if i != 1 else ["too many empty masks"]})
    _write(root / "pseudo" / "maskfree" / "validation_report.json", {"shards": report})


def _reference_gallery(root: Path, category, min_score, page, per_page):
    """The Gallery by brute force: every shard JSON in order, every image with a matching annotation."""
    hits = []
    for shard in SHARDS:
        p = root / "pseudo" / "maskfree" / f"{shard}.json"
        if not p.exists():
            continue
        coco = json.loads(p.read_text())
        for im in sorted(coco["images"], key=lambda im: im["id"]):
            anns = [a for a in coco["annotations"] if a["image_id"] == im["id"] and a["score"] >= min_score
                    and (not category or a["category_name"] == category)]
            if anns:
                hits.append((shard, im["id"], [a["id"] for a in anns]))
    return len(hits), hits[(page - 1) * per_page: page * per_page]


@pytest.fixture
def world(tmp_path):
    _world(tmp_path)
    return tmp_path, load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path)})


def _answers(settings):
    out = []
    for category in (None, "ball", "star", "nothing"):
        for min_score in (0.0, 0.3, 0.31, 0.5, 1.0):
            for page, per_page in ((1, 100), (1, 3), (2, 3), (4, 2), (9, 2)):
                g = ui_data.gallery(settings, category, min_score, page, per_page)
                out.append((category, min_score, page, per_page, g["total"], g["filters"]["min_score"],
                            [(i["shard"], i["image_id"], [a["id"] for a in i["annotations"]]) for i in g["items"]], g["categories"]))
    return out


def test_gallery_from_the_index_equals_a_full_scan(world):
    root, settings = world
    without = _answers(settings)
    assert ui_data.gallery(settings)["index"].startswith("missing")
    assert catalog.rebuild(settings, ("maskfree",))["pseudo/maskfree"] == 5
    assert ui_data.gallery(settings)["index"] == "complete"
    with_index = _answers(settings)
    assert with_index == without
    for category, min_score, page, per_page, total, applied, items, _ in with_index:
        assert applied == min_score if min_score != 0.31 else applied == 0.35  # rounded up to the 0.05 grid
        ref_total, ref_items = _reference_gallery(root, category, applied, page, per_page)
        assert (total, items) == (ref_total, [(s, i, a) for s, i, a in ref_items]), (category, min_score, page, per_page)
    assert any(items for *_, items, _ in with_index if items and items[0][0] != items[-1][0])  # pages span shards
    for category, min_score, *_, facets in with_index:  # the category facet: annotations at or above the score, any category
        applied = 0.35 if min_score == 0.31 else min_score
        counts = {}
        for p in sorted((root / "pseudo" / "maskfree").glob("0*.json")):
            if not p.name.endswith(".manifest.json"):
                for a in json.loads(p.read_text())["annotations"]:
                    if a["score"] >= applied:
                        counts[a["category_name"]] = counts.get(a["category_name"], 0) + 1
        assert facets == counts, (category, min_score)


def test_datasets_pages_across_chunks_and_equal_the_scan(world):
    _, settings = world
    scan = catalog.datasets(settings, per_page=100)
    assert scan["index"].startswith("missing for ingest")
    catalog.rebuild(settings, ("maskfree",))
    full = catalog.datasets(settings, per_page=100)
    assert full["index"] == "complete"
    for k in ("stages", "totals", "quarantine_reasons", "shards", "total_shards"):
        assert full[k] == scan[k], k
    assert full["stages"] == {"source": 6, "clean": 5, "pseudo_labelled": 5, "gx_passed": 4, "gx_failed": 1}
    assert [r["shard"] for r in full["shards"]] == SHARDS and full["total_shards"] == 6
    assert full["shards"][1]["gx"]["reasons"] == ["too many empty masks"] and "gallery" not in full["shards"][0]["pseudo"]
    assert "pseudo" not in full["shards"][-1]
    paged = []
    for page in range(1, 4):
        d = catalog.datasets(settings, page=page, per_page=2)
        assert d["pages"] == 3 and d["page"] == page
        paged += d["shards"]
    assert paged == full["shards"]
    assert catalog.datasets(settings, page=4, per_page=2)["shards"] == []


def test_update_merges_removes_and_summarises(tmp_path):
    store = open_store(str(tmp_path), None)
    index = ingest_index(store)
    row = {"seen": 3, "kept": 2, "quarantined": 1, "reasons": {"too_small": 1}, "status": "complete"}
    index.update({"00001": row, "01000": row}, {"source_shards": 7})
    index.update({"00002": {**row, "status": "failed"}})
    s = index.summary()
    assert s["extra"] == {"source_shards": 7} and sorted(s["chunks"]) == ["00", "01"]
    assert s["chunks"]["00"] == {"rows": 2, "complete": 1, "seen": 6, "kept": 4, "reasons": {"too_small": 2}}
    index.update({"01000": None})  # its manifest is gone: the shard leaves, and so does its emptied chunk
    assert sorted(index.summary()["chunks"]) == ["00"] and not store.exists(index.chunk_key("01"))
    index.replace({"00003": row})
    assert index.chunk("00") == {"00003": row} and index.summary()["extra"] == {"source_shards": 7}
    assert chunk_of("123") == "" and chunk_of("01234") == "01"


def test_min_score_rounds_up_to_the_grid():
    assert [grid_index(x) for x in (0.0, 0.05, 0.3, 0.3000000001, 0.31, 0.999, 1.0)] == [0, 1, 6, 6, 7, 20, 20]
    g = GalleryCounts()
    g.add_image([("ball", 0.31), ("ball", 0.9), ("box", 0.05)])
    g.add_image([])
    d = g.as_dict()
    assert d["images"]["*"][0] == 1 and d["images"]["ball"][7] == 1 and d["images"]["ball"][19] == 0
    assert d["annotations"]["ball"][6] == 2 and d["annotations"]["ball"][7] == 1 and d["annotations"]["box"][1] == 1


def test_ingest_writes_its_rows(synth_small, tmp_path):
    from ovtasks.ingest.pipeline import ingest

    settings = load_settings(env={})
    report = ingest(synth_small[0], str(tmp_path / "clean"), settings, workers=1).report
    s = ingest_index(open_store(str(tmp_path / "clean"), None)).summary()
    assert s["extra"]["source_shards"] == len(report["shards"])
    assert sum(a["rows"] for a in s["chunks"].values()) == len(report["shards"])
    assert sum(a["kept"] for a in s["chunks"].values()) == report["kept"]


def test_rebuild_command_after_the_index_is_lost(world, monkeypatch, capsys):
    import shutil

    from ovtasks.cli.main import main

    root, settings = world
    monkeypatch.setenv("OVTASKS_DATA_DIR", str(root))
    assert main(["index", "rebuild", "--generator", "maskfree"]) == 0
    out = capsys.readouterr().out
    assert "index ingest" in out and "6 shards" in out and "index gx/maskfree" in out
    before = catalog.datasets(settings)
    shutil.rmtree(root / "clean" / "index")  # lost: the page says so and still answers from the manifests
    lost = catalog.datasets(settings)
    assert lost["index"].startswith("missing for ingest") and lost["shards"] == before["shards"]
    assert main(["index", "rebuild", "--generator", "maskfree"]) == 0
    assert catalog.datasets(settings) == before
