-- The MLflow backend store and its basic-auth users live beside Airflow's metadata DB on the same server.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
