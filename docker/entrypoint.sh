#!/usr/bin/env bash
# What the official apache/airflow image's /entrypoint does for the arguments the official Helm chart and
# docker/compose.yaml pass: `bash ...`, `python ...` and `airflow ...` run as given, anything else is an
# airflow subcommand (`api-server`, `celery worker --queues gpu`, `db check-migrations`).
set -euo pipefail
case "${1:-}" in
  bash | sh | python | python3 | airflow | ovtasks) exec "$@" ;;
  *) exec airflow "$@" ;;
esac
