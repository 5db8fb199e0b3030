"""ovtasks_promote: manual. Moves ``champion`` to ``challenger`` when the gate allows it (GX passed, novel
mask AP50 at least ``registry.min_novel_ap50``, and a paired bootstrap over the evaluation images puts the
challenger - champion interval's lower end above -tolerance); a refusal is a result with its reason and
interval, tagged on the challenger, not a failure. The promotion is audited under the user who triggered the
run, who must have an admin-level role (ui.promoter_roles: the rule the UI applies); the tolerance is bounded
(registry.max_promotion_tolerance)."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from ovtasks.orchestration.dag_defaults import TAGS, default_args, settings


@dag(dag_id="ovtasks_promote", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, tags=TAGS + ["mlflow", "promote"],
     default_args=default_args(10), doc_md=__doc__,
     params={"model": Param("ov-maskrcnn", enum=["ov-maskrcnn", "semantic-sam"]),
             "tolerance": Param(None, type=["null", "number"], minimum=0, maximum=10,
                                description="margin in novel mask AP50 points; empty: registry.promotion_tolerance"),
             "reason": Param("", type="string", maxLength=500)})
def ovtasks_promote():
    @task(doc_md="The promotion gate; returns promoted, reason, challenger and champion before/after, and sends the "
          "decision as an alert (mail / Slack where configured).")
    def promote() -> dict:
        from ovtasks.orchestration.alerts import promotion_text, send_alert
        from ovtasks.orchestration.tasks import promote_model

        from ovtasks.ui.authz import check_triggering_user

        ctx = get_current_context()
        p, run = ctx["params"], ctx["dag_run"]
        s = settings()
        # the actor is whoever triggered this run (recorded by Airflow), never a parameter, and must have the role
        # the UI asks for; a run no user triggered (`airflow dags test`, the scheduler) is the platform's own
        user = getattr(run, "triggering_user_name", None)
        who = check_triggering_user(user, s.ui.promoter_roles, s.airflow) if user else f"airflow:{run.run_type}"
        result = promote_model(s, p["model"], p["tolerance"], who, p["reason"])
        send_alert(*promotion_text(p["model"], result))  # promotions and refusals both reach the operators
        return result

    promote()


ovtasks_promote()
