"""Who may move the champion: one rule for the UI and for a promote DAG run a user triggered.

The user must have an admin-level role in Airflow's auth manager: ``ADMIN`` with the simple auth manager (or
``simple_auth_manager_all_admins``), one of ``ui.promoter_roles`` (default ``Admin``) with FAB. The UI asks with
the logged-in user object; a DAG run has only the name of the user who triggered it, so the role is looked up by
name: in the simple auth manager's configured users, or in FAB's user tables of the metadata database. Any other
auth manager is refused (fail closed) until this rule knows how to read its roles.
"""

from __future__ import annotations


def _auth_manager_name() -> str:
    from airflow.configuration import conf

    return conf.get("core", "auth_manager", fallback="").rsplit(".", 1)[-1]


def roles_of(username: str) -> list[str]:
    """The Airflow roles of ``username`` (empty: no such user)."""
    from airflow.configuration import conf

    manager = _auth_manager_name()
    if manager == "SimpleAuthManager":
        if conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False):
            return ["ADMIN"]
        users = conf.get("core", "simple_auth_manager_users", fallback="")
        return [role.strip().upper() for entry in users.split(",") if ":" in entry
                for name, role in [entry.strip().split(":", 1)] if name.strip() == username]
    if manager == "FabAuthManager":
        import sqlalchemy as sa

        engine = sa.create_engine(conf.get("database", "sql_alchemy_conn"), poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as c:
                rows = c.execute(sa.text(
                    "SELECT r.name FROM ab_user u JOIN ab_user_role ur ON ur.user_id = u.id JOIN ab_role r ON r.id = ur.role_id "
                    "WHERE u.username = :u AND u.active"), {"u": username}).fetchall()
        finally:
            engine.dispose()
        return [r[0] for r in rows]
    raise PermissionError(f"auth manager {manager or '(none)'}: promotion rights cannot be checked by user name")


def may_promote(roles, promoter_roles) -> tuple[bool, str]:
    wanted = {r.upper() for r in promoter_roles} | {"ADMIN"}
    have = [str(r) for r in roles]
    if {r.upper() for r in have} & wanted:
        return True, f"role {', '.join(have)}"
    return False, f"needs one of the roles {sorted(promoter_roles)} (has {have or 'none'})"


DAG_TEST_USER = "dag_test"  # what `airflow dags test` (DAG.test) records as the triggering user


def check_triggering_user(username: str, promoter_roles) -> str:
    """The actor to audit for a promote run ``username`` triggered; PermissionError unless that user may promote.

    A run made by ``airflow dags test`` (the embedded mode, a deployment's own CLI with metadata-database access)
    records the pseudo-user ``dag_test``; when no real user has that name it is the platform's own run,
    audited as ``airflow:dag_test``. The REST API and the UI always record the authenticated user instead."""
    roles = roles_of(username)
    if username == DAG_TEST_USER and not roles:
        return f"airflow:{DAG_TEST_USER}"
    ok, why = may_promote(roles, promoter_roles)
    if not ok:
        raise PermissionError(f"promotion refused to {username}: {why}")
    return username
