"""Schema-driven fuzz of the HTTP API: Hypothesis strategies built from the app's own OpenAPI description (every
route, its path / query parameters, JSON and multipart bodies), mixed with hostile values (NaN, Infinity, 2^63,
Unicode, bad base64, decompression bombs, missing and extra fields) and valid, wrong, malformed or missing keys of
two tenants. Goal: 0 answers >= 500, the server healthy at the end, and no tenant's subject or job visible to
another.

    python bench/fuzz_api.py [--requests 3000] [--seed 0] [--quick]

Runs an in-process server (LitServe worker + FastAPI TestClient) on the tiny base over a temporary registry; the
last line is JSON: requests, status histogram, server_errors, leaks, healthy, goal_met. `tests/test_fuzz_api.py`
runs the same generator at CI size.
"""

from __future__ import annotations

import argparse
import functools
import base64
import io
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote, unquote

import PIL.Image
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

HOSTILE = st.one_of(st.none(), st.booleans(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
                    st.integers(-2**70, 2**70), st.sampled_from([2**63, 2**63 - 1, -1, 0]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.lists(st.integers(), max_size=2))
UNICODE = "tasse-bleue-ü☕"  # a valid name outside Latin-1
SUBJECTS = (("acme", "mug", 1), ("acme", UNICODE, 2), ("globex", "vase", 3))
NAMES = st.one_of(st.sampled_from(["mug", "vase", UNICODE, "../etc", "a@b", "", " ", "x" * 300]),
                  st.text(min_size=1, max_size=24))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def images():
    """Valid and hostile image bytes: small PNGs, a 10000 x 10000 bomb, a huge side, random bytes, nothing."""
    return st.one_of(st.builds(lambda c, s: _png(PIL.Image.new("RGB", (s, s), (c, 80, 160))), st.integers(0, 255),
                               st.sampled_from([8, 32])),
                     st.just(_png(PIL.Image.new("1", (10000, 10000)))), st.just(_png(PIL.Image.new("L", (4000, 1)))),
                     st.binary(max_size=64))


class Cases:
    """Request strategies from an OpenAPI document. `ctx` holds what the run learns (tenants' keys, job ids)."""

    def __init__(self, schema: dict, ctx: dict):
        self.schema, self.ctx = schema, ctx
        self.ops = [(path, method, op) for path, item in schema["paths"].items() for method, op in item.items()]
        self.ops += [("/openapi.json", "get", {}), ("/docs", "get", {}), ("/health", "get", {}),
                     ("/internal/place", "post", {}), ("/v1/subjects", "put", {})]

    def resolve(self, s: dict) -> dict:
        while "$ref" in s:
            s = self.schema["components"]["schemas"][s["$ref"].rsplit("/", 1)[1]]
        return s

    def value(self, s: dict, name: str = ""):
        """Mostly (3 in 4) what the schema asks for, sometimes anything."""
        valid = self.valid(s, name)
        return st.one_of(valid, valid, valid, HOSTILE)

    def valid(self, s: dict, name: str = ""):
        s = self.resolve(s)
        if name in ("room", "mask"):
            fits = st.just(self.ctx[name])  # the room / mask that fit together
            return st.one_of(fits, fits, fits, images().map(lambda b: base64.b64encode(b).decode()),
                             st.text(max_size=8))
        if name in ("subject", "ref", "after", "prefix", "name"):
            known = st.sampled_from(["mug", "mug@1", UNICODE, f"{UNICODE}@1", "vase", "vase@1"])
            return st.one_of(known, known, NAMES, NAMES.map(lambda n: f"{n}@1"),
                             st.sampled_from([f"mug@{2**63}", "mug@0", "mug@latest"]))
        if "enum" in s:
            return st.sampled_from(s["enum"])
        if "anyOf" in s:
            return st.one_of([self.valid(x, name) for x in s["anyOf"]])
        kind = s.get("type")
        if kind == "integer":
            return st.integers(int(s.get("minimum", -2**64)), int(s.get("exclusiveMaximum", 2**64)))
        if kind == "number":
            return st.floats(s.get("minimum", -1e6), s.get("maximum", 1e6))
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            return st.lists(self.valid(s.get("items", {}), name), max_size=3)
        if kind == "object":
            props, required = s.get("properties", {}), set(s.get("required", ()))
            return st.fixed_dictionaries({k: self.value(v, k) for k, v in props.items() if k in required},
                                         optional={k: self.value(v, k) for k, v in props.items()
                                                   if k not in required} | {"extra": HOSTILE})
        return st.text(max_size=24)

    def key(self):
        keys = self.ctx["keys"]
        return st.sampled_from([("acme", keys["acme"]), ("globex", keys["globex"]), ("admin", keys["admin"]),
                                ("acme", keys["acme"]), ("globex", keys["globex"]),
                                (None, None), (None, "sp_" + "A" * 43), (None, "hello"), (None, "sp_ü" * 15)])

    def case(self):
        return st.tuples(st.sampled_from(self.ops), self.key(), st.data())

    def build(self, op, data) -> dict:
        path, method, spec = op
        url, query = path, {}
        for p in spec.get("parameters", []):
            if p["in"] == "path":
                value = data.draw(self.valid(p["schema"], p["name"]))
                if self.ctx["job_ids"] and data.draw(st.booleans()):  # a job id seen so far (any tenant's)
                    value = self.ctx["job_ids"][data.draw(st.integers(0, 2**16)) % len(self.ctx["job_ids"])]
                url = url.replace("{" + p["name"] + "}", quote(str(value), safe=""))
            elif p["in"] == "query" and data.draw(st.booleans()):
                query[p["name"]] = data.draw(self.value(p["schema"], p["name"]))
        out = {"method": method, "url": url, "params": {k: str(v) for k, v in query.items()}}
        content = spec.get("requestBody", {}).get("content", {})
        if "application/json" in content:
            body = data.draw(self.value(content["application/json"]["schema"]))
            out["content"] = json.dumps(body, ensure_ascii=data.draw(st.booleans())).encode()
            out["headers"] = {"Content-Type": "application/json"}
        elif "multipart/form-data" in content:
            form = self.resolve(content["multipart/form-data"]["schema"])
            fields = {k: data.draw(self.value(v, k)) for k, v in form["properties"].items() if k != "photos"}
            out["data"] = {k: str(v) for k, v in fields.items() if v is not None}
            photos = data.draw(st.lists(images(), max_size=5))
            out["files"] = [("photos", (f"p{i}.png", b, "image/png")) for i, b in enumerate(photos)]
        return out


def send(client, request: dict, key: str | None):
    headers = dict(request.pop("headers", {}))
    if key is not None:
        headers["X-API-Key"] = key
    try:
        return client.request(request.pop("method").upper(), request.pop("url"), headers=headers, **request)
    except UnicodeEncodeError:  # a key httpx cannot put in a header: the client's error, not a request
        return None


def fuzz(client, schema: dict, ctx: dict, n: int, seed_value: int = 0) -> dict:
    """Send `n` generated requests; returns the histogram and the violations found."""
    statuses, server_errors, leaks, seconds = Counter(), [], [], Counter()
    cases = Cases(schema, ctx)

    @seed(seed_value)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases.case())
    def one(case):
        op, (tenant, key), data = case
        request = cases.build(op, data)
        shown = f"{request['method'].upper()} {request['url']}"
        started = time.perf_counter()
        r = send(client, request, key)
        seconds[f"{op[1].upper()} {op[0]}"] += time.perf_counter() - started
        if r is None:
            return
        statuses[r.status_code] += 1
        if r.status_code >= 500:
            server_errors.append(f"{shown} -> {r.status_code} {r.text[:200]}")
        elif 200 <= r.status_code < 300 and tenant is not None:
            leaks.extend(_leaks(ctx, tenant, op[0], r, shown))

    one()
    return {"statuses": statuses, "server_errors": server_errors, "leaks": leaks, "route_seconds": seconds}


def _leaks(ctx: dict, tenant: str, path: str, r, shown: str) -> list[str]:
    """A 2xx answer to `tenant` that names another tenant's subject or job."""
    refs, out = [], []
    if r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        if path == "/v1/subjects" and isinstance(body, dict) and "subjects" in body:
            refs = [s["ref"] for s in body["subjects"]]
        elif path.startswith("/v1/subjects") and isinstance(body, dict) and isinstance(body.get("ref"), str):
            refs = [body["ref"]]
        if isinstance(body, dict) and "id" in body and "state" in body:  # a job
            if r.request.method == "POST":
                ctx["jobs"].setdefault(tenant, set()).add(body["id"])
                ctx["job_ids"].append(body["id"])
                ctx["names"][tenant].add(body["name"])
            elif body["id"] not in ctx["jobs"].get(tenant, set()):
                out.append(f"{shown}: job {body['id']} of another tenant")
            if body.get("ref") and body["ref"] not in refs:
                refs.append(body["ref"])
    if "x-subject" in r.headers:
        refs.append(unquote(r.headers["x-subject"]))
    for ref in refs:
        if ref.rsplit("@", 1)[0] not in ctx["names"][tenant]:
            out.append(f"{shown}: {tenant} was shown {ref!r}")
    return out


def check_isolation(client, ctx: dict) -> list[str]:
    """After the run: each tenant's list is its own, and the other's subjects look like nothing."""
    out = []
    for tenant, other in (("acme", "globex"), ("globex", "acme")):
        key = {"X-API-Key": ctx["keys"][tenant]}
        subjects = client.get("/v1/subjects", params={"limit": 1000}, headers=key).json()["subjects"]
        listed = {s["name"] for s in subjects}
        if not listed <= ctx["names"][tenant]:
            out.append(f"{tenant} lists {sorted(listed - ctx['names'][tenant])}")
        for name in ctx["names"][other] - ctx["names"][tenant]:
            if client.get(f"/v1/subjects/{quote(name, safe='')}", headers=key).status_code != 404:
                out.append(f"{tenant} sees {other}'s {name!r}")
        for job in ctx["jobs"].get(other, ()):
            if client.get(f"/v1/jobs/{job}", headers=key).status_code != 404:
                out.append(f"{tenant} sees {other}'s job {job}")
    return out


def context(keys: dict, scene) -> dict:
    return {"keys": keys, "names": {"acme": {"mug", UNICODE}, "globex": {"vase"}, "admin": set()}, "jobs": {}, "job_ids": [],
            "room": base64.b64encode(_png(scene.room)).decode(), "mask": base64.b64encode(_png(scene.mask)).decode()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 requests (CI smoke run, < 1 min)")
    args = parser.parse_args(argv)
    n = 300 if args.quick else args.requests
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench._stats import finish
    from tests.serve_helpers import served

    with tempfile.TemporaryDirectory() as tmp, served(Path(tmp), SUBJECTS, place_rate=1000.0, place_burst=1000,
                                                      max_jobs_per_tenant=2) as env:
        client = env["client"]
        ctx = context(env["keys"], env["scene"])
        schema = client.get("/openapi.json", headers={"X-API-Key": env["keys"]["acme"]}).json()
        started = time.perf_counter()
        result = fuzz(client, schema, ctx, n, args.seed)
        seconds = time.perf_counter() - started
        leaks = result["leaks"] + check_isolation(client, ctx)
        healthy = client.get("/health").status_code == 200
    print("seconds per route:", {k: round(v, 1) for k, v in result["route_seconds"].most_common()}, file=sys.stderr)
    for line in result["server_errors"][:20] + leaks[:20]:
        print(line, file=sys.stderr)
    out = {"bench": "fuzz_api", "date": time.strftime("%Y-%m-%d"), "requests": sum(result["statuses"].values()),
           "seconds": round(seconds, 1), "statuses": dict(sorted(result["statuses"].items())),
           "server_errors": len(result["server_errors"]), "leaks": len(leaks), "healthy": healthy, "seed": args.seed}
    finish(out, {"server_errors": "== 0", "leaks": "== 0", "healthy": "== 1"})  # goals, goal_met, the JSON line
    return 0 if out["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
