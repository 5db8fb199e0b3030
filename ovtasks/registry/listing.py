"""Every registered version of both architectures with its evaluation, GX status, aliases, gate decision and
lineage (``ovtasks status`` and the UI's Models tab)."""

from __future__ import annotations

import json
import re

from ovtasks.core.config import Settings


def _eval_rows(metrics: dict) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for k, v in metrics.items():
        m = re.match(r"^(generalized|constrained)_(all|base|novel)_(box_AP50|box_AP|mask_AP50|mask_AP)$", k)
        if m:
            rows.setdefault((m[1], m[2]), {"setting": m[1], "split": m[2]})[m[3]] = round(float(v), 2)
    order = {"generalized": 0, "constrained": 1, "all": 0, "base": 1, "novel": 2}
    return [rows[k] for k in sorted(rows, key=lambda t: (order[t[0]], order[t[1]]))]


def models(settings: Settings) -> list[dict]:
    """Every registered version of both architectures, newest first, with its eval table, GX status,
    aliases and lineage (data manifest hash, DAG run, MLflow run)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ovtasks.registry.lifecycle import ARCHITECTURES, registered_name, tracking_uri

    uri = tracking_uri(settings)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    out = []
    for arch in ARCHITECTURES:
        name = registered_name(settings, arch)
        try:
            versions = client.search_model_versions(f"name='{name}'")  # names are validated (config: registry)
            aliases = dict(client.get_registered_model(name).aliases or {}) if versions else {}
        except MlflowException:
            versions, aliases = [], {}
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            try:
                run = client.get_run(mv.run_id) if mv.run_id else None
            except MlflowException:
                run = None
            tags = dict(mv.tags or {})
            refused, gate = tags.get("promotion_refused"), tags.get("promotion_gate")
            out.append({"name": name, "architecture": arch, "version": str(mv.version), "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                        "created": mv.creation_timestamp, "gx_status": tags.get("gx_status"),
                        "novel_mask_AP50": tags.get("novel_mask_AP50"), "eval_prompts": tags.get("eval_prompts"),
                        "lineage": {"data_manifest_sha256": tags.get("data_manifest_sha256"), "dag_run": tags.get("dag_run") or None,
                                    "mlflow_run": mv.run_id, "code_version": tags.get("code_version")},
                        "promotion": {k: tags[k] for k in ("promoted_by", "promoted_at", "promotion_reason", "previous_champion") if k in tags},
                        "promotion_refused": json.loads(refused) if refused else None,
                        "promotion_gate": json.loads(gate) if gate else None,
                        "evaluation": _eval_rows(run.data.metrics) if run else []})
    return out
