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
