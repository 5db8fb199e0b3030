"""The environment the shipped deployments give their containers, read from the files themselves:
``docker/compose.yaml`` interpolated as ``docker compose`` does (``${VAR}``, ``${VAR:-default}``,
``${VAR:?error}``, ``$$``), and the ovtasks ConfigMap of the helm chart rendered for a values dict (a small
evaluator of exactly the template functions that file uses; no helm binary exists here)."""

from __future__ import annotations

import re

import yaml

from tests.support import ROOT
COMPOSE = ROOT / "docker" / "compose.yaml"
CONFIG_MAP = ROOT / "helm" / "ovtasks" / "templates" / "ovtasks-env.yaml"

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


# -- the helm ConfigMap ------------------------------------------------------------------------------

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|\||[^\s()|]+')


def render_config_map(values: dict, release: str = "ovtasks") -> dict[str, str]:
    """``data`` of templates/ovtasks-env.yaml for ``values`` (the chart's values.yaml merged with overrides)."""
    text = CONFIG_MAP.read_text()
    o = values.get("ovtasks") or {}
    scope = {"$o": o, "$m": o.get("models") or {}, ".Values": values, ".Release": {"Name": release}}
    b = re.search(r'\{\{-?\s*\$b := (.*?)\s*-?\}\}', text)
    scope["$b"] = _eval(_TOKEN.findall(b.group(1)), scope, release)
    data = {}
    for key, expr in re.findall(r"^  ([A-Z0-9_]+): \{\{ (.*) \}\}$", text, re.M):
        data[key] = str(_eval(_TOKEN.findall(expr), scope, release))
    return data


def _lookup(tok: str, scope: dict):
    if tok.startswith('"'):
        return tok[1:-1]
    if tok in ("true", "false"):
        return tok == "true"
    if tok == ".":
        return scope
    root, *path = re.split(r"(?<=.)\.", tok)
    cur = scope[root] if root in scope else None
    for p in path:
        cur = cur.get(p) if isinstance(cur, dict) else None
    return cur


def _eval(tokens: list[str], scope: dict, release: str):
    """A Go-template pipeline: ``cmd args | fn args | ...`` (the previous result is the last argument)."""
    stages, depth, cur = [], 0, []
    for t in tokens:
        depth += (t == "(") - (t == ")")
        if t == "|" and depth == 0:
            stages.append(cur)
            cur = []
        else:
            cur.append(t)
    stages.append(cur)
    result, first = None, True
    for stage in stages:
        args, i = [], 1
        while i < len(stage):
            if stage[i] == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += (stage[j] == "(") - (stage[j] == ")")
                    j += 1
                args.append(_eval(stage[i + 1:j - 1], scope, release))
                i = j
            else:
                args.append(_lookup(stage[i], scope))
                i += 1
        if not first:
            args.append(result)
        result = _call(stage[0], args, scope, release) if stage[0] in _FUNCS or not first or args else _lookup(stage[0], scope)
        first = False
    return result


def _empty(v) -> bool:
    return v is None or v is False or v == "" or v == {} or v == []


_FUNCS = {
    "printf": lambda fmt, *a: fmt % tuple(a),
    "default": lambda d, v=None: d if _empty(v) else v,
    "quote": lambda v: "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v)),
    "required": lambda msg, v=None: v if not _empty(v) else (_ for _ in ()).throw(ValueError(msg)),
}


def _call(name: str, args: list, scope: dict, release: str):
    if name == "include":
        assert args[0] == "ovtasks.fullname", args[0]
        return f"{release}-ovtasks"[:63].rstrip("-")
    if name not in _FUNCS:
        raise ValueError(f"template function {name!r} is not known to this renderer: extend tests/support/deploy_env.py")
    return _FUNCS[name](*args)
