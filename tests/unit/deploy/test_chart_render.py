"""helm/ovtasks rendered by Helm's own engine (helm-python-sdk binds Helm v4's Go SDK: the same template
functions, values merge and values.schema.json check as ``helm template``), every rendered object validated
against the Kubernetes schemas (kubernetes-validate), and the settings loaded as the pods would load them:
the ConfigMap plus the service-link variables Kubernetes injects for every Service of the release.

Not reachable here: the official Airflow chart (a dependency that cannot be fetched; its Services are listed in
tests/support/chart.py from its templates) and a cluster (no kubelet, no scheduler, no image pulls)."""

from __future__ import annotations

import pytest

from tests.support.chart import config_map, effective_values, merged_values, notes, render, service_links, services

PROD = ("values-production.example.yaml",)
AWS = ("values-production.example.yaml", "values-aws.example.yaml")
K8S_VERSION = "1.33.0"


@pytest.fixture(scope="module", params=[PROD, AWS], ids=["chart-store", "aws-s3"])
def release(request):
    values = merged_values(*request.param)
    return effective_values(values), render(values)


def test_every_rendered_object_is_a_valid_kubernetes_object(release):
    import kubernetes_validate

    _, objects = release
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Deployment", "Service", "Job"}
    for o in objects:
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_settings_load_in_a_pod_with_every_service_link(release):
    """What a worker of the release sees: the ConfigMap and, since the Airflow chart's pods keep
    enableServiceLinks, a service-link variable set for every Service (OVTASKS_MLFLOW_PORT=tcp://..., ...)."""
    from ovtasks.core.config import load_settings

    _, objects = release
    links = service_links(services(objects))
    assert {"OVTASKS_MLFLOW_PORT", "OVTASKS_API_SERVER_SERVICE_HOST"} <= set(links)
    env = {**config_map(objects), **links, "OVTASKS_S3__ACCESS_KEY": "k", "OVTASKS_S3__SECRET_KEY": "s"}
    s = load_settings(env=env)
    assert s.s3.endpoint == config_map(objects)["OVTASKS_S3__ENDPOINT"]
    assert s.registry.tracking_uri == config_map(objects)["OVTASKS_REGISTRY__TRACKING_URI"]


def test_the_charts_own_pods_take_no_service_links(release):
    _, objects = release
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert pods and all(p.get("enableServiceLinks") is False for p in pods)


def test_mlflow_answers_the_name_the_workers_call_it_by(release):
    """The tracking URI in the ConfigMap names a rendered Service and its port, and MLflow's --allowed-hosts
    holds that host:port (MLflow 3.17 refuses any other Host header with 403); auth is on."""
    from urllib.parse import urlparse

    _, objects = release
    uri = urlparse(config_map(objects)["OVTASKS_REGISTRY__TRACKING_URI"])
    assert uri.port in services(objects)[uri.hostname].values()
    mlflow = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == uri.hostname)
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert uri.netloc in allowed and "localhost:5000" in allowed and "*" not in allowed
    assert "--app-name=basic-auth" in args
    env = {e["name"] for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DATABASE_URI"} <= env
    assert config_map(objects)["MLFLOW_TRACKING_USERNAME"] == "admin"


def test_the_object_store_is_the_charts_or_the_one_given(release):
    values, objects = release
    cm = config_map(objects)
    host, port = cm["OVTASKS_S3__ENDPOINT"].rsplit(":", 1)
    if values["objectStore"]["enabled"]:
        assert int(port) in services(objects)[host].values()
        store = next(o for o in objects if o["kind"] == "StatefulSet")
        image = store["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image.startswith("chrislusf/seaweedfs:4.48@sha256:") and len(image.split("@sha256:")[1]) == 64
        buckets = next(o for o in objects if o["kind"] == "Job" and o["metadata"]["name"].endswith("-buckets"))
        script = buckets["spec"]["template"]["spec"]["containers"][0]["args"][0]
        assert values["ovtasks"]["bucket"] in script and "mlflow-artifacts" in script
        assert cm["OVTASKS_S3__CREDENTIALS"] == "static"
    else:  # bring your own (AWS): no store of the chart's, TLS, region, keys from the chain
        assert not [o for o in objects if o["kind"] == "StatefulSet"]
        assert cm["OVTASKS_S3__SECURE"] == "true" and cm["OVTASKS_S3__REGION"] == "eu-west-1"
        assert cm["OVTASKS_S3__CREDENTIALS"] == "chain" and cm["OVTASKS_PIPELINE__SOURCE_URI"] == "s3://acme-laion/shards"
        mlflow_env = {e["name"] for o in objects if o["kind"] == "Deployment"
                      for e in o["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "AWS_ACCESS_KEY_ID" not in mlflow_env
    assert cm["AIRFLOW__LOGGING__REMOTE_LOGGING"] == "True"
    assert cm["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"] == f"s3://{values['ovtasks']['bucket']}/airflow-logs"


def test_airflow_login_is_fab_with_an_admin_from_a_secret(release):
    values, objects = release
    assert values["airflow"]["config"]["core"]["auth_manager"].endswith("FabAuthManager")
    assert values["airflow"]["webserver"]["defaultUser"]["enabled"] is False  # no admin/admin
    job = next(o for o in objects if o["kind"] == "Job" and o["metadata"]["name"].endswith("-airflow-setup"))
    c = job["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs["ADMIN_PASSWORD"] == {"name": values["ovtasks"]["adminSecret"], "key": "password"}
    assert "airflow users create --role Admin" in c["args"][-1] and "pools set ovtasks_gpu" in c["args"][-1]
    text = notes(merged_values(*PROD))
    assert values["ovtasks"]["adminSecret"] in text and "port-forward" in text and "Security > Users" in text


def test_helm_refuses_a_release_without_its_secrets():
    """values.schema.json, checked by Helm itself: the chart's values.yaml alone names no Secret."""
    import helm_python as helm

    with pytest.raises(helm.HelmError) as err:
        render({})
    for key in ("adminSecret", "existingSecret", "metadataSecretName", "fernetKeySecretName", "ovtasksSecret"):
        assert key in str(err.value), key
    with pytest.raises(helm.HelmError, match="s3Endpoint"):
        render(merged_values(*PROD, overrides={"objectStore": {"enabled": False}}))
