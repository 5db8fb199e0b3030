"""Airflow and Celery: task bodies the DAGs call, DAG defaults, embedded mode, the REST client, capacity plans."""
