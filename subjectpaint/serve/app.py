"""The HTTP app around the LitServe worker: API keys -> tenants, subjects, registration jobs, placements, metrics,
the studio page. Every request is checked here (key, limits, images, masks, subject) before it reaches a worker;
every error raised on purpose becomes a 4xx JSON answer `{"detail": "..."}`."""

from __future__ import annotations

import base64
import binascii
import io
import time
from pathlib import Path
from typing import Literal

import PIL.Image
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..choices import DEFAULT_SCHEDULE, SCHEDULES
from ..errors import ERRORS, InvalidArgument, InvalidImage
from .errors import status_of
from .jobs_api import job_router, replay_place, store_place
from .metrics import Metrics

UI = Path(__file__).with_name("ui.html")


class PlaceRequest(BaseModel):
    """A placement: images as base64 (PNG/JPEG/...), mask white = place (soft maps: grey = partial)."""

    model_config = ConfigDict(extra="forbid")
    subject: str = Field(description="name or name@version")
    room: str
    mask: str
    session: Literal["batch", "progressive", "dual"] = "batch"
    steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float = Field(5.0, ge=0, le=30)
    schedule: Literal[tuple(SCHEDULES)] = DEFAULT_SCHEDULE


class Gate:
    """In front of everything: LitServe's own route of the worker API is not public (the app submits to the worker
    in-process, after its checks), and a body whose Content-Length is over the limit gets 413 before it is read
    (LitServe's MaxSizeMiddleware also counts the bytes of bodies sent without one)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            if scope["path"].startswith("/internal/"):
                return await JSONResponse({"detail": "Not Found"}, 404)(scope, receive, send)
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                response = JSONResponse({"detail": f"request body over the limit of {self.max_bytes} bytes"}, 413)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ServeState:
    """What the app holds, created on first use (after any fork of the server process)."""

    def __init__(self, config, server, place_api):
        self.config, self.server, self.place_api = config, server, place_api
        self.metrics = Metrics()
        self._registry = self._handler = self._jobs = self._replies = None
        self.worker = None  # the embedded training worker (`EmbeddedWorker`), when this process runs one

    @property
    def jobs(self):
        if self._jobs is None:
            from adapters_store.jobs import JobQueue

            self._jobs = JobQueue(self.registry, max_attempts=self.config.max_attempts)
        return self._jobs

    @property
    def replies(self):
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

    def image(self, data: bytes, what: str) -> PIL.Image.Image:
        """Decode with a size check on the header before any pixel is decoded (no decompression bombs)."""
        from ..images import load_image

        try:
            probe = PIL.Image.open(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - PIL raises many kinds for non-images
            raise InvalidImage(f"{what} is not an image PIL can read") from None
        if max(probe.size) > self.config.max_side:
            raise InvalidImage(f"{what} is {probe.size[0]}x{probe.size[1]} px; the limit is {self.config.max_side} "
                               "px on the longest side")
        return load_image(data, what)


def add_routes(app: FastAPI, state: ServeState) -> None:
    config, metrics = state.config, state.metrics

    for kind in ERRORS:
        @app.exception_handler(kind)
        async def _known(request, exc):
            return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, status_of(exc))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request(getattr(route, "path", "unmatched"), response.status_code)
        return response

    def tenant(x_api_key: str | None = Header(None), authorization: str | None = Header(None)) -> str:
        key = x_api_key or (authorization[7:] if authorization and authorization.startswith("Bearer ") else None)
        if not key:
            raise HTTPException(401, "missing API key: send it in the X-API-Key header")
        return state.registry.tenant_for_key(key)  # InvalidKey -> 401

    def view(tenant_name: str):
        return state.registry.for_tenant(tenant_name)

    @app.get("/metrics")
    def get_metrics():
        return Response(metrics.render(state.jobs.counts()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/subjects")
    def list_subjects(t: str = Depends(tenant), prefix: str | None = None, limit: int = 100, after: str | None = None):
        if not 1 <= limit <= 1000:
            raise InvalidArgument("limit must be in 1..1000")
        return {"subjects": [_describe(r) for r in view(t).list(prefix, limit=limit, after=after)]}

    @app.get("/v1/subjects/{ref}")
    def get_subject(ref: str, t: str = Depends(tenant)):
        return _describe(view(t).get(ref))

    @app.delete("/v1/subjects/{ref}")
    def delete_subject(ref: str, t: str = Depends(tenant)):
        return {"deleted": view(t).delete(ref)}

    app.include_router(job_router(state, tenant))   # POST /v1/subjects, GET|DELETE /v1/jobs/{id}

    @app.post("/v1/place")
    async def place(body: PlaceRequest, t: str = Depends(tenant), idempotency_key: str | None = Header(None)):
        digest, replay = replay_place(state, t, idempotency_key, body)
        if replay is not None:
            return replay
        return store_place(state, t, idempotency_key, digest, await _place(body, t))

    async def _place(body: PlaceRequest, t: str):
        from ..images import load_mask

        started = time.perf_counter()
        room_bytes, mask_bytes = _b64(body.room, "room"), _b64(body.mask, "mask")
        room = state.image(room_bytes, "room")
        load_mask(state.image(mask_bytes, "mask"), room.size)  # wrong size / aspect / values -> InvalidMask
        steps = body.steps or config.place_steps
        if steps is not None and steps > config.max_place_steps:
            raise InvalidArgument(f"steps must be in 1..{config.max_place_steps}")
        record = view(t).get(body.subject)  # unknown or another tenant's: AdapterNotFound -> 404
        payload = {"tenant": t, "ref": record.ref, "room": room_bytes, "mask": mask_bytes, "session": body.session,
                   "steps": steps, "seed": body.seed, "guidance_scale": body.guidance_scale,
                   "schedule": body.schedule}
        metrics.queue_depth += 1
        try:
            row = await state.handler.handle_request(payload, dict)
        finally:
            metrics.queue_depth -= 1
        stats = row.get("stats", {})
        if "error" in row:
            return JSONResponse({"detail": row["detail"]}, row["error"])
        metrics.observe(time.perf_counter() - started, stats)
        return Response(row["png"], media_type="image/png",
                        headers={"X-Subject": record.ref, "X-Batch-Rows": str(stats.get("batch_rows", 1))})

    @app.get("/ui", response_class=HTMLResponse)
    def ui():
        return HTMLResponse(UI.read_text(encoding="utf-8"))


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
