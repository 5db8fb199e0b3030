"""Airflow 3 plugin: the ovtasks monitoring and promotion UI (datasets, gallery, models, promote) as a
FastAPI app mounted in the api-server at /ovtasks, and an entry in Airflow's navigation that shows its
page. Everything heavy is imported per request inside ``ovtasks.ui``; this file stays cheap to load."""

from airflow.plugins_manager import AirflowPlugin

from ovtasks.ui.app import create_app


class OvtasksPlugin(AirflowPlugin):
    name = "ovtasks"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/ovtasks", "name": "ovtasks"}]
    external_views = [{"name": "ovtasks", "href": "/ovtasks/ui/", "url_route": "ovtasks", "destination": "nav",
                       "category": "browse"}]
