"""The environment docker compose gives its containers, read from the file itself: ``docker/compose.yaml``
interpolated as ``docker compose`` does (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``). The helm
chart is rendered by Helm's own engine: tests/support/chart.py."""

from __future__ import annotations

import re

import yaml

from tests.support import ROOT
COMPOSE = ROOT / "docker" / "compose.yaml"

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, dotenv: dict[str, str]) -> str:
    """Compose-spec interpolation of one string; a ``:?`` / ``?`` variable that is missing raises KeyError
    with its message (what ``docker compose`` refuses to start with)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = dotenv.get(name)
        unset_or_empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else value
        if op in (":?", "?"):
            if unset_or_empty:
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(sub, text)


def compose_services(dotenv: dict[str, str]) -> dict:
    """The services of docker/compose.yaml (anchors and merge keys resolved), every string interpolated."""

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return interpolate(x, dotenv) if isinstance(x, str) else x

    return walk(yaml.safe_load(COMPOSE.read_text())["services"])


def service_env(services: dict, name: str) -> dict[str, str]:
    env = services[name].get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE form
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}
