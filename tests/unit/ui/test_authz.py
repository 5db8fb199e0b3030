"""One promotion rule for the UI and for a promote DAG run a user triggered (red-team round three, item 3)."""

import pytest

from ovtasks.ui.authz import check_triggering_user, may_promote, roles_of

SIMPLE = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


@pytest.fixture
def simple_users(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", SIMPLE)
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "alice:op,bob:admin,carol:viewer")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")


def test_a_user_without_an_admin_role_may_not_promote_by_triggering_the_dag(simple_users):
    assert roles_of("alice") == ["OP"] and roles_of("bob") == ["ADMIN"] and roles_of("mallory") == []
    assert check_triggering_user("bob", ("Admin",)) == "bob"
    assert check_triggering_user("dag_test", ("Admin",)) == "airflow:dag_test"  # `airflow dags test`, no such user
    for who in ("alice", "carol", "mallory"):
        with pytest.raises(PermissionError, match=f"promotion refused to {who}"):
            check_triggering_user(who, ("Admin",))


def test_the_rule_reads_fab_roles_and_the_configured_promoter_roles():
    assert may_promote(["Admin"], ("Admin",))[0] and may_promote(["MLOps"], ("Admin", "MLOps"))[0]
    assert not may_promote(["Op", "User"], ("Admin",))[0] and not may_promote([], ("Admin",))[0]


def test_an_unknown_auth_manager_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", "some.vendor.KeycloakAuthManager")
    with pytest.raises(PermissionError, match="cannot be checked"):
        check_triggering_user("anyone", ("Admin",))
