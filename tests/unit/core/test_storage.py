"""Both store backends through one interface; the S3 one against a real SeaweedFS server."""

import os
import uuid

import pytest

from ovtasks.core.storage import LocalStore, S3Store, StoreError, StoreKeyError, check_key, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    settings = request.getfixturevalue("s3_settings")
    return open_store(f"s3://bkt-{uuid.uuid4().hex[:8]}/some/prefix", settings.s3)


def test_bytes_roundtrip_list_exists_delete(store):
    store.put_bytes("a/b/c.txt", b"hello")
    store.put_bytes("a/d.bin", bytes(range(256)))
    store.put_bytes("z.txt", b"")
    assert store.get_bytes("a/b/c.txt") == b"hello"
    assert store.get_bytes("a/d.bin") == bytes(range(256))
    assert store.list() == ["a/b/c.txt", "a/d.bin", "z.txt"]
    assert store.list("a") == ["a/b/c.txt", "a/d.bin"]
    assert store.list("a/b") == ["a/b/c.txt"]
    assert store.list("nothing") == []
    assert store.exists("a/d.bin") and not store.exists("a/nope")
    store.delete("a/d.bin")
    store.delete("a/d.bin")  # deleting a missing object is fine
    assert not store.exists("a/d.bin")
    with pytest.raises(StoreError, match="no object"):
        store.get_bytes("a/d.bin")


def test_overwrite_is_idempotent(store):
    store.put_bytes("k", b"one")
    store.put_bytes("k", b"two")
    assert store.get_bytes("k") == b"two"
    assert store.list() == ["k"]


def test_files_and_streaming(store, tmp_path):
    src = tmp_path / "big.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)
    store.put_file("files/big.bin", src)
    dst = tmp_path / "out" / "copy.bin"
    store.get_file("files/big.bin", dst)
    assert dst.read_bytes() == payload
    with store.open_read("files/big.bin") as fh:
        first = fh.read(1000)
        rest = b"".join(iter(lambda: fh.read(65536), b""))
    assert first + rest == payload


def test_put_file_move_consumes_source(store, tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(b"moved")
    store.put_file("m.bin", src, move=True)
    assert store.get_bytes("m.bin") == b"moved"
    assert not src.exists()


def test_writer_publishes_only_on_success(store):
    with store.writer("w/ok.txt") as fh:
        fh.write(b"complete")
    assert store.get_bytes("w/ok.txt") == b"complete"
    with pytest.raises(RuntimeError):
        with store.writer("w/broken.txt") as fh:
            fh.write(b"half")
            assert not store.exists("w/broken.txt")  # nothing visible while writing
            raise RuntimeError("killed mid-write")
    assert not store.exists("w/broken.txt")
    assert store.list("w") == ["w/ok.txt"]


def test_child_store(store):
    child = store.child("sub/dir")
    child.put_bytes("x.txt", b"x")
    assert store.get_bytes("sub/dir/x.txt") == b"x"
    assert child.list() == ["x.txt"]
    assert child.uri.endswith("sub/dir")


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs", "a/../../b", "a\\b", "a\x00b", "", ".", "a/./b"])
def test_keys_cannot_escape(store, bad):
    with pytest.raises(StoreKeyError):
        store.put_bytes(bad, b"x")


def test_check_key_normalises_slashes():
    assert check_key("a//b/") == "a/b"


def test_local_symlink_escape_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalStore(root)
    with pytest.raises(StoreKeyError, match="outside"):
        store.get_bytes("link/secret")
    assert store.list() == []


def test_local_atomic_publish_leaves_no_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    for i in range(5):
        store.put_bytes("x", str(i).encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_uri_parsing(tmp_path, s3_settings):
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = open_store("s3://bucket/a/b", s3_settings.s3)
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket/a/b"
    with pytest.raises(StoreError, match="unsupported URI scheme"):
        open_store("gs://bucket/x")


def test_s3_requires_endpoint_and_credentials():
    from ovtasks.core.config import S3Config

    with pytest.raises(StoreError, match="endpoint"):
        open_store("s3://b/p", S3Config())
    with pytest.raises(StoreError, match="credentials"):
        open_store("s3://b/p", S3Config(endpoint="127.0.0.1:1"))


def test_many_fresh_buckets(s3_settings):
    """Each test makes its own bucket; the server must keep accepting new ones (regression: after
    about seven buckets SeaweedFS ran out of volume slots and answered HTTP 500)."""
    for i in range(12):
        store = open_store(f"s3://many-{uuid.uuid4().hex[:8]}/p", s3_settings.s3)
        store.put_bytes("k", str(i).encode())
        assert store.get_bytes("k") == str(i).encode()


def test_s3_credentials_from_the_standard_chain(seaweed, monkeypatch, tmp_path):
    """``s3.credentials=chain`` with no static keys: the AWS environment variables are the first link of the
    chain (web identity, container and instance-profile credentials come after them and need a cloud, so they
    are not reached here); a real S3 server accepts the signed requests."""
    from ovtasks.core.config import load_settings

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws of the machine's
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    s = load_settings(env={"OVTASKS_S3__ENDPOINT": seaweed.endpoint, "OVTASKS_S3__CREDENTIALS": "chain"})
    assert s.s3.access_key is None
    store = open_store(f"s3://chain-{uuid.uuid4().hex[:8]}/p", s.s3)
    store.put_bytes("k", b"from the chain")
    assert store.get_bytes("k") == b"from the chain"
    # static keys, when given, win over the chain: wrong static keys are refused even with good AWS_* variables
    wrong = load_settings(env={"OVTASKS_S3__ENDPOINT": seaweed.endpoint, "OVTASKS_S3__CREDENTIALS": "chain",
                               "OVTASKS_S3__ACCESS_KEY": "nobody", "OVTASKS_S3__SECRET_KEY": "wrong-secret-key"})
    with pytest.raises(Exception, match="(?i)access|denied|invalid|forbidden|signature"):
        open_store(store.uri, wrong.s3).get_bytes("k")
