"""An in-process `subjectpaint serve` (LitServe worker + FastAPI TestClient) on the tiny base, with tenants, keys and
subjects, for the serving, hardening and fuzz tests."""

from __future__ import annotations

import base64
import io
import time
from contextlib import contextmanager

from adapters_store import Registry
from subjectpaint import Studio, Subject
from subjectpaint.base import ExemplarInpainter
from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene, product_photos

TENANTS = ("acme", "globex", "admin")


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(image) -> str:
    return base64.b64encode(png(image)).decode()


def photos(k: int):
    return [p.image.resize((32, 32)) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[k]), 2)]


@contextmanager
def served(tmp, subjects=(("acme", "mug", 1), ("globex", "vase", 3)), *, raise_server_exceptions=False, **config):
    """Yield dict(client, keys, reg, scene, state): a running in-process server over a fresh registry in `tmp`
    (`config`: ServeConfig fields over the defaults below; `raise_server_exceptions` goes to the TestClient)."""
    from fastapi.testclient import TestClient
    from litserve.utils import wrap_litserve_start

    from subjectpaint.serve import ServeConfig, build_server

    url, blobs = f"sqlite:///{tmp}/registry.db", str(tmp / "blobs")
    reg = Registry(url, blobs)
    keys = {}
    for tenant in TENANTS:
        reg.create_tenant(tenant)
        keys[tenant] = reg.issue_key(tenant)
    base = ExemplarInpainter.tiny(0)
    for tenant, name, k in subjects:
        view = reg.for_tenant(tenant)
        Subject.train(photos(k), name, Studio(base, registry=view), registry=view, steps=2, batch_size=2,
                      detector=None, progress=False)
    options = dict(base="tiny", registry_url=url, blobs=blobs, train_steps=3, train_batch_size=2,
                   max_upload_bytes=100_000, max_side=256, max_photos=4, max_jobs=4, max_batch_size=4,
                   batch_timeout=0.05, place_steps=2, max_place_steps=8, torch_threads=1)
    server, state = build_server(ServeConfig(**{**options, **config}))
    with wrap_litserve_start(server) as server, TestClient(server.app, raise_server_exceptions=raise_server_exceptions) as client:
        for _ in range(1200):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        try:
            yield dict(client=client, keys=keys, reg=reg, scene=make_scene(EVAL_SEEDS[0], 32), state=state)
        finally:
            state.close()
            reg.close()
