"""The same flow through the HTTP API: register a product from photos (a background job), poll it, place it.

    subjectpaint tenants add acme && KEY=$(subjectpaint tenants key acme)
    subjectpaint serve &  python examples/http_client.py --url http://127.0.0.1:8000 --key $KEY
    python examples/http_client.py --serve --tiny --steps 2     # starts a local server itself (loopback)
"""
import argparse
import base64
import contextlib
import io
import os
import sys
import tempfile
import time

import httpx

from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene, product_photos
from subjectpaint.serve.local import local_server, wait_healthy


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def fresh_server(args):
    """A server on loopback over a fresh registry (removed afterwards), and an API key for tenant 'demo'."""
    from adapters_store import Registry

    with tempfile.TemporaryDirectory(prefix="subjectpaint-http-") as home:
        url, blobs = f"sqlite:///{home}/registry.db", f"{home}/blobs"
        with Registry(url, blobs) as registry:
            registry.create_tenant("demo")
            args.key = registry.issue_key("demo")
        options = ["--registry", url, "--blobs", blobs, "--train-steps", str(args.steps)]
        with local_server(*options, *(["--base", "tiny", "--steps", "2"] if args.tiny else []),
                          port=args.port) as base_url:
            yield base_url


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=os.environ.get("SUBJECTPAINT_API_KEY"))
    p.add_argument("--serve", action="store_true", help="start a local server (and a tenant) for this run")
    p.add_argument("--tiny", action="store_true", help="with --serve: a random tiny base")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--steps", type=int, default=150, help="training steps")
    p.add_argument("--out", default="example-out")
    args = p.parse_args(argv)
    with fresh_server(args) if args.serve else contextlib.nullcontext(args.url) as url:
        wait_healthy(url)  # also a server started beside this script (`subjectpaint serve & python ...`)
        with httpx.Client(base_url=url, headers={"X-API-Key": args.key}, timeout=120) as client:
            photos = [s.image for s in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[0]), 3)]
            files = [("photos", (f"photo{i}.png", png(im), "image/png")) for i, im in enumerate(photos)]
            job = client.post("/v1/subjects", data={"name": "blue-mug", "steps": str(args.steps)}, files=files)
            job.raise_for_status()
            job = job.json()
            while job["state"] not in ("done", "failed"):
                time.sleep(0.5)
                job = client.get(f"/v1/jobs/{job['id']}").json()
                print(f"training {job['name']}: {job['state']} {100 * job['progress']:.0f}%")
            if job["state"] == "failed":
                sys.exit(f"training failed: {job['error']}")
            scene = make_scene(EVAL_SEEDS[0], 64)
            r = client.post("/v1/place", json={"subject": job["ref"], "room": base64.b64encode(png(scene.room)).decode(),
                                               "mask": base64.b64encode(png(scene.mask)).decode(),
                                               "session": "progressive", "seed": 0})
            r.raise_for_status()
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "placed_http.png")
            with open(path, "wb") as f:
                f.write(r.content)
            print(f"placed {job['ref']}: wrote {path} ({len(r.content)} bytes)")


if __name__ == "__main__":
    main()
