"""Registered versions are loaded only as they were registered.

Whoever can write the artifact store could otherwise replace a version's files (its code, ``MLmodel``, its
weights) and have them run wherever the champion is loaded. At registration :func:`record` downloads the
version just created, hashes every file and keeps the list in the *registry* (the model version's tag
``artifact_sha256``: the registry database, not the artifact store). :func:`verified_download` resolves an
alias to its version, downloads that version and refuses it, naming the files, unless its files are exactly
the recorded ones; only then does anything load it. A version registered without the list is refused too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

MANIFEST_TAG = "artifact_sha256"


class IntegrityError(ValueError):
    """A registered version's files are not the ones recorded at registration."""


def digest_tree(root: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (symlinks are refused: they point outside)."""
    from ovtasks.models.hub import file_sha256

    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise IntegrityError(f"{p.relative_to(root)} is a symbolic link")
        if p.is_file():
            out[p.relative_to(root).as_posix()] = file_sha256(p)
    return out


def record(mlflow, client, name: str, version: str) -> dict[str, str]:
    """Hash the files of ``name`` version ``version`` as the artifact store now holds them and tag the list on
    the version; returns it."""
    with tempfile.TemporaryDirectory(prefix="ovtasks-register-") as d:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=d)
        manifest = digest_tree(local)
    client.set_model_version_tag(name, version, MANIFEST_TAG, json.dumps(manifest, sort_keys=True, separators=(",", ":")))
    return manifest


def resolve(client, model_ref: str):
    """The ModelVersion a ``models:/NAME@alias`` or ``models:/NAME/N`` reference names."""
    if not model_ref.startswith("models:/"):
        raise IntegrityError(f"{model_ref!r}: only registered versions (models:/NAME@alias, models:/NAME/N) are checked "
                             "against the registry; a local model directory is loaded as it is")
    rest = model_ref[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise IntegrityError(f"{model_ref!r} is not models:/NAME@alias or models:/NAME/N")
    return client.get_model_version(name, version)


def verified_download(mlflow, client, model_ref: str, dst: str | Path | None = None) -> tuple[str, object]:
    """(local directory, ModelVersion) of ``model_ref`` once every downloaded file matches the sha256 list recorded
    at registration; :class:`IntegrityError` (nothing loaded) otherwise."""
    mv = resolve(client, model_ref)
    recorded = (mv.tags or {}).get(MANIFEST_TAG)
    if not recorded:
        raise IntegrityError(f"{mv.name} v{mv.version} has no {MANIFEST_TAG} record (registered before records were kept, "
                             "or the record was removed): register it again")
    try:
        expected = json.loads(recorded)
    except ValueError as exc:
        raise IntegrityError(f"{mv.name} v{mv.version}: its {MANIFEST_TAG} record is unreadable") from exc
    # the version the alias named when resolved, not the alias again (it may move meanwhile)
    local = mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=str(dst) if dst else None)
    found = digest_tree(local)
    changed = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    added, missing = sorted(found.keys() - expected.keys()), sorted(expected.keys() - found.keys())
    if changed or added or missing:
        parts = [f"{what}: {', '.join(files[:5])}" for what, files in (("changed", changed), ("added", added), ("missing", missing)) if files]
        raise IntegrityError(f"{mv.name} v{mv.version} does not match what was registered ({'; '.join(parts)}): not loaded")
    return local, mv
