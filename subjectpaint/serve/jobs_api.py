"""Registration routes: `POST /v1/subjects` queues a job in the registry database (any worker process trains it;
admission is `ServeConfig.check_job_quota`: a tenant at its own limit, or the server at its capacity, gets 429),
`GET /v1/jobs/{id}` answers from the database (so any serve process answers for any job), `DELETE /v1/jobs/{id}`
cancels a queued or running job. Another tenant's job is 404, like one that does not exist.

`Idempotency-Key` (header, up to 256 characters): a retried `POST /v1/subjects` gets the first request's job
(also when both arrive at once, at different processes); the same key with a different request is 422. The same
header on `POST /v1/place` is handled by `replay_place` / `store_place` below (first answer kept in the database).
"""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Depends, File, Form, Header, HTTPException, UploadFile
from fastapi.responses import JSONResponse, Response

from ..errors import InvalidArgument, VersionExists

# The Subject.train keyword arguments a registration may set in its `recipe` (JSON object); their values are
# checked by Subject.train in the worker (out of range: the job fails with the typed error's message).
RECIPE_FIELDS = frozenset({"rank", "alpha", "dropout", "batch_size", "lr", "lr_schedule", "strength", "seed",
                           "composite_p", "placement_p", "upright", "shadow_p", "exposure", "storage", "energy",
                           "min_score"})


def _recipe(text: str | None) -> dict:
    if not text:
        return {}
    try:
        recipe = json.loads(text)
    except ValueError:
        raise InvalidArgument("recipe must be a JSON object") from None
    if not isinstance(recipe, dict):
        raise InvalidArgument("recipe must be a JSON object")
    unknown = sorted(set(recipe) - RECIPE_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown recipe fields {unknown}; known: {sorted(RECIPE_FIELDS)}")
    return recipe


def _key(value: str | None) -> str | None:
    if value is not None and not 0 < len(value) <= 256:
        raise InvalidArgument("Idempotency-Key must be 1..256 characters")
    return value


def request_hash(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def jobs_router(state) -> APIRouter:
    """The routes, over `state` (`state.jobs`: an `adapters_store.jobs.JobQueue`; `state.registry`, `state.image`,
    `state.config`, and `state.tenant`: the dependency that turns an API key into a tenant name)."""
    router = APIRouter(tags=["jobs"])
    config, tenant = state.config, state.tenant

    @router.post("/v1/subjects", status_code=202)
    async def register_subject(t: str = Depends(tenant), name: str = Form(...), steps: int | None = Form(None),
                               recipe: str | None = Form(None), photos: list[UploadFile] = File(...),
                               idempotency_key: str | None = Header(None)):
        from adapters_store.naming import validate_name

        validate_name(name)
        key = _key(idempotency_key)
        steps = config.train_steps if steps is None else steps
        if not 1 <= steps <= config.train_steps:
            raise InvalidArgument(f"steps must be in 1..{config.train_steps}")
        overrides = _recipe(recipe)
        if not 1 <= len(photos) <= config.max_photos:
            raise InvalidArgument(f"send 1..{config.max_photos} photos (2-4 recommended), got {len(photos)}")
        data = [await p.read() for p in photos]
        for i, (p, raw) in enumerate(zip(photos, data)):
            state.image(raw, f"photo {i} ({p.filename})")   # decodable and within limits, before anything is stored
        digest = request_hash(name, steps, overrides, *data)
        if key is not None and (found := state.jobs.by_key(t, key, digest)) is not None:
            return found.public()   # a retry: the first answer
        if state.registry.for_tenant(t).exists(name) or state.jobs.pending(t, name):
            raise VersionExists(f"subject {name!r} already exists or is being trained")
        job, _ = state.jobs.submit(t, name, data, steps, overrides, idempotency_key=key, request_hash=digest,
                                   admit=lambda mine, total: config.check_job_quota(t, mine, total))  # else 429
        return job.public()

    def found(job, job_id: str):
        if job is None:  # unknown, or another tenant's: the same answer
            raise HTTPException(404, f"job {job_id!r} not found")
        return job

    @router.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, t: str = Depends(tenant)):
        return found(state.jobs.get(t, job_id), job_id).public()

    @router.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: str, t: str = Depends(tenant)):
        job = found(state.jobs.cancel(t, job_id), job_id)
        if job.state != "cancelled":
            return JSONResponse({"detail": f"job {job_id!r} has ended ({job.state})", "job": job.public()}, 409)
        return job.public()

    return router


def replay_place(state, tenant: str, key: str | None, body) -> tuple[str | None, Response | None]:
    """For `POST /v1/place` with an `Idempotency-Key`: (the request's hash, the stored first answer or None)."""
    if _key(key) is None:
        return None, None
    digest = request_hash(body.model_dump())
    stored = state.replies.get(tenant, key, digest)
    if stored is None:
        return digest, None
    return digest, Response(stored.body, status_code=stored.status, media_type=stored.media_type,
                            headers=dict(stored.headers))


def store_place(state, tenant: str, key: str | None, digest: str | None, response: Response) -> Response:
    """Keep a placement's answer (not a 5xx: those may be retried) and return the first one stored."""
    if key is None or digest is None or response.status_code >= 500:
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower().startswith("x-")}
    stored = state.replies.put(tenant, key, digest, response.status_code, response.media_type or "application/json",
                               bytes(response.body), headers)
    return Response(stored.body, status_code=stored.status, media_type=stored.media_type, headers=dict(stored.headers))
