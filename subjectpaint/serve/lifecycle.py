"""Start and stop a serve process cleanly: our own small replacement for `LitServer.run`.

LitServe 0.2's `run` cannot stop a server whose API server is a thread (its shutdown calls `Thread.terminate`,
which does not exist, and leaves uvicorn listening), and its `multiprocessing.Manager` is forked after nothing
binds, so with a process API server an orphan can keep the port after the main process is killed. Here:

1. the port is bound first, so a busy port is refused in one line before any model is loaded;
2. LitServe's queues (a spawned, not forked, manager) and inference workers start; every child asks the kernel to
   SIGTERM it when this process dies (Linux `PR_SET_PDEATHSIG`), so a SIGKILL of the server leaves no orphan;
3. uvicorn runs in the main thread and owns SIGTERM / SIGINT: it stops accepting, lets the app drain (in-flight
   placements get `drain_timeout` seconds, then a 503), and waits for every connection to be answered;
4. the registration jobs are stopped at their next step (checkpointed where they keep a workdir), the inference
   workers and the manager are stopped, and `run` returns: the process exits 0 with the port released.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing as mp
import multiprocessing.managers
import signal
import socket
import sys

import uvicorn

from ..errors import AddressInUse

log = logging.getLogger("subjectpaint.serve")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # no libc prctl: nothing to ask
            pass


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or `AddressInUse` with one line that says what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a stopped server is no obstacle
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{host}:{port} is already in use (another server?); stop it or pick --port") from None
        raise AddressInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the app when a stop signal arrives (before it stops accepting)."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame):
        self._on_exit()
        super().handle_exit(sig, frame)


def _start_workers(server) -> mp.managers.SyncManager:
    """LitServe's `_init_manager` + `launch_inference_worker` for one API server, with a spawned manager."""
    from litserve.transport.factory import create_transport_from_config

    manager = mp.managers.SyncManager(ctx=mp.get_context("spawn"))
    manager.start(die_with_parent)
    server.transport_config.manager = manager
    server.transport_config.num_consumers = 1
    server.workers_setup_status = manager.dict()
    server._shutdown_event = manager.Event()
    for lit_api in server.litapi_connector:
        server.litapi_request_queues[lit_api.api_path] = manager.Queue()
    if server._logger_connector._loggers:
        server.logger_queue = manager.Queue()
    server._logger_connector.run(server)
    server._transport = create_transport_from_config(server.transport_config)
    server.inference_workers = [w for api in server.litapi_connector for w in server.launch_inference_worker(api)]
    server.verify_worker_status()  # raises when a worker failed its setup
    server.app.response_queue_id = 0
    return manager


def _stop_workers(server, manager, timeout: float = 5.0) -> None:
    transport = getattr(server, "_transport", None)
    if transport is not None:
        try:
            transport.close(send_sentinel=False)
        except Exception:  # noqa: BLE001 - the manager may be gone already; the workers are stopped below anyway
            pass
    for worker in getattr(server, "inference_workers", []):
        worker.terminate()
    for worker in getattr(server, "inference_workers", []):
        worker.join(timeout)
        if worker.is_alive():
            worker.kill()
            worker.join()
    manager.shutdown()


def run(server, state, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
        sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM / SIGINT, then stop everything this process started (see the module docstring).
    `sock`: a socket from `bind` (the CLI binds before it prints its banner); by default (host, port) is bound."""
    sock = sock if sock is not None else bind(host, port)
    manager = None
    try:
        manager = _start_workers(server)
        config = uvicorn.Config(server.app, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=state.config.drain_timeout + 5)
        uv = _Uvicorn(config, state.begin_drain)
        stop = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if stop is signal.SIG_DFL else stop)  # uvicorn re-raises it
        try:
            uv.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled
            pass
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            state.close()
    finally:
        sock.close()
        if manager is not None:
            _stop_workers(server, manager)
