"""`subjectpaint serve`: the HTTP API (LitServe + FastAPI) over a Studio and a tenant-scoped registry.

    from subjectpaint.serve import ServeConfig, build_server
    server, state = build_server(ServeConfig(base="tiny"))
    run(server, port=8000)

Endpoints (API key in `X-API-Key`, bound to one tenant): `POST /v1/subjects` (multipart: name, photos[], steps;
202 + a job), `GET|DELETE /v1/jobs/{id}`, `GET /v1/subjects`, `GET|DELETE /v1/subjects/{ref}`, `POST /v1/place` (JSON,
returns PNG), `GET /health`, `GET /metrics` (Prometheus text), `GET /ui` (the studio page).
"""

from __future__ import annotations

from .config import ServeConfig


def build_server(config: ServeConfig):
    """A LitServer whose app carries every route; returns (server, state)."""
    import litserve as ls

    from .app import Gate, ServeState, add_routes
    from .worker import PlaceAPI

    api = PlaceAPI(config)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=config.request_timeout,
                          max_payload_size=config.max_upload_bytes, middlewares=[(Gate,
                                                                                 {"max_bytes": config.max_upload_bytes})])
    state = ServeState(config, server, api)
    add_routes(server.app, state)
    if config.worker:  # jobs are trained in this process too (`--no-worker`: only by `subjectpaint worker`s)
        from .jobs import EmbeddedWorker

        state.worker = EmbeddedWorker(config).start()
    return server, state


def run(server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    server.run(host=host, port=port, log_level=log_level, generate_client_file=False, api_server_worker_type="thread")


__all__ = ["ServeConfig", "build_server", "run"]
