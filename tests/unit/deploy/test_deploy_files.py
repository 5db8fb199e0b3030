"""What can be checked here of docker/ and helm/ without a Docker engine or helm: Dockerfiles lint clean, the
compose file matches the compose specification and is wired right, the chart's values validate against its schema."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (pip install {name}-bin)")
    return found


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "docker").glob("Dockerfile*")), ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    res = subprocess.run([_tool("hadolint"), "--config", str(ROOT / "docker" / ".hadolint.yaml"), str(dockerfile)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_installs_pinned_set():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "-c constraints.txt" in text and "USER 50000" in text


def test_every_image_is_pinned_by_digest_and_the_gpu_image_runs_the_tested_torch():
    """Base images and compose's service images name a sha256 digest; the GPU worker is the Airflow image built
    with PyPI's CUDA wheels of the very torch/torchvision constraints.txt pins (no base image's own torch)."""
    import re

    for f in sorted((ROOT / "docker").glob("Dockerfile*")):
        for base in re.findall(r"^FROM\s+(\S+)", f.read_text(), re.M):
            assert re.search(r"@sha256:[a-f0-9]{64}$", base), (f.name, base)
    for name, svc in _compose()["services"].items():
        if "image" in svc and "build" not in svc:
            assert re.search(r"@sha256:[a-f0-9]{64}$", svc["image"]), (name, svc["image"])
    gpu = _compose()["services"]["worker-gpu"]["build"]
    assert gpu["dockerfile"] == "docker/Dockerfile.airflow" and gpu["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    airflow = (ROOT / "docker" / "Dockerfile.airflow").read_text()
    assert "-c constraints.txt torch torchvision" in airflow and "grep -v" not in airflow
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    readme = (ROOT / "docker" / "README.md").read_text()
    for f in sorted((ROOT / "docker").glob("Dockerfile*")):
        assert f.name in readme, f"docker/README.md does not say what {f.name} holds"


def test_the_entrypoint_runs_commands_as_the_official_image_does(tmp_path):
    """The official chart's pods pass `bash -c ...`, `airflow ...` and bare subcommands to /entrypoint."""
    import os

    fake = tmp_path / "airflow"
    fake.write_text("#!/bin/sh\necho airflow \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def run(*args):
        return subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), *args], env=env, capture_output=True,
                               text=True, check=True).stdout.strip()

    assert run("celery", "worker", "--queues", "gpu") == "airflow celery worker --queues gpu"
    assert run("airflow", "db", "check-migrations") == "airflow db check-migrations"
    assert run("bash", "-c", "echo plain") == "plain"


# ---------------------------------------------------------------------------------------------
# docker compose


COMPOSE = ROOT / "docker" / "compose.yaml"


def _compose() -> dict:
    import yaml

    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_specification():
    res = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_services_queues_and_wiring():
    from ovtasks.orchestration.dag_defaults import GPU_POOL, GPU_QUEUE

    c = _compose()
    s = c["services"]
    assert set(s) >= {"postgres", "redis", "seaweedfs", "store-init", "mlflow", "airflow-init", "airflow-apiserver", "airflow-scheduler",
                      "airflow-dag-processor", "airflow-triggerer", "worker-cpu", "worker-gpu"}
    assert s["worker-cpu"]["command"][-1] == "default" and s["worker-gpu"]["command"][3] == GPU_QUEUE
    dev = s["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert GPU_POOL in " ".join(s["airflow-init"]["command"])
    for name, svc in s.items():
        if name not in ("store-init", "airflow-init"):
            assert "healthcheck" in svc, f"{name} has no health check"
    env = s["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert "@postgres:5432/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["OVTASKS_S3__ENDPOINT"] == "seaweedfs:8333" and env["OVTASKS_REGISTRY__TRACKING_URI"] == "http://mlflow:5000"
    assert s["worker-gpu"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] == env["AIRFLOW__CELERY__BROKER_URL"]
    assert "@postgres:5432/mlflow" in s["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    # MLflow answers the service name the workers use, logs in, and publishes only on the host's loopback
    cmd = s["mlflow"]["command"]
    allowed = next(a for a in cmd if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow:5000" in allowed and "--app-name=basic-auth" in cmd and "*" not in allowed
    assert env["MLFLOW_TRACKING_USERNAME"] == "admin" and env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    for name in ("mlflow", "seaweedfs", "airflow-apiserver"):
        assert all(str(p).startswith("127.0.0.1:") for p in s[name]["ports"]), (name, s[name]["ports"])
    assert "8333" in s["seaweedfs"]["ports"][0]  # the S3 API, for `ovtasks models upload` and shards from the host
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("FabAuthManager") and "SIMPLE_AUTH" not in str(env)
    assert env["AIRFLOW__LOGGING__REMOTE_LOGGING"] == "True" and env["AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID"] == "ovtasks_s3"
    # every ovtasks setting the compose file sets is a real setting
    from ovtasks.core.config import load_settings

    ovt = {k: v for k, v in env.items() if k.startswith("OVTASKS_") and "${" not in str(v)}
    load_settings(env=ovt)


def test_compose_refuses_to_start_without_secrets_and_the_example_names_them_all():
    import re

    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert {"POSTGRES_PASSWORD", "S3_SECRET_KEY", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "MLFLOW_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD"} <= required
    example = (ROOT / "docker" / ".env.example").read_text()
    named = set(re.findall(r"^([A-Z0-9_]+)=", example, re.M))
    assert required <= named
    # no password literal anywhere: every password-ish value is a ${VAR:?...} reference
    for line in text.splitlines():
        if re.search(r"(PASSWORD|SECRET|FERNET)[A-Z_]*:\s", line) and not re.search(r"_FILE:\s", line) and "${" not in line and "$$" not in line:
            pytest.fail(f"literal secret in compose: {line.strip()}")
    assert not (ROOT / "docker" / ".env").exists()


# ---------------------------------------------------------------------------------------------
# helm


CHART = ROOT / "helm" / "ovtasks"


def _values(*files):
    import yaml

    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out

    out = {}
    for f in files:
        out = merge(out, yaml.safe_load((CHART / f).read_text()))
    return out


def _errors(values):
    import json

    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(values)]


def test_helm_values_need_existing_secrets():
    errors = _errors(_values("values.yaml"))
    for path in ("mlflow/existingSecret", "objectStore/existingSecret", "ovtasks/adminSecret", "airflow/data/metadataSecretName",
                 "airflow/fernetKeySecretName", "airflow/jwtSecretName", "airflow/ovtasksSecret", "airflow/redis/passwordSecretName"):
        assert any(e.startswith(path + ":") for e in errors), (path, errors)


def test_helm_production_example_validates_and_has_a_gpu_worker_set():
    v = _values("values.yaml", "values-production.example.yaml")
    assert _errors(v) == []
    sets = {s["name"]: s for s in v["airflow"]["workers"]["celery"]["sets"]}
    gpu = sets["gpu"]
    assert gpu["queue"] == "gpu" and gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["keda"]["enabled"]
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu" and sets["default"]["queue"] == "default"
    # a gpu set without GPU limits is rejected
    bad = _values("values.yaml", "values-production.example.yaml")
    bad["airflow"]["workers"]["celery"]["sets"][1]["resources"] = {"limits": {"memory": "1Gi"}}
    assert any("nvidia.com/gpu" in e for e in _errors(bad))


def test_helm_chart_files():
    import yaml

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    deps = {d["name"]: d for d in chart["dependencies"]}
    assert deps["airflow"]["repository"] == "https://airflow.apache.org" and set(deps) == {"airflow"}
    for f in CHART.glob("*.yaml"):
        yaml.safe_load(f.read_text())  # plain YAML files lint
    mlflow = (CHART / "templates" / "mlflow.yaml").read_text()
    assert 'include "ovtasks.requiredSecret"' in mlflow and "secretKeyRef" in mlflow
    # a password is only ever named (an env variable, a Secret's key), never given
    for line in mlflow.lower().splitlines():
        if "password" in line:
            assert "secretkeyref" in line or line.strip().startswith("- name:"), line
    assert "required" in (CHART / "templates" / "_helpers.tpl").read_text()


def test_helm_templates_only_read_values_that_exist():
    import re

    values = _values("values.yaml")
    refs = set()
    for tpl in (CHART / "templates").iterdir():
        refs |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", tpl.read_text()))
    assert refs, "the templates read no values?"
    for ref in sorted(refs):
        node = values
        for part in ref.split("."):
            assert isinstance(node, dict) and part in node, f"templates read .Values.{ref}, missing from values.yaml"
            node = node[part]


# ---------------------------------------------------------------------------------------------
# the weekly loop's configuration: models, evaluation set, pool, worker sets

PIPELINE_KEYS = {"OVTASKS_MASKFREE__ITM_MODEL", "OVTASKS_MASKFREE__WSPN_MODEL", "OVTASKS_GROUNDED__GDINO_MODEL",
                 "OVTASKS_GROUNDED__SAM_MODEL", "OVTASKS_PIPELINE__EVAL_GT_URI", "OVTASKS_PIPELINE__SOURCE_URI",
                 "OVTASKS_PIPELINE__CLEAN_URI", "OVTASKS_PIPELINE__PSEUDO_URI", "OVTASKS_S3__ENDPOINT",
                 "OVTASKS_REGISTRY__TRACKING_URI", "OVTASKS_PIPELINE__MODELS_URI"}


def test_compose_sets_every_model_and_the_evaluation_set_in_the_store():
    from ovtasks.core.config import load_settings

    for svc in ("airflow-scheduler", "worker-cpu", "worker-gpu"):
        env = _compose()["services"][svc]["environment"]
        assert PIPELINE_KEYS <= set(env), (svc, PIPELINE_KEYS - set(env))
    env = {k: str(v).replace("${OVTASKS_BUCKET:-ovtasks}", "ovtasks") for k, v in env.items() if k.startswith("OVTASKS_")}
    s = load_settings(env={k: v for k, v in env.items() if "${" not in v})
    assert s.maskfree.itm_model == "s3://ovtasks/models/itm" and s.maskfree.wspn_model == "s3://ovtasks/models/wspn"
    assert s.grounded.gdino_model.startswith("s3://ovtasks/") and s.grounded.sam_model.startswith("s3://ovtasks/")
    assert s.pipeline.eval_gt_uri == "s3://ovtasks/eval/instances.json" and s.device == "cuda"
    assert s.pipeline.models_uri == "s3://ovtasks/runs"  # checkpoints and models in the store, not on a worker


def test_helm_config_map_sets_what_compose_sets_and_only_real_settings():
    import re

    import yaml

    tpl = (CHART / "templates" / "ovtasks-env.yaml").read_text()
    keys = set(re.findall(r"^  ([A-Z0-9_]+):", tpl, re.M))
    assert PIPELINE_KEYS <= keys, PIPELINE_KEYS - keys
    # (the rendered ConfigMap loads as settings: tests/unit/deploy/test_chart_render.py)
    values = _values("values.yaml")
    # the Airflow chart reads the ConfigMap and the credentials Secret; no hard-coded store location is left in its env
    assert "{{ .Release.Name }}-ovtasks-env" in values["airflow"]["extraEnvFrom"] and "ovtasksSecret" in values["airflow"]["extraEnvFrom"]
    assert "s3://" not in yaml.safe_dump(values["airflow"])
    assert "name: {{ .Release.Name }}-ovtasks-env" in tpl


def test_every_ovtasks_value_is_read_by_a_template():
    """The schema's ovtasks keys are wired (the ConfigMap and the pool Job), not decoration."""
    import re

    text = "".join(t.read_text() for t in (CHART / "templates").iterdir())
    ovt = _values("values.yaml")["ovtasks"]
    leaves = [k for k, v in ovt.items() if not isinstance(v, dict)] + list(ovt["models"])
    for key in leaves:
        assert re.search(rf"\.{key}\b", text), f"no template reads ovtasks.{key}"
    job = (CHART / "templates" / "airflow-setup-job.yaml").read_text()
    assert "pools set ovtasks_gpu {{ .Values.ovtasks.gpuPoolSlots }}" in job and "post-install" in job


def _plan_values():
    from ovtasks.orchestration.capacity import Plan, helm_values

    p = Plan(10_000_000, 72.0, 0.7, 30.0, 3, 40.0, 1000, 4, 250, 20, 10, 500.0, 600.0, 5.0, ())
    return helm_values(p)


@pytest.mark.parametrize("overrides", ["values-production.example.yaml", "plan"])
def test_worker_sets_survive_helm_list_replacement(overrides, tmp_path):
    """Helm replaces lists: each override of the worker sets must still give the gpu set its image and
    OVTASKS_DEVICE=cuda (the schema refuses one that does not)."""
    import yaml

    if overrides == "plan":  # `ovtasks plan --values-out` is applied after the production example
        v = _values("values.yaml", "values-production.example.yaml")
        plan = yaml.safe_load(yaml.safe_dump(_plan_values()))  # through YAML, as helm reads the file
        v["ovtasks"]["gpuPoolSlots"] = plan["ovtasks"]["gpuPoolSlots"]
        v["airflow"]["workers"]["celery"]["sets"] = plan["airflow"]["workers"]["celery"]["sets"]  # replaced whole, as helm does
    else:
        v = _values("values.yaml", overrides)
    assert _errors(v) == []
    gpu = {s["name"]: s for s in v["airflow"]["workers"]["celery"]["sets"]}["gpu"]
    assert gpu["image"] == _values("values.yaml")["airflow"]["workers"]["celery"]["sets"][1]["image"]
    assert {"name": "OVTASKS_DEVICE", "value": "cuda"} in gpu["env"]


def test_schema_refuses_a_partial_gpu_set():
    v = _values("values.yaml", "values-production.example.yaml")
    gpu = v["airflow"]["workers"]["celery"]["sets"][1]
    del gpu["image"]
    gpu["env"] = [{"name": "OTHER", "value": "x"}]
    errors = _errors(v)
    assert any("'image' is a required property" in e for e in errors), errors
    assert any(e.startswith("airflow/workers/celery/sets/1/env") for e in errors), errors


def test_compose_interpolation_refuses_missing_secrets_and_applies_defaults():
    """tests/support/deploy_env.py reads compose as `docker compose` does (the weekly-loop test runs its environment)."""
    from tests.support.deploy_env import compose_services, interpolate, service_env

    assert interpolate("a-${X:-d}-${Y-e}-$$Z-${W}", {"X": "", "Y": ""}) == "a-d--$Z-"
    with pytest.raises(KeyError, match="set POSTGRES_PASSWORD in docker/.env"):
        compose_services({})
    keys = ("AIRFLOW_FERNET_KEY", "POSTGRES_PASSWORD", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_ADMIN_PASSWORD",
            "S3_ACCESS_KEY", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY")
    env = service_env(compose_services({k: "v" for k in keys}), "worker-cpu")
    assert env["OVTASKS_PIPELINE__CLEAN_URI"] == "s3://ovtasks/clean" and env["OVDAGS_ALERT_EMAILS"] == ""
