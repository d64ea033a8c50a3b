"""The HTTP app around the LitServe worker, one `APIRouter` per resource: subjects, jobs (registration and job
status, in `jobs_api`), place, admin (metrics, info, the OpenAPI description), pages (the studio page). API keys map
to tenants; every request is checked here (key, limits, images, masks, subject) before it reaches a worker. Every
error raised on purpose becomes a JSON answer `{"detail": "..."}`: 4xx for what the client can fix, 429 over a
tenant's limits, 503 / 507 for storage faults and while the server is stopping; never a 500 for anything a client
can send."""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import io
import math
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import PIL.Image
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..choices import DEFAULT_SCHEDULE, SCHEDULES
from ..errors import ERRORS, InvalidArgument, InvalidImage, QuotaExceeded
from .errors import status_of
from .fairness import TenantRateLimit
from .jobs_api import jobs_router, replay_place, store_place
from .metrics import Metrics

UI = Path(__file__).with_name("ui.html")
ADMIN_PATHS = ("/metrics", "/info", "/openapi.json")


class PlaceRequest(BaseModel):
    """A placement: images as base64 (PNG/JPEG/...), mask white = place (soft maps: grey = partial)."""

    model_config = ConfigDict(extra="forbid")
    subject: str = Field(description="name or name@version", max_length=1024)
    room: str
    mask: str
    session: Literal["batch", "progressive", "dual"] = "batch"
    steps: int | None = Field(None, ge=1, lt=2**31)
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float = Field(5.0, ge=0, le=30, allow_inf_nan=False)
    schedule: Literal[tuple(SCHEDULES)] = DEFAULT_SCHEDULE


class Drain:
    """Set when a stop signal arrives: from then on new requests are answered 503, and in-flight placements get
    `seconds` to finish before they are answered 503 too (uvicorn waits for every answer before it exits)."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, None

    def begin(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    @property
    def active(self) -> bool:
        return self.started is not None

    @property
    def expired(self) -> bool:
        return self.started is not None and time.monotonic() - self.started >= self.seconds


def stopping() -> HTTPException:
    return HTTPException(503, "the server is shutting down; retry", headers={"Retry-After": "1"})


class Gate:
    """In front of everything: LitServe's own route of the worker API is not public (the app submits to the worker
    in-process, after its checks); while the server stops every new request is 503; a body whose Content-Length is
    over the limit gets 413 before it is read (LitServe's MaxSizeMiddleware also counts the bytes of bodies sent
    without one)."""

    def __init__(self, app, max_bytes: int, drain: Drain):
        self.app, self.max_bytes, self.drain = app, max_bytes, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            if scope["path"].startswith("/internal/"):
                return await JSONResponse({"detail": "Not Found"}, 404)(scope, receive, send)
            if self.drain.active:
                exc = stopping()
                return await JSONResponse({"detail": exc.detail}, 503, exc.headers)(scope, receive, send)
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                response = JSONResponse({"detail": f"request body over the limit of {self.max_bytes} bytes"}, 413)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ServeState:
    """What the app holds, created on first use (after any fork of the server process)."""

    def __init__(self, config, server, place_api, drain: Drain):
        self.config, self.server, self.place_api, self.drain = config, server, place_api, drain
        self.metrics = Metrics()
        self.place_limit = TenantRateLimit(config.place_rate, config.place_burst)
        self._registry = self._handler = self._jobs = self._replies = None
        self.worker = None  # the embedded training worker (`EmbeddedWorker`), when this process runs one

    @property
    def jobs(self):
        """The registration jobs (`adapters_store.jobs.JobQueue` over the registry database)."""
        if self._jobs is None:
            from adapters_store.jobs import JobQueue

            self._jobs = JobQueue(self.registry, max_attempts=self.config.max_attempts)
        return self._jobs

    @property
    def replies(self):
        """Stored first answers of `POST /v1/place` requests with an `Idempotency-Key`."""
        if self._replies is None:
            from adapters_store.replies import Replies

            self._replies = Replies(self.registry)
        return self._replies

    @property
    def registry(self):
        if self._registry is None:
            from adapters_store import Registry

            self._registry = Registry(self.config.registry_url, self.config.blobs)
        return self._registry

    @property
    def handler(self):
        if self._handler is None:
            from litserve.server import RegularRequestHandler

            self._handler = RegularRequestHandler(self.place_api, self.server)
        return self._handler

    def begin_drain(self) -> None:
        self.drain.begin()

    def close(self) -> None:
        """After the last answer: stop the embedded training worker; its running job is checkpointed at its next
        step and given back (queued again, resumable by any worker)."""
        if self.worker is not None:
            self.worker.close()

    def image(self, data: bytes, what: str) -> PIL.Image.Image:
        """Decode with a size check on the header before any pixel is decoded (no decompression bombs)."""
        from ..images import load_image, open_header

        try:
            probe = open_header(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - PIL raises many kinds for non-images
            raise InvalidImage(f"{what} is not an image PIL can read") from None
        if max(probe.size) > self.config.max_side:
            raise InvalidImage(f"{what} is {probe.size[0]}x{probe.size[1]} px; the limit is {self.config.max_side} "
                               "px on the longest side")
        return load_image(data, what)

    def tenant(self, x_api_key: str | None = Header(None), authorization: str | None = Header(None)) -> str:
        """The dependency of every keyed route: the tenant of the API key (X-API-Key or Authorization: Bearer)."""
        key = x_api_key or (authorization[7:] if authorization and authorization.startswith("Bearer ") else None)
        if not key:
            raise HTTPException(401, "missing API key: send it in the X-API-Key header")
        return self.registry.tenant_for_key(key)  # InvalidKey -> 401

    def admin(self, x_api_key: str | None = Header(None), authorization: str | None = Header(None)) -> str:
        """Operators only: a key of `config.admin_tenant`."""
        tenant = self.tenant(x_api_key, authorization)
        if tenant != self.config.admin_tenant:
            raise HTTPException(403, f"this needs a key of the operators' tenant {self.config.admin_tenant!r}")
        return tenant


# ---------------------------------------------------------------------------------------------------- routers


def subjects_router(state: ServeState) -> APIRouter:
    router = APIRouter(prefix="/v1/subjects", tags=["subjects"])

    def view(tenant: str):
        return state.registry.for_tenant(tenant)

    @router.get("")
    def list_subjects(t: str = Depends(state.tenant), prefix: str | None = None, limit: int = 100,
                      after: str | None = None):
        if not 1 <= limit <= 1000:
            raise InvalidArgument("limit must be in 1..1000")
        return {"subjects": [_describe(r) for r in view(t).list(prefix, limit=limit, after=after)]}

    @router.get("/{ref}")
    def get_subject(ref: str, t: str = Depends(state.tenant)):
        return _describe(view(t).get(ref))

    @router.delete("/{ref}")
    def delete_subject(ref: str, t: str = Depends(state.tenant)):
        return {"deleted": view(t).delete(ref)}

    return router


def place_router(state: ServeState) -> APIRouter:
    router, config, metrics = APIRouter(prefix="/v1", tags=["place"]), state.config, state.metrics

    @router.post("/place")
    async def place(body: PlaceRequest, t: str = Depends(state.tenant), idempotency_key: str | None = Header(None)):
        digest, replay = replay_place(state, t, idempotency_key, body)
        if replay is not None:  # a retry: the first answer, not another placement
            return replay
        return store_place(state, t, idempotency_key, digest, await _place(body, t))

    async def _place(body: PlaceRequest, t: str):
        from ..images import load_mask

        started = time.perf_counter()
        state.place_limit.take(t)  # over this tenant's rate: QuotaExceeded -> 429, other tenants unaffected
        room_bytes, mask_bytes = _b64(body.room, "room"), _b64(body.mask, "mask")
        room = state.image(room_bytes, "room")
        load_mask(state.image(mask_bytes, "mask"), room.size)  # wrong size / aspect / values -> InvalidMask
        steps = body.steps or config.place_steps
        if steps is not None and steps > config.max_place_steps:
            raise InvalidArgument(f"steps must be in 1..{config.max_place_steps}")
        record = state.registry.for_tenant(t).get(body.subject)  # unknown / another tenant's: 404
        payload = {"tenant": t, "ref": record.ref, "room": room_bytes, "mask": mask_bytes, "session": body.session,
                   "steps": steps, "seed": body.seed, "guidance_scale": body.guidance_scale,
                   "schedule": body.schedule}
        metrics.queue_depth += 1
        try:
            row = await _answer_or_drain(state, state.handler.handle_request(payload, dict))
        finally:
            metrics.queue_depth -= 1
        stats = row.get("stats", {})
        if "error" in row:
            return JSONResponse({"detail": row["detail"]}, row["error"])
        metrics.observe(time.perf_counter() - started, stats)
        return Response(row["png"], media_type="image/png",  # names are Unicode; headers are Latin-1: percent-encode
                        headers={"X-Subject": quote(record.ref, safe="@"),
                                 "X-Batch-Rows": str(stats.get("batch_rows", 1))})

    return router


def admin_router(state: ServeState, app: FastAPI) -> APIRouter:
    """Operators' routes (a key of `config.admin_tenant`) and the API description (any tenant's key)."""
    router = APIRouter(tags=["admin"])

    @router.get("/metrics")
    def get_metrics(_: str = Depends(state.admin)):
        return Response(state.metrics.render(state.jobs.counts()), media_type="text/plain; version=0.0.4")

    @router.get("/info")
    def info(_: str = Depends(state.admin)):
        c = state.config
        return {"base": c.base, "max_batch_size": c.max_batch_size, "max_upload_bytes": c.max_upload_bytes,
                "max_side": c.max_side, "max_jobs": c.max_jobs, "max_jobs_per_tenant": c.max_jobs_per_tenant,
                "place_rate": c.place_rate, "place_burst": c.place_burst}

    @router.get("/openapi.json", include_in_schema=False)
    def openapi(_: str = Depends(state.tenant)):
        return JSONResponse(app.openapi())

    return router


def pages_router() -> APIRouter:
    router = APIRouter(tags=["pages"])

    @router.get("/ui", response_class=HTMLResponse)
    def ui():
        return HTMLResponse(UI.read_text(encoding="utf-8"))

    return router


# ---------------------------------------------------------------------------------------------------- the app


def add_routes(app: FastAPI, state: ServeState) -> None:
    """Error handlers, request counting, and the routers. LitServe's own `/` and `/info` (unauthenticated) are
    replaced; its `/health` stays (it answers 503 while the workers start, and the Gate answers 503 while the
    server stops)."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ("/", "/info")]
    _add_error_handlers(app)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        state.metrics.request(getattr(route, "path", "unmatched"), response.status_code)
        return response

    for router in (subjects_router(state), jobs_router(state), place_router(state), admin_router(state, app),
                   pages_router()):
        app.include_router(router)


def _add_error_handlers(app: FastAPI) -> None:
    for kind in ERRORS:
        @app.exception_handler(kind)
        async def _known(request, exc):
            headers = None
            if isinstance(exc, QuotaExceeded) and exc.retry_after is not None:
                headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
            return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, status_of(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # FastAPI's own echoes the input, which may be NaN: not serialisable JSON
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(OSError)
    async def _storage(request, exc):  # a fault of our disk outside the registry's own typed errors
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return JSONResponse({"detail": f"storage {'full' if full else 'unavailable'}: {exc.strerror or exc}"},
                            507 if full else 503)

    from sqlalchemy.exc import DBAPIError

    @app.exception_handler(DBAPIError)
    async def _database(request, exc):  # a database fault on a read (writes raise the registry's typed errors)
        return JSONResponse({"detail": f"database unavailable: {exc.orig}"}, 503, {"Retry-After": "5"})


async def _answer_or_drain(state: ServeState, request):
    """Await the worker's answer; once the server is stopping and the drain time is over, answer 503 instead."""
    task = asyncio.ensure_future(request)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            return task.result()
        if state.drain.expired:
            task.cancel()
            raise stopping()


def _b64(text: str, what: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"{what} is not valid base64") from None


def _describe(record) -> dict:
    return {"ref": record.ref, "name": record.name, "version": record.version, "created": record.created.isoformat(),
            "rank": record.rank, "bytes": record.byte_size, "exemplar": record.metadata.get("exemplar")}
