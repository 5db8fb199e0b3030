"""What can be checked here of docker/ and helm/ without a Docker engine or helm: Dockerfiles lint clean, the
compose file matches the compose specification and is wired right, the chart's values validate against its schema."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    from ovtasks.airflow_support import GPU_POOL, GPU_QUEUE

    c = _compose()
    s = c["services"]
    assert set(s) >= {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver", "airflow-scheduler",
                      "airflow-dag-processor", "airflow-triggerer", "worker-cpu", "worker-gpu"}
    assert s["worker-cpu"]["command"][-1] == "default" and s["worker-gpu"]["command"][3] == GPU_QUEUE
    dev = s["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert GPU_POOL in " ".join(s["airflow-init"]["command"])
    for name, svc in s.items():
        if name not in ("minio-init", "airflow-init"):
            assert "healthcheck" in svc, f"{name} has no health check"
    env = s["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert "@postgres:5432/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["OVTASKS_S3__ENDPOINT"] == "minio:9000" and env["OVTASKS_REGISTRY__TRACKING_URI"] == "http://mlflow:5000"
    assert s["worker-gpu"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] == env["AIRFLOW__CELERY__BROKER_URL"]
    assert "@postgres:5432/mlflow" in " ".join(s["mlflow"]["command"])
    # every ovtasks setting the compose file sets is a real setting
    from ovtasks.config import load_settings

    ovt = {k: v for k, v in env.items() if k.startswith("OVTASKS_") and "${" not in str(v)}
    load_settings(env=ovt)


def test_compose_refuses_to_start_without_secrets_and_the_example_names_them_all():
    import re

    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET"} <= required
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
    for path in ("ovtasks/existingSecret", "mlflow/existingSecret", "minio/existingSecret", "airflow/data/metadataSecretName",
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
    assert deps["airflow"]["repository"] == "https://airflow.apache.org" and "minio" in deps
    for f in CHART.glob("*.yaml"):
        yaml.safe_load(f.read_text())  # plain YAML files lint
    mlflow = (CHART / "templates" / "mlflow.yaml").read_text()
    assert 'include "ovtasks.requiredSecret"' in mlflow and "secretKeyRef" in mlflow and "password" not in mlflow.lower()
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
