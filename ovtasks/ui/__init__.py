"""The monitoring and promotion UI served by the Airflow plugin (``plugins/ovtasks_plugin.py``)."""
