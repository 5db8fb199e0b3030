"""Helpers the tests share: a real SeaweedFS S3 server, PostgreSQL databases, a production-mode Airflow
stack, compose / helm environment rendering, SMTP capture, hand-built tar bytes, a bounded-time runner,
the UI test world and a WebDriver on Debian's chromedriver."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
