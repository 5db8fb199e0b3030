import hashlib
from pathlib import Path
import json
import pytest

from ovtasks.models.hub import COMPLETE_MARKER, publish_model, resolve_model


def test_local_path_and_hub_id_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("Salesforce/blip-itm-base-coco") == "Salesforce/blip-itm-base-coco"


def test_store_model_is_cached_and_refreshed(tmp_path, monkeypatch):
    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"1234")
    uri = f"file://{tmp_path}/store/models/itm"
    publish_model(src, uri)
    local = resolve_model(uri)
    assert open(f"{local}/sub/w.bin", "rb").read() == b"1234"
    assert resolve_model(uri) == local  # cached
    (src / "sub" / "w.bin").write_bytes(b"5678")
    publish_model(src, uri)
    again = resolve_model(uri)
    assert again != local and open(f"{again}/sub/w.bin", "rb").read() == b"5678"


def test_incomplete_or_missing_store_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "store" / "half").mkdir(parents=True)
    (tmp_path / "store" / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=COMPLETE_MARKER):
        resolve_model(f"file://{tmp_path}/store/half")
    with pytest.raises(FileNotFoundError, match="no model"):
        resolve_model(f"file://{tmp_path}/store/none")


def test_model_on_real_s3(tmp_path, monkeypatch, s3_settings):
    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "wspn.pt").write_bytes(b"weights")
    uri = publish_model(tmp_path / "m", "s3://models/wspn/v1", s3_settings.s3)
    local = resolve_model(uri, s3_settings.s3)
    assert open(f"{local}/wspn.pt", "rb").read() == b"weights"


def test_image_processor_config_of_a_local_directory(tmp_path):
    import json

    from ovtasks.models.hub import image_processor_config

    assert image_processor_config(str(tmp_path)) == {}  # no processor file: the model class's defaults apply
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "size": {"longest_edge": 64}}))
    assert image_processor_config(str(tmp_path))["size"] == {"longest_edge": 64}


def test_models_upload_command_then_the_pipeline_loads_from_the_store(tmp_path, monkeypatch, capsys, seaweed, s3_settings):
    """`ovtasks models upload` puts a model directory (marker last) and an evaluation set where the compose /
    helm config points; the loader and the evaluation-set check find them; a missing set is refused with
    what to do."""
    import json

    import pytest

    from ovtasks.cli.main import main
    from ovtasks.data.groundtruth import GroundTruth

    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    model = tmp_path / "itm"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    assert main(["models", "upload", str(model), "s3://models/itm"]) == 0
    assert "uploaded 2 file(s) to s3://models/itm" in capsys.readouterr().out
    gt = tmp_path / "instances.json"
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert main(["models", "upload", str(gt), "s3://models/eval/instances.json"]) == 0
    assert main(["models", "upload", str(tmp_path / "nope"), "s3://models/x"]) == 2
    assert main(["models", "upload", str(model), str(tmp_path / "local")]) == 2  # a store URI is required
    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    local = resolve_model("s3://models/itm", s3_settings.s3)
    assert open(f"{local}/sub/weights.bin", "rb").read() == b"\x00\x01" * 100
    GroundTruth.require("s3://models/eval/instances.json", s3_settings)
    with pytest.raises(FileNotFoundError, match="OVTASKS_PIPELINE__EVAL_GT_URI"):
        GroundTruth.require("s3://models/eval/missing.json", s3_settings)


def test_single_file_models_load_from_file_and_s3_uris(tmp_path, monkeypatch, s3_settings):
    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "wspn.pt").write_bytes(b"weights")
    assert open(resolve_model(f"file://{tmp_path}/wspn.pt"), "rb").read() == b"weights"
    uri = publish_model(tmp_path / "wspn.pt", "s3://models/single/wspn.pt", s3_settings.s3)
    assert open(resolve_model(uri, s3_settings.s3), "rb").read() == b"weights"


def test_object_names_never_escape_the_model_cache(tmp_path, monkeypatch):
    import ovtasks.models.hub as hub

    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))

    class Hostile:
        uri = "s3://b/models/itm"

        def list(self):
            return ["config.json", "../../escaped/evil.py", COMPLETE_MARKER]

        def exists(self, key):
            return True

        listed = {"config.json": {"sha256": "0" * 64}, "../../escaped/evil.py": {"sha256": "0" * 64}}

        def get_bytes(self, key):
            return json.dumps(self.listed).encode()

        def get_file(self, key, dest):
            dest.write_bytes(b"x")

    monkeypatch.setattr(hub, "open_store", lambda ref, s3=None: Hostile())
    with pytest.raises(ValueError, match="outside the model cache"):  # a hostile name in the marker
        resolve_model("s3://b/models/itm")
    Hostile.listed = {"config.json": {"sha256": hashlib.sha256(b"x").hexdigest()}}  # only in the listing: never fetched
    assert Path(resolve_model("s3://b/models/itm"), "config.json").read_bytes() == b"x"
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.rglob("evil.py"))


# -- red-team round three, items 17-19


def test_an_upload_replaces_the_whole_version(tmp_path, monkeypatch):
    """v2 uploaded over v1 must not keep v1's extra file (v2 ran with v1's hires.safetensors)."""
    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for d, files in ((v1, {"config.json": b"v1", "hires.safetensors": b"v1-hires"}), (v2, {"config.json": b"v2"})):
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
    uri = (tmp_path / "store" / "sam").as_uri()
    publish_model(v1, uri)
    publish_model(v2, uri)
    assert sorted(p.name for p in (tmp_path / "store" / "sam").iterdir()) == ["MODEL_COMPLETE", "config.json"]
    got = Path(resolve_model(uri))
    assert sorted(p.name for p in got.iterdir()) == ["MODEL_COMPLETE", "config.json"] and (got / "config.json").read_bytes() == b"v2"


def _published(tmp_path, monkeypatch):
    """(source directory, URI) of a one-file model published to a file:// store, with a fresh model cache."""
    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights-1")
    uri = (tmp_path / "store" / "itm").as_uri()
    publish_model(src, uri)
    return src, uri


def test_a_cache_that_does_not_match_its_marker_is_fetched_again(tmp_path, monkeypatch):
    """A re-upload during a load left files under the old marker that fail its sha256 list; they are never reused."""
    _src, uri = _published(tmp_path, monkeypatch)
    cached = Path(resolve_model(uri))
    (cached / "model.safetensors").write_bytes(b"half-written-by-a-racing-upload")
    (cached / "stray.bin").write_bytes(b"x")
    again = Path(resolve_model(uri))
    assert (again / "model.safetensors").read_bytes() == b"weights-1" and not (again / "stray.bin").exists()


def test_a_file_replaced_while_it_is_read_is_not_cached_under_the_old_marker(tmp_path, monkeypatch):
    import ovtasks.models.hub as hub

    src, uri = _published(tmp_path, monkeypatch)
    store_file = tmp_path / "store" / "itm" / "model.safetensors"
    real_fetch, calls = hub._fetch, []

    def racing(store, files, staging):
        if not calls:  # the first read sees a file of the next upload, whose marker is not written yet
            store_file.write_bytes(b"weights-2")
        calls.append(1)
        return real_fetch(store, files, staging)

    monkeypatch.setattr(hub, "_fetch", racing)
    with pytest.raises(OSError, match="kept changing"):
        resolve_model(uri)  # the marker still lists weights-1: every try fails its sha256, nothing is cached
    assert not [p for p in (tmp_path / "cache").rglob("MODEL_COMPLETE")]
    (src / "model.safetensors").write_bytes(b"weights-2")
    publish_model(src, uri)  # the upload finishes: its marker now lists weights-2
    assert (Path(resolve_model(uri)) / "model.safetensors").read_bytes() == b"weights-2"


def test_a_single_object_model_reuploaded_to_the_same_uri_is_reloaded(tmp_path, monkeypatch, seaweed, s3_settings):
    """wspn.pt re-uploaded to the same s3:// URI: the cache is keyed on its version (size, ETag), not the URI."""
    import uuid

    monkeypatch.setenv("OVTASKS_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"s3://one-object-{uuid.uuid4().hex[:8]}/models/wspn.pt"
    for content in (b"wspn-version-1", b"wspn-version-2!"):
        f = tmp_path / "wspn.pt"
        f.write_bytes(content)
        publish_model(f, uri, s3_settings.s3)
        assert Path(resolve_model(uri, s3_settings.s3)).read_bytes() == content
