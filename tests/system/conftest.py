"""Fixtures of the production-mode DAG tests: a fresh Airflow database on the machine's PostgreSQL and an
emptied Redis database as the Celery broker (skipped, with the reason printed, only when Redis is down)."""

import sys

import pytest


@pytest.fixture
def postgres_db(request):
    from tests.support.pg import fresh_database

    with fresh_database("airflow", request.node.name) as db:
        yield db


@pytest.fixture
def redis_db():
    import redis

    n = 9
    try:
        r = redis.Redis(host="127.0.0.1", port=6379, db=n, socket_connect_timeout=3)
        r.flushdb()
    except redis.ConnectionError as exc:
        print(f"\nSKIP Celery tests: Redis at 127.0.0.1:6379 unreachable: {exc}", file=sys.stderr)
        pytest.skip(f"Redis unreachable: {exc}")
    yield f"redis://127.0.0.1:6379/{n}"
    r.flushdb()
