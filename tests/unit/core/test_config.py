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
