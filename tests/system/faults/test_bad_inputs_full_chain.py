"""Bad inputs through the whole chain, not only ingest: images that decode but can break a model (1x1,
10000x20, all black), a caption of stop-words only, a caption with 1000 candidate words, plus ingest-corpus
kinds (corrupt JPEG, non-UTF-8 caption, missing image). Ingest runs with its size/aspect/caption filters
opened so these reach the models. Every sample ends kept, quarantined or skipped with a reason; every
stage's counts add up; the shard completes through pseudo-label, validation and training."""

import io
import json

import numpy as np
from PIL import Image

from ovtasks.core.config import load_settings
from ovtasks.core.shards import ShardWriter, iter_tar_samples
from ovtasks.core.storage import open_store
from tests.support import ROOT


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _meta(key, caption, w, h) -> bytes:
    return json.dumps({"key": key, "caption": caption, "width": w, "height": h, "punsafe": 0.01, "pwatermark": 0.01,
                       "status": "success"}).encode()


def _build(synth_uri: str, out_dir) -> dict[str, str]:
    """One raw shard: 8 good synthetic samples + the bad ones; returns {key: kind}."""
    kinds, members = {}, []
    with open(f"{synth_uri}/00000.tar", "rb") as fh:
        for i, s in enumerate(iter_tar_samples(fh, {})):
            if s.members.get("json") and json.loads(s.members["json"]).get("punsafe", 1) < 0.5 and len(members) < 8:
                members.append((s.key, {"jpg": s.members["jpg"], "txt": s.members["txt"], "json": s.members["json"]}))
                kinds[s.key] = "good"
    def noise(seed):  # distinct images, so near-duplicate removal does not take them first
        return np.random.default_rng(seed).integers(0, 255, (96, 96, 3))

    words = " ".join(["ball", "box", "star", "heart", "ring", "arrow", "moon", "flower", "cross", "diamond"] * 100)
    bad = {
        "900000001": ("1x1 image", _jpeg(np.full((1, 1, 3), 200)), "a red ball"),
        "900000002": ("10000x20 image", _jpeg(np.tile(noise(2)[:20, :20], (1, 500, 1))), "a box and a star"),
        "900000003": ("all-black image", _jpeg(np.zeros((128, 128, 3))), "a heart on black"),
        "900000004": ("stop-words caption", _jpeg(noise(4)), "the of and a an to in it is"),
        "900000005": ("1000 candidate words", _jpeg(noise(5)), words),
        "900000006": ("corrupt JPEG", _jpeg(noise(6))[:200], "a ring"),
        "900000007": ("non-UTF-8 caption", _jpeg(noise(7)), b"\xff\xfe a ball \xc3\x28"),
    }
    for key, (kind, jpg, caption) in bad.items():
        txt = caption if isinstance(caption, bytes) else caption.encode()
        members.append((key, {"jpg": jpg, "txt": txt, "json": _meta(key, txt.decode("utf-8", "replace"), 96, 96)}))
        kinds[key] = kind
    members.append(("900000008", {"txt": b"a star without its image", "json": _meta("900000008", "x", 96, 96)}))
    kinds["900000008"] = "missing image"
    out_dir.mkdir(parents=True)
    with open(out_dir / "00000.tar", "wb") as fh, ShardWriter(fh) as w:
        for key, m in members:
            w.add(key, m)
    return kinds


def test_bad_inputs_through_ingest_pseudo_label_validate_train(synth_small, tmp_path, record_fault):
    from ovtasks.ingest.pipeline import ingest
    from ovtasks.pseudolabel.runner import pseudo_label
    from ovtasks.train.ov_maskrcnn import TrainConfig, train_ov_maskrcnn
    from ovtasks.validate.expectations import validate

    kinds = _build(synth_small[0], tmp_path / "raw")
    s = load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data"), "OVTASKS_INGEST__MIN_SIDE": "1",
                           "OVTASKS_INGEST__MAX_ASPECT_RATIO": "1000", "OVTASKS_INGEST__MAX_CAPTION_BYTES": "20000",
                           "OVTASKS_MASKFREE__ITM_MODEL": str(ROOT / "models" / "itm-synth"),
                           "OVTASKS_MASKFREE__PROPOSALS": "selective_search", "OVTASKS_MASKFREE__WSS_ITERATIONS": "10"})
    # ingest: every sample kept or quarantined with a reason
    rep = ingest(str(tmp_path / "raw"), str(tmp_path / "clean"), s, workers=1).report
    assert rep["seen"] == len(kinds) == rep["kept"] + sum(rep["quarantined"].values()), rep
    reasons = {}
    clean = open_store(tmp_path / "clean")
    for line in clean.get_bytes("quarantine/00000.jsonl").decode().splitlines():
        r = json.loads(line)
        reasons[r["key"]] = r["reason"]
    assert reasons["900000006"] in ("undecodable_image", "truncated_image")
    assert reasons["900000007"] == "caption_not_utf8" and reasons["900000008"] == "missing_image"
    reached = {k for k in kinds if k not in reasons}
    # a blank image's perceptual hash is that of every blank image (its DCT has the DC term alone), so the all-black
    # image is a near-duplicate of the blank 1x1 one kept before it; the 1x1 one takes a blank image downstream
    assert reasons["900000003"] == "near_duplicate"
    assert {"900000001", "900000002", "900000004", "900000005"} <= reached  # the model-breakers get through

    # pseudo-label: the shard completes; every image is labelled or quarantined with a reason
    pl = pseudo_label(str(tmp_path / "clean"), str(tmp_path / "out"), s).report
    (entry,) = pl["shards"]
    assert entry["status"] == "done" and pl["missing"] == []
    m = json.loads(open_store(tmp_path / "out").get_bytes("pseudo/maskfree/00000.manifest.json"))
    c = m["counts"]
    assert m["status"] == "complete" and c["images"] == len(reached) == c["labelled"] + c["quarantined"], c
    doc = json.loads(open_store(tmp_path / "out").get_bytes("pseudo/maskfree/00000.json"))
    by_key = {im["key"]: im["id"] for im in doc["images"]}
    quarantined = {q["key"]: q["reason"] for q in doc.get("quarantined", [])}
    anns = {}
    for a in doc["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    skipped = {}
    for sk in doc["skipped"]:
        skipped.setdefault(sk["image_id"], []).append(sk["reason"])
    outcome = {}
    for key in sorted(reached):
        if key in quarantined:
            outcome[key] = f"quarantined in pseudo-label: {quarantined[key][:80]}"
        elif by_key[key] in anns:
            outcome[key] = f"{len(anns[by_key[key]])} pseudo-masks"
        elif by_key[key] in skipped:
            outcome[key] = f"no mask: {sorted(set(skipped[by_key[key]]))}"
        else:
            outcome[key] = "no candidate names in the caption"
    assert outcome["900000004"] == "no candidate names in the caption"  # stop-words only
    for a in doc["annotations"]:
        assert 0 <= a["score"] <= 1 and a["area"] > 0

    # validate and train: the shard passes or is excluded with its reasons; training never crashes on it
    gate = validate(str(tmp_path / "out"), s).report
    assert gate["passed"] + gate["failed"] == 1
    if gate["passed"]:
        t = train_ov_maskrcnn(str(tmp_path / "clean"), str(tmp_path / "out"), str(tmp_path / "model"), s,
                              TrainConfig(steps=2, batch_size=2, min_size=96, max_size=128))
        assert len(t.history) == 2 and all(np.isfinite(h["loss"]) for h in t.history)
        train_note = "trained 2 steps on it"
    else:
        assert gate["excluded"]["00000"], "a failing shard must list its reasons"
        train_note = f"excluded from training: {gate['excluded']['00000']}"
    summary = "; ".join(f"{kinds[k]}: {reasons.get(k) or outcome.get(k)}" for k in sorted(kinds) if kinds[k] != "good")
    record_fault("bad inputs through the whole chain", ", ".join(v for v in kinds.values() if v != "good") + " among 8 good samples",
                 f"ingest seen {rep['seen']} = kept {rep['kept']} + quarantined {sum(rep['quarantined'].values())}; "
                 f"pseudo-label images {c['images']} = labelled {c['labelled']} + quarantined {c['quarantined']}; {summary}; "
                 f"GX {'passed' if gate['passed'] else 'failed'}; {train_note}", 0)


def test_categories_without_text_embedding_are_left_out_with_a_reason(clean_small, labelled, tmp_path, record_fault):
    import shutil

    import pytest

    from ovtasks.train.ov_maskrcnn import TrainConfig, train_ov_maskrcnn

    pl = tmp_path / "labelled"
    shutil.copytree(labelled, pl)
    emb_path = pl / "pseudo" / "maskfree" / "text_embeddings.npy"
    cats = json.loads((pl / "pseudo" / "maskfree" / "categories.json").read_text())
    emb = np.load(emb_path)
    emb[0] = np.nan  # a broken embedding
    from ovtasks.core.storage import open_store
    from ovtasks.pseudolabel.runner import write_category_embeddings

    # as finalize writes them when the encoder gave a NaN row and too few rows (a pair, so training reads them)
    write_category_embeddings(open_store(str(pl)), "maskfree", cats, emb[:-1])
    s = load_settings(env={"OVTASKS_DATA_DIR": str(tmp_path / "data")})
    t = train_ov_maskrcnn(clean_small, str(pl), str(tmp_path / "model"), s, TrainConfig(steps=2, batch_size=2, min_size=96, max_size=128))
    m = t.data_manifest
    assert m["categories_without_embedding"] == sorted([cats[0]["name"], cats[-1]["name"]])
    assert m["dropped_annotations"]["no_text_embedding"] > 0 and all(np.isfinite(h["loss"]) for h in t.history)
    write_category_embeddings(open_store(str(pl)), "maskfree", cats, np.zeros_like(emb))
    with pytest.raises(ValueError, match="no category has a text embedding"):
        train_ov_maskrcnn(clean_small, str(pl), str(tmp_path / "model2"), s, TrainConfig(steps=1, batch_size=2))
    record_fault("categories with no text embedding", "one category's embedding NaN, another's row missing from text_embeddings.npy",
                 f"training left out {m['dropped_annotations']['no_text_embedding']} annotations of {m['categories_without_embedding']} "
                 "(recorded in the data manifest) and trained on the rest; with no usable embedding at all it refused with a clear error", 0)
