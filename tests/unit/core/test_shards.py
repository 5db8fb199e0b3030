"""The hand-written tar codec agrees with the standard library: ``tarfile`` reads back exactly what
``ShardWriter`` wrote (PAX long names included), and ``iter_tar_samples`` reads what ``tarfile`` wrote."""

from __future__ import annotations

import io
import tarfile

import pytest

from ovtasks.core.shards import ShardWriter, iter_tar_samples

KEYS = [
    "000000001",                                   # plain
    "k" * 96,                                      # key.ext exactly 100 bytes with "jpg"
    "k" * 97,                                      # 101 bytes: PAX path record
    "sub/" + "é" * 120,                            # multi-byte UTF-8, 245 bytes: PAX, cut inside a character in ustar
    "x" * 600,                                     # a PAX record whose length needs three digits
]


def _written(samples: dict[str, dict[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with ShardWriter(buf) as w:
        for key, members in samples.items():
            w.add(key, members)
    return buf.getvalue()


def _samples() -> dict[str, dict[str, bytes]]:
    return {key: {"jpg": bytes([i]) * (511 + i), "txt": f"caption {i}".encode(), "json": b"{}"} for i, key in enumerate(KEYS)}


def test_tarfile_reads_back_what_shardwriter_writes():
    samples = _samples()
    blob = _written(samples)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        assert all(m.isfile() for m in tf.getmembers())
    want = {f"{k}.{ext}": data for k, members in samples.items() for ext, data in members.items()}
    assert got == want
    assert list(got) == list(want)  # in the order written


def test_shardwriter_resume_continues_a_tar_in_place(tmp_path):
    """``ShardWriter.resume`` over a longer file: the first members stay, what follows is overwritten and cut, and
    bytes and checksum equal a fresh write of the same members (what publishing a shard with drops relies on)."""
    import hashlib

    members = [(f"{i:09d}", {"jpg": bytes([i]) * (300 + 700 * i), "txt": b"caption %d" % i}) for i in range(5)]
    path = tmp_path / "staged.tar"
    with open(path, "wb") as fh, ShardWriter(fh) as w:
        ends = []
        for key, m in members:
            w.add(key, m)
            ends.append(w.bytes)
    keep = [members[0], members[1], members[3]]
    with open(path, "r+b") as fh:
        w = ShardWriter.resume(fh, ends[1])
        w.add(*members[3])
        w.close()
        w.truncate()
    fresh = io.BytesIO()
    with ShardWriter(fresh) as f:
        for key, m in keep:
            f.add(key, m)
    assert path.read_bytes() == fresh.getvalue()
    assert w.sha.hexdigest() == hashlib.sha256(fresh.getvalue()).hexdigest() and w.bytes == len(fresh.getvalue())
    with open(path, "r+b") as fh, pytest.raises(OSError, match="before the"):
        ShardWriter.resume(fh, len(fresh.getvalue()) + 512)


def test_shardwriter_is_byte_identical_for_equal_input():
    assert _written(_samples()) == _written(_samples())


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_iter_tar_samples_reads_what_tarfile_writes(fmt):
    samples = {k: v for k, v in _samples().items() if fmt != tarfile.USTAR_FORMAT or len(k.encode()) <= 90}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    got = {raw.key: dict(raw.members) for raw in iter_tar_samples(buf, {}, default_limit=1 << 20)}
    assert got == samples
