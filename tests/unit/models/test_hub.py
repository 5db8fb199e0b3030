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

        def get_bytes(self, key):
            return b"{}"

        def get_file(self, key, dest):
            dest.write_bytes(b"x")

    monkeypatch.setattr(hub, "open_store", lambda ref, s3=None: Hostile())
    with pytest.raises(ValueError, match="outside the model cache"):
        resolve_model("s3://b/models/itm")
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.rglob("evil.py"))
