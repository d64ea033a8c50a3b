"""`subjectpaint serve` in-process (LitServe worker + FastAPI TestClient) on the tiny base: placements and mixed
batches, registration jobs, tenant isolation on every endpoint, bad requests (4xx, server keeps serving), metrics."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("litserve")
from fastapi.testclient import TestClient  # noqa: E402
from litserve.utils import wrap_litserve_start  # noqa: E402

from subjectpaint.serve import ServeConfig, build_server  # noqa: E402

from .serve_helpers import b64, photos, png, served  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    subjects = (("acme", "mug", 1), ("acme", "lamp", 2), ("globex", "vase", 3))
    with served(tmp_path_factory.mktemp("serve"), subjects, raise_server_exceptions=True, max_jobs=2,
                batch_timeout=0.3) as env:
        yield env


def place_body(env, subject="mug", **extra):
    scene = env["scene"]
    return {"subject": subject, "room": b64(scene.room), "mask": b64(scene.mask), "seed": 1, **extra}


def h(env, tenant="acme"):
    return {"X-API-Key": env["keys"][tenant]}


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.int16)


def test_place_mixed_batch_equals_each_request_alone(env):
    client, scene = env["client"], env["scene"]
    alone = {}
    for name, seed in (("mug", 1), ("lamp", 2)):
        r = client.post("/v1/place", json=place_body(env, name, seed=seed), headers=h(env))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert r.headers["x-batch-rows"] == "1"
        alone[name] = pixels(r.content)
    room, inside = np.asarray(scene.room, dtype=np.int16), np.asarray(scene.mask) > 127
    assert np.abs(alone["mug"] - room)[inside].max() > 0                     # placed inside the mask
    far = ~np.asarray(scene.mask.resize((32, 32)).filter(__import__("PIL.ImageFilter").ImageFilter.MaxFilter(15)))
    assert np.array_equal(alone["mug"][far > 127], room[far > 127])          # the room's own pixels far outside
    assert np.abs(alone["mug"] - alone["lamp"])[inside].max() > 0            # two subjects, two adapters

    results, barrier = {}, threading.Barrier(4)

    def send(i, name, seed):
        barrier.wait()
        results[i] = client.post("/v1/place", json=place_body(env, name, seed=seed), headers=h(env))

    threads = [threading.Thread(target=send, args=(i, n, s)) for i, (n, s) in
               enumerate([("mug", 1), ("lamp", 2), ("mug", 1), ("lamp", 2)])]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(r.status_code == 200 for r in results.values())
    assert max(int(r.headers["x-batch-rows"]) for r in results.values()) >= 2   # batched together
    for i, name in enumerate(["mug", "lamp", "mug", "lamp"]):
        assert np.abs(pixels(results[i].content) - alone[name]).max() <= 1     # same as alone (float rounding)


@pytest.mark.parametrize("session", ["progressive", "dual"])
def test_sessions_return_pngs_of_the_room_size(env, session):
    r = env["client"].post("/v1/place", json=place_body(env, session=session), headers=h(env))
    assert r.status_code == 200, r.text
    assert PIL.Image.open(io.BytesIO(r.content)).size == env["scene"].room.size


def test_register_runs_as_a_job_with_progress_then_places(env):
    client = env["client"]
    files = [("photos", (f"p{i}.png", png(p), "image/png")) for i, p in enumerate(photos(4))]
    r = client.post("/v1/subjects", data={"name": "cup", "steps": "3"}, files=files, headers=h(env))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["steps"] == 3
    for _ in range(600):
        job = client.get(f"/v1/jobs/{job['id']}", headers=h(env)).json()
        if job["state"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert job["state"] == "done" and job["ref"] == "cup@1" and job["progress"] == 1.0, job
    refs = [s["ref"] for s in client.get("/v1/subjects", headers=h(env)).json()["subjects"]]
    assert "cup@1" in refs and "vase@1" not in refs
    assert client.post("/v1/place", json=place_body(env, "cup"), headers=h(env)).status_code == 200
    again = client.post("/v1/subjects", data={"name": "cup"}, files=files, headers=h(env))
    assert again.status_code == 409


def test_tenants_are_isolated_on_every_endpoint(env):
    client, reg = env["client"], env["reg"]
    before = {t: [r.ref for r in reg.for_tenant(t).list()] for t in ("acme", "globex")}
    files = [("photos", ("p.png", png(photos(1)[0]), "image/png"))]
    job = client.post("/v1/subjects", data={"name": "teapot", "steps": "1"}, files=files, headers=h(env)).json()
    calls = [
        ("get", "/v1/subjects", {}), ("get", "/v1/subjects/mug", {}), ("get", "/v1/subjects/mug@1", {}),
        ("delete", "/v1/subjects/mug", {}), ("delete", "/v1/subjects/mug@1", {}),
        ("post", "/v1/place", {"json": place_body(env, "mug")}), ("get", f"/v1/jobs/{job['id']}", {}),
        ("post", "/v1/subjects", {"data": {"name": "x", "steps": "1"}, "files": files}),
    ]
    bad_keys = {"missing": {}, "wrong": {"X-API-Key": "sp_" + "A" * 43}, "malformed": {"X-API-Key": "hello"},
                "bearer-wrong": {"Authorization": "Bearer sp_" + "B" * 43}}
    for method, path, kw in calls:
        for label, headers in bad_keys.items():
            r = getattr(client, method)(path, headers=headers, **kw)
            assert r.status_code == 401, (method, path, label, r.status_code)
            assert "detail" in r.json()
    # another tenant's key: acme's things look exactly like things that do not exist
    other = h(env, "globex")
    for ref in ("mug", "mug@1"):
        for method in ("get", "delete"):
            theirs = getattr(client, method)(f"/v1/subjects/{ref}", headers=other)
            unknown = getattr(client, method)(f"/v1/subjects/{ref.replace('mug', 'zzz')}", headers=other)
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.json()["detail"].replace("mug", "zzz") == unknown.json()["detail"]
    assert client.post("/v1/place", json=place_body(env, "mug"), headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert [s["ref"] for s in client.get("/v1/subjects", headers=other).json()["subjects"]] == ["vase@1"]
    # nothing changed (the teapot job is acme's own)
    after = {t: [r.ref for r in reg.for_tenant(t).list()] for t in ("acme", "globex")}
    assert after["globex"] == before["globex"]
    assert set(after["acme"]) - {"teapot@1"} == set(before["acme"]) - {"teapot@1"}
    # Authorization: Bearer works the same as X-API-Key
    r = client.get("/v1/subjects", headers={"Authorization": f"Bearer {env['keys']['acme']}"})
    assert r.status_code == 200 and "mug@1" in [s["ref"] for s in r.json()["subjects"]]


def test_bad_requests_are_4xx_and_the_server_keeps_serving(env):
    client, scene = env["client"], env["scene"]
    noise = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (250, 250, 3), dtype=np.uint8))
    cases = [
        (413, client.post("/v1/place", json=place_body(env, room=b64(noise)), headers=h(env))),  # > 100 kB body
        (413, client.post("/v1/subjects", data={"name": "big"}, headers=h(env),
                          files=[("photos", ("p.png", png(noise), "image/png"))])),
        (422, client.post("/v1/place", json=place_body(env, room=base64.b64encode(b"not an image").decode()),
                          headers=h(env))),
        (422, client.post("/v1/place", json=place_body(env, room="%%%not base64"), headers=h(env))),
        (422, client.post("/v1/place", json=place_body(env, mask=b64(scene.mask.resize((20, 40)))), headers=h(env))),
        (422, client.post("/v1/place", json=place_body(env, room=b64(PIL.Image.new("RGB", (300, 8)))),
                          headers=h(env))),                                                     # over max_side
        (404, client.post("/v1/place", json=place_body(env, "no-such-subject"), headers=h(env))),
        (422, client.post("/v1/place", json=place_body(env, "../etc/passwd"), headers=h(env))),
        (422, client.post("/v1/place", content=b'{"subject": "mug", "room":', headers={
            **h(env), "content-type": "application/json"})),                                       # malformed JSON
        (422, client.post("/v1/place", json={"subject": "mug"}, headers=h(env))),                  # fields missing
        (422, client.post("/v1/place", json=place_body(env, steps=999), headers=h(env))),
        (422, client.post("/v1/place", json=place_body(env, session="magic"), headers=h(env))),
        (422, client.post("/v1/subjects", data={"name": "junk"}, headers=h(env),
                          files=[("photos", ("p.png", b"GIF89a garbage", "image/png"))])),
        (422, client.post("/v1/subjects", data={"name": "a/b"}, headers=h(env),
                          files=[("photos", ("p.png", png(photos(1)[0]), "image/png"))])),
        (422, client.post("/v1/subjects", data={"name": "many"}, headers=h(env),
                          files=[("photos", (f"{i}.png", png(photos(1)[0]), "image/png")) for i in range(5)])),
        (422, client.get("/v1/subjects/mug@0", headers=h(env))),
        (404, client.post("/internal/place", json={"tenant": "acme"})),              # the worker route is private
    ]
    for i, (status, r) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text[:300])
        assert isinstance(r.json()["detail"], (str, list)) and r.json()["detail"], i
    refs = [s["ref"] for s in client.get("/v1/subjects", headers=h(env)).json()["subjects"]]
    assert not {"big@1", "junk@1", "many@1"} & set(refs)                                      # nothing written
    assert client.get("/health").status_code == 200
    assert client.post("/v1/place", json=place_body(env), headers=h(env)).status_code == 200


def test_metrics_report_latency_swaps_and_queue(env):
    client = env["client"]
    client.post("/v1/place", json=place_body(env), headers=h(env))
    text = client.get("/metrics", headers=h(env, "admin")).text  # the operators' tenant
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["subjectpaint_place_latency_seconds_count"] >= 1
    assert values["subjectpaint_queue_depth"] == 0
    assert values["subjectpaint_swap_misses_total"] >= 1 and values["subjectpaint_swap_hits_total"] >= 1
    assert values['subjectpaint_requests_total{route="/v1/place",status="200"}'] >= 1


def test_unbatched_server_places_too(tmp_path, env):
    """max_batch_size=1 (LitServe's unbatched loop hands predict one request, not a list)."""
    config = ServeConfig(base="tiny", registry_url=env["reg"].url.render_as_string(hide_password=False),
                         blobs=env["reg"].blobs.url, max_batch_size=1, place_steps=2)
    server, _ = build_server(config)
    with wrap_litserve_start(server) as server, TestClient(server.app) as client:
        r = client.post("/v1/place", json=place_body(env), headers=h(env))
        assert r.status_code == 200 and r.headers["x-batch-rows"] == "1", r.text
        assert client.post("/v1/place", json=place_body(env, "vase"), headers=h(env)).status_code == 404
