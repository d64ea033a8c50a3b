"""`subjectpaint serve`: the HTTP API (LitServe + FastAPI) over a Studio and a tenant-scoped registry.

    from subjectpaint.serve import ServeConfig, build_server, run
    server, state = build_server(ServeConfig(base="tiny"))
    run(server, state, port=8000)   # until SIGTERM / SIGINT; then drains, stops its workers, returns

Endpoints (API key in `X-API-Key`, bound to one tenant): `POST /v1/subjects` (multipart: name, photos[], steps;
202 + a job), `GET|DELETE /v1/jobs/{id}`, `GET /v1/subjects`, `GET|DELETE /v1/subjects/{ref}`, `POST /v1/place` (JSON,
returns PNG), `GET /openapi.json` (any key), `GET /metrics` and `/info` (a key of the operators' tenant),
`GET /health` (no key), `GET /ui` (the studio page; it asks for a key). `POST /v1/subjects` and `POST /v1/place`
take an `Idempotency-Key` header (a retry gets the first answer).
"""

from __future__ import annotations

from .config import ServeConfig


def build_server(config: ServeConfig):
    """A LitServer whose app carries every route; returns (server, state)."""
    import litserve as ls

    from ..quiet import quiet_third_party
    from .app import Drain, Gate, ServeState, add_routes
    from .worker import PlaceAPI

    quiet_third_party()  # a server log holds requests and errors, not a progress bar per model load or job
    api = PlaceAPI(config)
    drain = Drain(config.drain_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=config.request_timeout,
                          max_payload_size=config.max_upload_bytes, disable_openapi_url=True,
                          middlewares=[(Gate, {"max_bytes": config.max_upload_bytes, "drain": drain})])
    state = ServeState(config, server, api, drain)
    add_routes(server.app, state)
    if config.worker:  # jobs are trained in this process too (`--no-worker`: only by `subjectpaint worker`s)
        from .jobs import EmbeddedWorker

        state.worker = EmbeddedWorker(config).start()
    return server, state


def run(server, state, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", sock=None) -> None:
    """Serve until SIGTERM / SIGINT, then stop cleanly (`lifecycle.run`); a busy port raises `AddressInUse`."""
    from .lifecycle import run as run_

    run_(server, state, host=host, port=port, log_level=log_level, sock=sock)


__all__ = ["ServeConfig", "build_server", "run"]
