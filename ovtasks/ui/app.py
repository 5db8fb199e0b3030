"""The FastAPI app the Airflow plugin mounts in the api-server at ``/ovtasks``: JSON endpoints and one UI
page. Authentication is Airflow's own (``get_user``: the UI's JWT cookie or a Bearer token), so every
route refuses an anonymous request; promoting also needs permission to trigger the promote DAG and an
admin-level role (see :func:`can_promote`)."""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from ovtasks.data import catalog
from ovtasks.registry import listing
from ovtasks.ui import data

PAGE = Path(__file__).with_name("page.html")


@functools.lru_cache(maxsize=1)
def _settings():
    from ovtasks.core.config import load_settings

    return load_settings()


def user_name(user) -> str:
    for attr in ("get_name", "get_id"):
        try:
            v = getattr(user, attr)()
            if v:
                return str(v)
        except Exception:  # noqa: BLE001 - auth managers' user classes differ
            continue
    return "unknown"


def can_promote(user, promote_dag: str, promoter_roles=("Admin",)) -> tuple[bool, str]:
    """Promotion is admin-level: the user may trigger ``promote_dag`` (a DAG-run POST) and has an admin-level role
    (:mod:`ovtasks.ui.authz`, the same rule a promote DAG run applies to the user who triggered it)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    from ovtasks.ui.authz import may_promote

    am = get_auth_manager()
    if not am.is_authorized_dag(method="POST", access_entity=DagAccessEntity.RUN, details=DagDetails(id=promote_dag), user=user):
        return False, f"needs permission to trigger {promote_dag}"
    manager = type(am).__name__
    if manager == "SimpleAuthManager":
        from airflow.configuration import conf

        all_admins = conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False)
        roles = ["ADMIN"] if all_admins else [str(getattr(user, "role", None) or "")]
    elif manager == "FabAuthManager":
        roles = [getattr(r, "name", str(r)) for r in (getattr(user, "roles", None) or [])]
    else:
        return False, f"auth manager {manager}: promotion rights are not known for it"
    return may_promote([r for r in roles if r], promoter_roles)


GENERATOR = Literal["maskfree", "grounded"] | None  # anything else (``../x``) is a 422, never a path


class PromoteBody(BaseModel):
    model: Literal["ov-maskrcnn", "semantic-sam"] = "ov-maskrcnn"
    tolerance: float | None = Field(None, ge=0, allow_inf_nan=False)  # the upper bound: registry.max_promotion_tolerance
    reason: str = Field("", max_length=500)


def create_app(settings_factory=_settings, auth_dependency=None) -> FastAPI:
    """``auth_dependency`` defaults to Airflow's ``get_user`` (the api-server's auth manager)."""
    if auth_dependency is None:
        from airflow.api_fastapi.core_api.security import get_user as auth_dependency

    # no schema, docs or redoc routes: every route of this app needs a user (the API is documented in plugins/README.md)
    app = FastAPI(title="ovtasks", description="ovtasks monitoring and promotion (Airflow plugin)", docs_url=None, redoc_url=None,
                  openapi_url=None)
    user_dep = Depends(auth_dependency)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        """422 with where and what, never the offending input: a non-finite number in it (Infinity, NaN) would
        make FastAPI's own JSON answer fail with a 500."""
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()]})

    def missing(exc: Exception):
        return HTTPException(404, str(exc))

    @app.get("/ui/", response_class=HTMLResponse, summary="the page shown in Airflow's navigation")
    def page(user=user_dep):
        return HTMLResponse(PAGE.read_text().replace("{{user}}", user_name(user).replace("<", "")))

    @app.get("/api/whoami")
    def whoami(user=user_dep):
        s = settings_factory()
        ok, why = can_promote(user, s.ui.promote_dag, s.ui.promoter_roles)
        return {"user": user_name(user), "can_promote": ok, "why": why}

    @app.get("/api/datasets")
    def datasets(generator: GENERATOR = None, page: int = Query(1, ge=1), per_page: int | None = Query(None, ge=1, le=1000),
                 user=user_dep):
        return catalog.datasets(settings_factory(), generator, page, per_page)

    @app.get("/api/gallery")
    def gallery(category: str | None = None, min_score: float = Query(0.0, ge=0, le=1), page: int = Query(1, ge=1),
                per_page: int = Query(24, ge=1, le=1000), generator: GENERATOR = None, user=user_dep):
        return data.gallery(settings_factory(), category or None, min_score, page, per_page, generator)

    @app.get("/api/gallery/{shard}/{image_id}.jpg", response_class=Response)
    def thumbnail(shard: str, image_id: int, category: str | None = None, min_score: float = Query(0.0, ge=0, le=1),
                  generator: GENERATOR = None, user=user_dep):
        try:
            jpg = data.thumbnail(settings_factory(), shard, image_id, category or None, min_score, generator)
        except data.NotFound as exc:
            raise missing(exc) from exc
        return Response(jpg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/models")
    def models(user=user_dep):
        return {"models": listing.models(settings_factory())}

    @app.post("/api/promote")
    def promote(body: PromoteBody, user=user_dep):
        from ovtasks.registry.lifecycle import promote as run_gate

        s = settings_factory()
        ok, why = can_promote(user, s.ui.promote_dag, s.ui.promoter_roles)
        if not ok:
            raise HTTPException(403, f"promotion refused to {user_name(user)}: {why}")
        try:
            r = run_gate(s, body.tolerance, who=user_name(user), why=body.reason or "promoted from the Airflow UI",
                         architecture=body.model)
        except ValueError as exc:  # a tolerance or reason outside the bounds every path applies
            raise HTTPException(422, str(exc)) from exc
        return asdict(r)

    return app
