"""helm/ovtasks rendered by Helm's own engine (Helm v4's Go SDK through ``helm-python-sdk``; no helm binary
here), and what Kubernetes would give the pods of such a release: the service-link variables of every Service.

The chart's dependency (the official Airflow chart) cannot be fetched here, so only this chart's own templates
render; the Services the Airflow chart adds are listed in :data:`AIRFLOW_CHART_SERVICES` from its templates
(read from the public repository, not vendored)."""

from __future__ import annotations

import re

import yaml

from tests.support import ROOT

CHART = ROOT / "helm" / "ovtasks"

# The Services the official Airflow chart (1.19, CeleryExecutor, Redis on) creates for a release, as
# `<release>-<suffix>`: name -> {port name: port}.
AIRFLOW_CHART_SERVICES = {
    "api-server": {"api-server": 8080}, "redis": {"redis-db": 6379}, "statsd": {"statsd-ingest": 9125, "statsd-scrape": 9102},
    "worker": {"worker-logs": 8793}, "triggerer": {"triggerer-logs": 8794},
}


def merged_values(*files: str, overrides: dict | None = None) -> dict:
    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out

    out: dict = {}
    for f in files:
        out = merge(out, yaml.safe_load((CHART / f).read_text()))
    return merge(out, overrides or {})


def render(values: dict, release: str = "ovtasks", namespace: str = "ml") -> list[dict]:
    """Every object the chart's templates render for ``values`` (user values: Helm merges the chart's
    values.yaml under them and checks values.schema.json), hooks included."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=release, namespace=namespace)
    objects = []
    for name, text in sorted(manifests.items()):
        if name.endswith(".txt"):
            continue
        objects += [d for d in yaml.safe_load_all(text) if d]
    return objects


def effective_values(values: dict) -> dict:
    """The values an install with ``values`` really uses (the chart's values.yaml under them, as Helm merges)."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        return chart.merge_values(values)


def notes(values: dict, release: str = "ovtasks", namespace: str = "ml") -> str:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=release, namespace=namespace)["ovtasks/templates/NOTES.txt"]


def config_map(objects: list[dict], release: str = "ovtasks") -> dict[str, str]:
    return next(o["data"] for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{release}-ovtasks-env")


def services(objects: list[dict], release: str = "ovtasks") -> dict[str, dict[str, int]]:
    """Service name -> {port name: port}: the rendered ones and the Airflow chart's."""
    out = {o["metadata"]["name"]: {p.get("name", ""): p["port"] for p in o["spec"]["ports"]} for o in objects if o["kind"] == "Service"}
    out.update({f"{release}-{n}": ports for n, ports in AIRFLOW_CHART_SERVICES.items()})
    return out


def service_links(svcs: dict[str, dict[str, int]]) -> dict[str, str]:
    """The variables the kubelet sets in every pod with ``enableServiceLinks`` (the default) for each Service
    of its namespace (Kubernetes' docs, "Discovering services: environment variables"), with made-up
    cluster IPs."""
    env = {}
    for i, (name, ports) in enumerate(sorted(svcs.items())):
        ip, base = f"10.96.0.{i + 10}", re.sub(r"[^A-Z0-9]", "_", name.upper())
        first = next(iter(ports.values()))
        env[f"{base}_SERVICE_HOST"], env[f"{base}_SERVICE_PORT"] = ip, str(first)
        env[f"{base}_PORT"] = f"tcp://{ip}:{first}"
        for pname, port in ports.items():
            if pname:
                env[f"{base}_SERVICE_PORT_{re.sub(r'[^A-Z0-9]', '_', pname.upper())}"] = str(port)
            p = f"{base}_PORT_{port}_TCP"
            env.update({p: f"tcp://{ip}:{port}", f"{p}_PROTO": "tcp", f"{p}_PORT": str(port), f"{p}_ADDR": ip})
    return env
