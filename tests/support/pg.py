"""A fresh database on the machine's PostgreSQL (127.0.0.1:5432, trust auth), dropped afterwards; a test
that needs it skips with a printed reason only when the server truly cannot be reached."""

from __future__ import annotations

import contextlib
import sys
import uuid

import pytest


def admin_connection(purpose: str):
    """An autocommit connection to the machine's PostgreSQL as ``postgres``; the test skips, with the reason
    printed, only when the server cannot be reached."""
    try:
        import psycopg2
    except ImportError as exc:  # pinned in pyproject: only a broken install gets here
        pytest.fail(f"psycopg2 missing: {exc}")
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        print(f"\nSKIP {purpose}: PostgreSQL at 127.0.0.1:5432 unreachable: {exc}", file=sys.stderr)
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def fresh_database(prefix: str, purpose: str):
    conn = admin_connection(purpose)
    db = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn.cursor().execute(f"CREATE DATABASE {db}")
    try:
        yield db
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.close()
