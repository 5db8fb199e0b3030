import pytest

from ovtasks.core.config import ConfigError, load_settings


def test_defaults_are_embedded_and_credential_free():
    s = load_settings(env={})
    assert str(s.data_dir) == "data"
    assert s.s3.endpoint == "" and s.s3.access_key is None and s.s3.secret_key is None
    assert s.ingest.require_english and s.ingest.punsafe_max == 0.5


def test_yaml_then_env_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: 3\ningest:\n  punsafe_max: 0.2\n  min_side: 10\n")
    s = load_settings(cfg, env={"OVTASKS_INGEST__MIN_SIDE": "32", "OVTASKS_INGEST__PUNSAFE_MAX": "null"})
    assert s.workers == 3
    assert s.ingest.min_side == 32  # env wins over YAML
    assert s.ingest.punsafe_max is None  # YAML scalar parsing: null disables the filter


def test_config_file_from_env_and_secret_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("s3:\n  endpoint: minio:9000\n")
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    s = load_settings(env={"OVTASKS_CONFIG": str(cfg), "OVTASKS_S3__ACCESS_KEY": "ak", "OVTASKS_S3__SECRET_KEY_FILE": str(secret)})
    assert s.s3.endpoint == "minio:9000"
    assert s.s3.secret_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in s.model_dump_json()


@pytest.mark.parametrize("env, needle", [
    ({"OVTASKS_INGEST__MIN_SIDE": "-4"}, "ingest.min_side"),
    ({"OVTASKS_INGEST__NOT_A_FIELD": "1"}, "ingest.not_a_field"),
    ({"OVTASKS_S3__ENDPOINT": "http://x:9000"}, "without scheme"),
    ({"OVTASKS_WORKERS": "many"}, "workers"),
])
def test_invalid_values_name_the_key(env, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(env=env)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(p, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", env={})


def test_fingerprint_changes_with_section():
    a = load_settings(env={})
    b = load_settings(env={"OVTASKS_INGEST__MIN_SIDE": "100"})
    assert a.fingerprint("ingest") != b.fingerprint("ingest")
    assert a.fingerprint("synth") == b.fingerprint("synth")


@pytest.mark.parametrize("secret", ["hunter2 #prod", "12345678", "0755", "yes", "~", "null", "[a, b]", "p@ss: word"])
def test_secrets_are_taken_verbatim_from_env_and_files(tmp_path, secret):
    from ovtasks.core.config import load_settings

    f = tmp_path / "secret"
    f.write_text(secret + "\n")
    s = load_settings(env={"OVTASKS_S3__SECRET_KEY": secret, "OVTASKS_S3__ACCESS_KEY_FILE": str(f)})
    assert s.s3.secret_key.get_secret_value() == secret and s.s3.access_key.get_secret_value() == secret
    assert load_settings(env={"OVTASKS_DEVICE": "cuda:1", "OVTASKS_MASKFREE__WSS_ITERATIONS": "40"}).maskfree.wss_iterations == 40


def test_a_yaml_error_never_echoes_the_line(tmp_path):
    from ovtasks.core.config import ConfigError, load_settings

    p = tmp_path / "c.yaml"
    p.write_text("s3:\n  secret_key: hunter2: the-secret\n")  # the error is on the secret's line
    with pytest.raises(ConfigError) as err:
        load_settings(p, env={})
    assert "hunter2" not in str(err.value) and "line" in str(err.value)


def test_model_cache_variable_is_not_a_settings_key(tmp_path):
    from ovtasks.core.config import load_settings

    load_settings(env={"OVTASKS_MODEL_CACHE": str(tmp_path), "OVTASKS_TRACEBACK": "1"})  # read by the loader / the CLI


# What Kubernetes injects into every pod for each Service of the namespace (enableServiceLinks), for the
# chart's documented release name `ovtasks`: the MinIO/SeaweedFS, MLflow and Airflow Services.
SERVICE_LINKS = {
    "OVTASKS_MINIO_PORT": "tcp://10.0.0.1:9000", "OVTASKS_MINIO_SERVICE_HOST": "10.0.0.1",
    "OVTASKS_MINIO_SERVICE_PORT": "9000", "OVTASKS_MINIO_SERVICE_PORT_HTTP_MINIO": "9000",
    "OVTASKS_MINIO_PORT_9000_TCP": "tcp://10.0.0.1:9000", "OVTASKS_MINIO_PORT_9000_TCP_PROTO": "tcp",
    "OVTASKS_MINIO_PORT_9000_TCP_PORT": "9000", "OVTASKS_MINIO_PORT_9000_TCP_ADDR": "10.0.0.1",
    "OVTASKS_MLFLOW_SERVICE_HOST": "10.0.0.2", "OVTASKS_MLFLOW_PORT_5000_TCP": "tcp://10.0.0.2:5000",
    "OVTASKS_SERVICE_HOST": "10.0.0.3", "OVTASKS_PORT": "tcp://10.0.0.3:80", "OVTASKS_PORT_80_TCP_ADDR": "10.0.0.3",
    "OVTASKS_API_SERVER_PORT_8080_TCP_PROTO": "tcp", "OVTASKS_S3_SERVICE_PORT_S3": "8333",
}


def test_service_link_variables_are_not_settings():
    """A pod's service links (and other OVTASKS_* names with no known section, e.g. an exported OVTASKS_BIN)
    are ignored; the settings beside them still apply."""
    s = load_settings(env={**SERVICE_LINKS, "OVTASKS_BIN": "/usr/local/bin", "OVTASKS_S3__ENDPOINT": "ovtasks-s3:8333",
                           "OVTASKS_DEVICE": "cuda"})
    assert s.s3.endpoint == "ovtasks-s3:8333" and s.device == "cuda"
    assert load_settings(env=SERVICE_LINKS) == load_settings(env={})


def test_ignored_variables_are_named_once_at_debug_level_without_values(caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="ovtasks.core.config"):
        load_settings(env={"OVTASKS_MINIO_PORT": "tcp://10.0.0.1:9000", "OVTASKS_TOKEN_ISH": "s3cr3t-value"})
    records = [r for r in caplog.records if r.name == "ovtasks.core.config"]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG
    assert "OVTASKS_MINIO_PORT" in records[0].getMessage() and "s3cr3t" not in records[0].getMessage()


@pytest.mark.parametrize("key", ["OVTASKS_S3__ENDPIONT", "OVTASKS_MASKFREE__WSS_ITERATONS", "OVTASKS_REGISTRY__PORT",
                                 "OVTASKS_S3__PORT_9000_TCP"])
def test_a_typo_inside_a_known_section_is_still_an_error(key):
    with pytest.raises(ConfigError, match="Extra inputs"):
        load_settings(env={key: "1"})


def test_a_secret_file_variable_outside_the_settings_is_not_read(tmp_path):
    """``*_FILE`` is read only for a setting: a service-link-shaped or unknown name never opens a file."""
    s = load_settings(env={"OVTASKS_UNKNOWN_FILE": str(tmp_path / "missing")})
    assert s == load_settings(env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env={"OVTASKS_S3__SECRET_KEY_FILE": str(tmp_path / "missing")})
