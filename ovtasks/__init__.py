"""ovtasks: LAION image-caption shards to open-vocabulary instance segmentation models.

Each pipeline stage is one module exposing plain functions over typed inputs (URIs, frozen
dataclasses, config objects). ``dags/`` wires them into Airflow; nothing here imports Airflow.
"""

__version__ = "0.1.0"
