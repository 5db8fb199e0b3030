"""``ovtasks validate``: a Great Expectations gate over each shard's pseudo-labels.

Per shard of ``pseudo/<generator>/`` (complete manifests only), two tables are built from the shard
JSON and checked by GX 1.x (an ephemeral context made inside the call, never at import or DAG-parse
time):

* one row per annotation — the box inside the image (``box_overflow`` ≤ ``max_box_overflow_px``),
  mask area / box area within bounds (``mostly`` a fraction), score in [0, 1], the RLE decodes to a
  non-empty mask of the image's size, the category is in the vocabulary (or a well-formed
  open-vocabulary name), and at most ``max_duplicate_rate`` near-identical duplicates (same
  category, mask IoU > ``duplicate_iou``);
* one row per image — instances per image within bounds, and at least
  ``min_labelled_image_fraction`` of the images with an instance scoring ``instance_score_floor``
  or more.

Thresholds live in ``Settings.validation``. Written next to the shard (atomically, the JSON last)::

    pseudo/<generator>/validation/NNNNN/annotations.html, images.html   GX data docs pages
    pseudo/<generator>/NNNNN.validation.json                           success, failed checks, GX results

and for the run ``pseudo/<generator>/validation_report.json``: every shard passed or failed with its
reasons, and ``training_shards`` (the passing ones). Training reads that list; a failing shard is
never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovtasks import __version__

from ovtasks.core import history
from ovtasks.pseudolabel.candidates import OPEN_VOCAB_ID_BASE, Vocabulary
from ovtasks.core.config import Settings, ValidateConfig
from ovtasks.data.catalog import manifest_names, record_gx
from ovtasks.data.groundtruth import to_pycoco
from ovtasks.core.storage import open_store

log = logging.getLogger(__name__)


def _rle_ok(seg, h: int, w: int) -> bool:
    """The RLE decodes to a non-empty (h, w) mask and re-encodes to itself (pycocotools decodes some
    garbage strings without complaint; a real RLE round-trips)."""
    from ovtasks.data.groundtruth import decode_rle, encode_rle

    if not _declared_size_is(seg, h, w):  # a 45-byte RLE may declare 20000x20000: never decode what is not this image's
        return False
    try:
        m = decode_rle(seg)
        counts = seg["counts"]
        same = encode_rle(m)["counts"] == (counts.decode() if isinstance(counts, bytes) else counts)
    except Exception:  # noqa: BLE001 - any malformed RLE is just "not ok"
        return False
    return same and m.shape == (h, w) and bool(m.any())


def _declared_size_is(seg, h: int, w: int) -> bool:
    size = seg.get("size") if isinstance(seg, dict) else None
    return isinstance(size, (list, tuple)) and len(size) == 2 and [_int(size[0]), _int(size[1])] == [h, w]


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _number(v) -> float:
    """A JSON number as a float; anything else (a string, a list, None, a bool) as NaN, which every range
    expectation refuses."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")
    return float(v)


def _box(v) -> tuple[float, float, float, float] | None:
    """``[x, y, w, h]`` of four finite numbers with positive width and height; None otherwise."""
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    x, y, bw, bh = (_number(t) for t in v)
    if not all(np.isfinite((x, y, bw, bh))) or bw <= 0 or bh <= 0:
        return None
    return x, y, bw, bh


def _overflow(box, h: int, w: int) -> float:
    """Pixels the box reaches outside the image (inf for no box or no image)."""
    if box is None or not (h and w):
        return float("inf")
    x, y, bw, bh = box
    return max(-x, -y, x + bw - w, y + bh - h)


def _duplicates(anns: list[dict], sizes: dict, iou_thr: float, cap: int) -> list[bool]:
    """Per annotation: True when an earlier, higher-scored one of its image and category overlaps it with mask IoU
    above ``iou_thr``. Near-linear: masks are compared only when their boxes overlap and their areas are within
    the IoU's ratio (a sweep over boxes sorted by x), an image over ``cap`` instances is not compared at all (its
    instance count fails the images suite), and an RLE that does not declare its image's size is skipped (the RLE
    check fails it) instead of being decoded."""
    from pycocotools import mask as mask_utils

    flags = [False] * len(anns)
    per_image: dict[int, int] = {}
    for a in anns:
        if _int(a.get("image_id")) is not None:
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(anns):
        img, cat = a.get("image_id"), a.get("category_id")
        if _int(img) is None or _int(cat) is None or img not in sizes or per_image.get(img, 0) > cap:
            continue
        groups.setdefault((img, cat), []).append(i)
    for (img, _cat), idx in groups.items():
        if len(idx) < 2:
            continue
        h, w = sizes[img]
        items = []
        for i in idx:
            seg = anns[i].get("segmentation")
            if not _declared_size_is(seg, h, w):
                continue
            try:
                rle = to_pycoco(seg)
                x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
                area = float(mask_utils.area(rle))
            except Exception:  # noqa: BLE001 - a malformed RLE: the RLE check reports it
                continue
            score = _number(anns[i].get("score"))
            items.append((x, y, x + bw, y + bh, area, -score if np.isfinite(score) else 0.0, i, rle))
        items.sort(key=lambda t: t[0])
        for k, (x1, y1, x2, y2, area, neg_score, i, rle) in enumerate(items):
            for m in range(k + 1, len(items)):
                ox1, oy1, ox2, oy2, oarea, oneg, j, orle = items[m]
                if ox1 >= x2:  # sorted by x1: no later box overlaps this one
                    break
                if oy1 >= y2 or oy2 <= y1 or min(area, oarea) < iou_thr * max(area, oarea):
                    continue
                if float(mask_utils.iou([rle], [orle], [0])[0][0]) > iou_thr:
                    # the lower-scored of the two (the later in the file on a tie) is the duplicate
                    flags[j if (oneg, j) > (neg_score, i) else i] = True
    return flags


def tables(doc: dict, vocab: Vocabulary, cfg: ValidateConfig):
    """(annotations, images) pandas tables of one shard JSON, with the columns the suite checks."""
    import pandas as pd

    images, anns = doc.get("images"), doc.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise ValueError("the shard JSON needs lists 'images' and 'annotations'")
    sizes = {}
    for im in images:
        if not isinstance(im, dict) or _int(im.get("id")) is None or _int(im.get("height")) is None or _int(im.get("width")) is None \
                or im["height"] <= 0 or im["width"] <= 0:
            raise ValueError(f"an image record needs integer id, height, width > 0: {json.dumps(im)[:200]}")
        sizes[im["id"]] = (im["height"], im["width"])
    anns = [a if isinstance(a, dict) else {} for a in anns]  # a non-object annotation fails every check below
    dup = _duplicates(anns, sizes, cfg.duplicate_iou, cfg.max_instances_per_image)
    rows = []
    for a, is_dup in zip(anns, dup):
        img = a.get("image_id") if _int(a.get("image_id")) is not None else None
        h, w = sizes.get(img, (0, 0))
        pseudo = _box(a.get("pseudo_box") or a.get("bbox"))
        bbox = _box(a.get("bbox"))  # what training reads
        overflow = _overflow(pseudo, h, w)
        box_area = pseudo[2] * pseudo[3] if pseudo else 0.0
        cid, name = a.get("category_id"), a.get("category_name")
        entry = vocab.by_id.get(cid) if isinstance(cid, int) else None
        if a.get("known_category", True):
            cat_ok = entry is not None and entry.name == name
        else:
            cat_ok = isinstance(cid, int) and cid >= OPEN_VOCAB_ID_BASE and isinstance(name, str) and bool(name.strip())
        score = a.get("score")
        area = _number(a.get("area"))
        rows.append({
            "image_id": str(a.get("image_id"))[:40], "category_name": str(name)[:80], "box_overflow": float(overflow),
            "bbox_overflow": _overflow(bbox, h, w),
            "mask_box_ratio": area / box_area if box_area > 0 and np.isfinite(area) else float("inf"),
            "score": _number(score),
            "rle_valid": _rle_ok(a.get("segmentation"), h, w) if h else False,
            "category_valid": bool(cat_ok), "duplicate": float(is_dup),
        })
    cols = ["image_id", "category_name", "box_overflow", "bbox_overflow", "mask_box_ratio", "score", "rle_valid",
            "category_valid", "duplicate"]
    ann_df = pd.DataFrame(rows, columns=cols)
    per_image = {i: [] for i in sizes}
    for a in anns:
        if _int(a.get("image_id")) is not None and a["image_id"] in per_image:
            sc = _number(a.get("score"))
            per_image[a["image_id"]].append(sc if np.isfinite(sc) else 0.0)
    img_df = pd.DataFrame([{"image_id": i, "instances": len(s), "labelled": float(any(v >= cfg.instance_score_floor for v in s))}
                           for i, s in per_image.items()], columns=["image_id", "instances", "labelled"])
    return ann_df, img_df


def suites(cfg: ValidateConfig):
    """The two expectation suites (annotations, images) as GX expectation objects."""
    import great_expectations as gx

    E = gx.expectations
    ann = [
        E.ExpectColumnValuesToBeBetween(column="box_overflow", max_value=cfg.max_box_overflow_px),
        # the box training reads: four finite numbers, positive size, inside the image
        E.ExpectColumnValuesToBeBetween(column="bbox_overflow", max_value=cfg.max_box_overflow_px),
        E.ExpectColumnValuesToBeBetween(column="mask_box_ratio", min_value=cfg.min_mask_box_ratio,
                                        max_value=cfg.max_mask_box_ratio, mostly=cfg.mask_box_ratio_mostly),
        E.ExpectColumnValuesToBeBetween(column="score", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToNotBeNull(column="score"),
        E.ExpectColumnValuesToBeInSet(column="rle_valid", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="category_valid", value_set=[True]),
    ]
    if cfg.max_duplicate_rate < 1.0:
        ann.append(E.ExpectColumnMeanToBeBetween(column="duplicate", min_value=0.0, max_value=cfg.max_duplicate_rate))
    img = [
        E.ExpectColumnValuesToBeBetween(column="instances", min_value=0, max_value=cfg.max_instances_per_image),
        E.ExpectColumnMeanToBeBetween(column="labelled", min_value=cfg.min_labelled_image_fraction, max_value=1.0),
        E.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    return {"annotations": ann, "images": img}


@dataclass
class ShardValidation:
    shard: str
    success: bool
    failed: list[dict]
    results: dict
    html: dict[str, str]  # table -> local HTML path


def _mean_of_empty_is_fine(table: str, df, exp_type: str) -> bool:
    """A shard with no annotations has nothing to average: its duplicate rate is 0, not a failure."""
    return table == "annotations" and df.empty and exp_type == "expect_column_mean_to_be_between"


def validate_tables(shard: str, ann_df, img_df, cfg: ValidateConfig, docs_dir: str) -> ShardValidation:
    """Run the suites with an ephemeral GX context; data docs pages land under ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines drown the run's own
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(site_name="ovtasks", site_config={
        "class_name": "SiteBuilder", "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    source = ctx.data_sources.add_pandas("pseudo_labels")
    failed, results, defs = [], {}, []
    frames = {"annotations": ann_df, "images": img_df}
    for table, expectations in suites(cfg).items():
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"pseudo_{table}"))
        for e in expectations:
            suite.add_expectation(e)
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("shard")
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{shard}_{table}", data=batch, suite=suite))
        defs.append((table, vd))
    for table, vd in defs:
        df = frames[table]
        res = vd.run(batch_parameters={"dataframe": df})
        results[table] = res.to_json_dict()
        for r in res.results:
            cfg_ = r.expectation_config
            if r.success or _mean_of_empty_is_fine(table, df, cfg_.type):
                continue
            kw = {k: v for k, v in cfg_.kwargs.items() if k not in ("batch_id",)}
            failed.append({"table": table, "expectation": cfg_.type, "column": kw.get("column"), "kwargs": kw,
                           "observed": r.result.get("observed_value"), "unexpected_count": r.result.get("unexpected_count"),
                           "unexpected_percent": r.result.get("unexpected_percent"),
                           "partial_unexpected_list": (r.result.get("partial_unexpected_list") or [])[:5]})
    ctx.build_data_docs(site_names=["ovtasks"])
    html = {}
    for table in frames:
        pages = sorted(Path(docs_dir, "validations", f"pseudo_{table}").rglob("*.html"))
        if pages:
            html[table] = str(pages[-1])
    return ShardValidation(shard, not failed, failed, results, html)


def reason_text(f: dict) -> str:
    col = f" on {f['column']}" if f.get("column") else ""
    obs = f"observed {f['observed']}" if f.get("observed") is not None else f"{f.get('unexpected_count')} unexpected"
    return f"{f['table']}: {f['expectation']}{col} ({obs})"


@dataclass(frozen=True)
class ValidateResult:
    report: dict
    report_uri: str


def validate(src_uri: str, settings: Settings, generator: str = "maskfree", progress=None) -> ValidateResult:
    """Validate every complete pseudo-label shard under ``src_uri/pseudo/<generator>/``."""
    store = open_store(src_uri, settings.s3)
    prefix = f"pseudo/{generator}"
    shards = manifest_names(store, prefix)  # not a sibling generator's (pseudo/<generator>2/...)
    if not shards:
        raise FileNotFoundError(f"no pseudo-label shards ({prefix}/*.manifest.json) under {store.uri}")
    vocab = Vocabulary.load(settings.candidates.vocabulary)
    cfg = settings.validation
    tick = progress("validate", len(shards)) if progress else None
    entries = []
    for shard in shards:
        manifest = json.loads(store.get_bytes(f"{prefix}/{shard}.manifest.json"))
        if manifest.get("status") != "complete":
            entries.append({"shard": shard, "success": False, "reasons": ["pseudo-label manifest is not complete"]})
            continue
        blob = store.get_bytes(f"{prefix}/{shard}.json")
        sha = hashlib.sha256(blob).hexdigest()
        recorded = ((manifest.get("files") or {}).get(f"{prefix}/{shard}.json") or {}).get("sha256")
        if sha != recorded:  # changed after its manifest was written (a relabel in flight, an edit): not what was labelled
            entries.append({"shard": shard, "success": False, "sha256": sha,
                            "reasons": [f"pseudo-label JSON does not match its manifest (sha256 {sha[:12]} != {str(recorded)[:12]})"]})
            continue
        try:  # one malformed shard fails alone, with its reason; the others are still checked
            doc = json.loads(blob)
            if not isinstance(doc, dict):
                raise ValueError(f"the shard JSON is a {type(doc).__name__}, not an object")
            ann_df, img_df = tables(doc, vocab, cfg)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError) as exc:
            entries.append({"shard": shard, "success": False, "sha256": sha,
                            "reasons": [f"malformed pseudo-label JSON: {type(exc).__name__}: {str(exc)[:300]}"]})
            log.warning("shard failed validation; excluded from training",
                        extra={"shard": shard, "reasons": entries[-1]["reasons"]})
            if tick:
                tick()
            continue
        with tempfile.TemporaryDirectory(prefix="ovtasks-gx-") as docs:
            v = validate_tables(shard, ann_df, img_df, cfg, docs)
            pages = {}
            for table, path in v.html.items():
                key = f"{prefix}/validation/{shard}/{table}.html"
                store.put_file(key, path)
                pages[table] = key
        reasons = [reason_text(f) for f in v.failed]
        out = {"shard": shard, "success": v.success, "reasons": reasons, "failed": v.failed, "data_docs": pages,
               "rows": {"annotations": len(ann_df), "images": len(img_df)}, "thresholds": cfg.model_dump(mode="json"),
               "pseudo_manifest_sha256": recorded, "sha256": sha,
               "code_version": __version__, "results": v.results}
        store.put_bytes(f"{prefix}/{shard}.validation.json", json.dumps(out, indent=2, default=str).encode())
        entries.append({k: out[k] for k in ("shard", "success", "reasons", "data_docs", "rows", "sha256")})
        if not v.success:
            log.warning("shard failed validation; excluded from training", extra={"shard": shard, "reasons": reasons})
        if tick:
            tick()
    report = {"stage": "validate", "generator": generator, "src": store.uri, "shards": entries,
              "passed": sum(e["success"] for e in entries), "failed": sum(not e["success"] for e in entries),
              "training_shards": [e["shard"] for e in entries if e["success"]],
              "excluded": {e["shard"]: e["reasons"] for e in entries if not e["success"]},
              "thresholds": cfg.model_dump(mode="json"), "code_version": __version__}
    store.put_bytes(f"{prefix}/validation_report.json", json.dumps(report, indent=2).encode())
    history.record(store, "validate", report)
    record_gx(store, generator, report)
    return ValidateResult(report, store.uri_for(f"{prefix}/validation_report.json"))
