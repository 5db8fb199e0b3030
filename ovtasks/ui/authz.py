"""Who may move the champion: one rule for the UI and for a promote DAG run a user triggered.

The user must have an admin-level role in Airflow's auth manager: ``ADMIN`` with the simple auth manager (or
``simple_auth_manager_all_admins``), one of ``ui.promoter_roles`` (default ``Admin``) with FAB. The UI asks with
the logged-in user object; a DAG run has only the name of the user who triggered it, so the role is looked up by
name: in the simple auth manager's configured users, or through FAB's own REST API (``/auth/fab/v1/users/<name>``,
with the ``airflow`` client login of the settings: a task cannot reach the metadata database in Airflow 3). Any
other auth manager, or FAB without that login, is refused (fail closed).
"""

from __future__ import annotations


def _auth_manager_name() -> str:
    from airflow.configuration import conf

    return conf.get("core", "auth_manager", fallback="").rsplit(".", 1)[-1]


def roles_of(username: str, api=None) -> list[str]:
    """The Airflow roles of ``username`` (empty: no such user). ``api``: the settings' ``airflow`` client config
    (url, username, password), which FAB's lookup needs."""
    from airflow.configuration import conf

    manager = _auth_manager_name()
    if manager == "SimpleAuthManager":
        if conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False):
            return ["ADMIN"]
        users = conf.get("core", "simple_auth_manager_users", fallback="")
        return [role.strip().upper() for entry in users.split(",") if ":" in entry
                for name, role in [entry.strip().split(":", 1)] if name.strip() == username]
    if manager == "FabAuthManager":
        return _fab_roles(username, api)
    raise PermissionError(f"auth manager {manager or '(none)'}: promotion rights cannot be checked by user name")


def _fab_roles(username: str, api) -> list[str]:
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from ovtasks.orchestration.rest import get_token

    if api is None or api.password is None:
        raise PermissionError("FAB roles cannot be read: set the airflow client login (OVTASKS_AIRFLOW__URL, "
                              "OVTASKS_AIRFLOW__USERNAME, OVTASKS_AIRFLOW__PASSWORD) for the workers")
    token = get_token(api.url, api.username, api.password.get_secret_value())
    req = urllib.request.Request(f"{api.url.rstrip('/')}/auth/fab/v1/users/{urllib.parse.quote(username, safe='')}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            user = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise PermissionError(f"FAB roles of {username!r} could not be read: HTTP {exc.code}") from exc
    if not user.get("active", True):
        return []
    return [r.get("name", "") for r in user.get("roles") or [] if isinstance(r, dict)]


def may_promote(roles, promoter_roles) -> tuple[bool, str]:
    wanted = {r.upper() for r in promoter_roles} | {"ADMIN"}
    have = [str(r) for r in roles]
    if {r.upper() for r in have} & wanted:
        return True, f"role {', '.join(have)}"
    return False, f"needs one of the roles {sorted(promoter_roles)} (has {have or 'none'})"


DAG_TEST_USER = "dag_test"  # what `airflow dags test` (DAG.test) records as the triggering user


def check_triggering_user(username: str, promoter_roles, api=None) -> str:
    """The actor to audit for a promote run ``username`` triggered; PermissionError unless that user may promote.

    A run made by ``airflow dags test`` (the embedded mode, a deployment's own CLI with metadata-database access)
    records the pseudo-user ``dag_test``; when no real user has that name it is the platform's own run,
    audited as ``airflow:dag_test``. The REST API and the UI always record the authenticated user instead."""
    roles = roles_of(username, api)
    if username == DAG_TEST_USER and not roles:
        return f"airflow:{DAG_TEST_USER}"
    ok, why = may_promote(roles, promoter_roles)
    if not ok:
        raise PermissionError(f"promotion refused to {username}: {why}")
    return username
