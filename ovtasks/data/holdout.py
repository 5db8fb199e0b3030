"""The held-out evaluation images: the first N clean images that have GT, left out of every training."""

from __future__ import annotations

import hashlib
import json

from ovtasks.core.config import Settings
from ovtasks.core.storage import open_store
from ovtasks.data.clean import complete_shards, iter_shard


def eval_image_ids(gt_uri: str, clean_uri: str, settings: Settings, limit: int | None = None) -> list[int]:
    """The clean images that have GT, in shard order, the first ``limit`` of them: what :func:`ovtasks.evaluate.models.evaluate_model`
    scores, and what GT-trained models (the oracle, the base fine-tune) must never train on."""
    from ovtasks.data.groundtruth import GroundTruth

    have = set(GroundTruth.load(gt_uri, settings).images)
    src, ids = open_store(clean_uri, settings.s3), []
    for shard in complete_shards(src):
        for s in iter_shard(src, shard):
            if s.image_id in have:
                ids.append(s.image_id)
            if limit and len(ids) >= limit:
                return ids
    return ids


def held_out_record(ids) -> dict:
    """What a training run recorded of the images it never trained on (the evaluation split)."""
    ids = sorted(int(i) for i in ids)
    return {"images": len(ids), "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}
