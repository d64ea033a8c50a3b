"""`subjectpaint serve` as a child process on loopback, for examples, benches and tests.

    with local_server("--base", "tiny", "--registry", url, port=8790) as base_url:
        httpx.get(f"{base_url}/health")

The server runs in its own process group (LitServe starts worker processes), is waited for until `/health`
answers, and the whole group is stopped on exit: SIGTERM, then SIGKILL after 30 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager


@contextmanager
def local_server(*options: str, port: int, env: dict | None = None, timeout: float = 180.0):
    """Start `subjectpaint serve --port PORT OPTIONS...`, yield its base URL once healthy, stop it on exit."""
    cmd = [sys.executable, "-m", "subjectpaint.cli", "serve", "--port", str(port), *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout, proc)
        yield url
    finally:
        _stop(proc)


def wait_healthy(url: str, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `url/health` until it answers 200; fail early if `proc` (the server, when we started it) exits."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"`subjectpaint serve` exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"`subjectpaint serve` at {url} was not healthy within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its LitServe worker processes (one process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
