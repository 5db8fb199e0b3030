"""Alerts for the people who run the weekly loop: a failed task, a promotion, a refused promotion.

Delivered through Airflow connections, each channel only when it is configured:

* mail: ``OVDAGS_ALERT_EMAILS`` (comma-separated recipients) through the SMTP connection
  ``OVDAGS_SMTP_CONN_ID`` (default ``smtp_default``, Airflow's SMTP provider), sender
  ``OVDAGS_ALERT_FROM`` (default: the connection's ``from_email`` extra);
* Slack: when the connection ``OVDAGS_SLACK_CONN_ID`` (default ``ovtasks_slack``) exists, a message to
  its incoming webhook (the connection's host when it is a full URL, else
  ``https://hooks.slack.com/services/<password>``).

An alert that cannot be delivered is logged, never raised: it must not turn a result into a failure.
Called from task callbacks and tasks only (imports Airflow lazily).
"""

from __future__ import annotations

import html
import json
import logging
import os
import urllib.request

log = logging.getLogger("ovtasks.orchestration.alerts")


def send_alert(subject: str, body: str) -> list[str]:
    """Send to every configured channel; returns the channels that took the alert."""
    sent = []
    emails = [e.strip() for e in os.environ.get("OVDAGS_ALERT_EMAILS", "").split(",") if e.strip()]
    if emails:
        try:
            from airflow.providers.smtp.hooks.smtp import SmtpHook

            with SmtpHook(smtp_conn_id=os.environ.get("OVDAGS_SMTP_CONN_ID", "smtp_default")) as hook:
                hook.send_email_smtp(to=emails, subject=subject, html_content=f"<pre>{html.escape(body)}</pre>",
                                     from_email=os.environ.get("OVDAGS_ALERT_FROM") or None)
            sent.append("smtp")
        except Exception as exc:  # noqa: BLE001 - see the module doc
            log.warning("alert mail not sent: %s: %s", type(exc).__name__, exc)
    url = _slack_webhook(os.environ.get("OVDAGS_SLACK_CONN_ID", "ovtasks_slack"))
    if url:
        try:
            req = urllib.request.Request(url, data=json.dumps({"text": slack_text(subject, body)}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - the operator's configured webhook
                resp.read()
            sent.append("slack")
        except Exception as exc:  # noqa: BLE001
            # never the URL: an incoming webhook's URL is its secret, and urllib's errors repeat it
            reason = getattr(exc, "code", None) or getattr(getattr(exc, "reason", None), "__class__", type(exc)).__name__
            log.warning("alert to Slack not sent (connection %s): %s: %s", os.environ.get("OVDAGS_SLACK_CONN_ID", "ovtasks_slack"),
                        type(exc).__name__, reason)
    return sent


def slack_escape(text: str) -> str:
    """Slack's mrkdwn control characters as entities: ``<!channel>``, ``<https://x|click>`` and ``&`` in DAG
    parameters stay text (Slack's "escaping text" rules: only ``&``, ``<`` and ``>``)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(subject: str, body: str) -> str:
    return f"*{slack_escape(subject)}*\n{slack_escape(body)}"


def _slack_webhook(conn_id: str) -> str | None:
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - no such connection (or no Airflow): Slack is not configured
        return None
    host = (conn.host or "").strip()
    if host.startswith(("https://", "http://")):
        return host
    return f"https://hooks.slack.com/services/{conn.password}" if conn.password else None


def failure_text(context) -> tuple[str, str]:
    ti = context.get("task_instance") or context.get("ti")
    exc = context.get("exception")
    dag_id, task_id = getattr(ti, "dag_id", "?"), getattr(ti, "task_id", "?")
    subject = f"[ovtasks] FAILED {dag_id}.{task_id}"
    body = (f"DAG {dag_id}, run {context.get('run_id')}, task {task_id} (map index {getattr(ti, 'map_index', -1)}, "
            f"try {getattr(ti, 'try_number', '?')}) failed after its retries.\n{type(exc).__name__ if exc else 'error'}: {exc}")
    return subject, body


def promotion_text(model: str, result: dict) -> tuple[str, str]:
    """Subject and body for a promotion decision (``registry.PromotionResult`` as a dict)."""
    verdict = "promoted" if result.get("promoted") else "promotion REFUSED"
    subject = f"[ovtasks] {model} challenger v{result.get('challenger') or '?'}: {verdict}"
    body = (f"{verdict}: {result.get('reason', '')}\nchampion before: v{result.get('champion_before')}, "
            f"after: v{result.get('champion_after')}\n" + json.dumps(result.get("gate") or {}, indent=2, default=str))
    return subject, body
