"""Defects a hostile but careful user found, one test each: no 5xx for what a client can send, storage faults as
503/507, per-tenant fairness, typed one-line errors for decompression bombs / non-safetensors files / directory
outputs / corrupt checkpoints, key policy of the operators' pages, API key listing and revocation."""

from __future__ import annotations

import base64
import errno
import json
import os
import sqlite3
from urllib.parse import quote

import PIL.Image
import pytest
import torch

pytest.importorskip("litserve")
from sqlalchemy.exc import OperationalError  # noqa: E402

from adapters_store import Registry  # noqa: E402
from subjectpaint import Subject  # noqa: E402
from subjectpaint.cli import main as cli  # noqa: E402
from subjectpaint.errors import InvalidAdapter, InvalidImage, StorageFull, StorageUnavailable  # noqa: E402
from subjectpaint.images import load_image  # noqa: E402

from .serve_helpers import b64, photos, png, served  # noqa: E402

pytestmark = pytest.mark.slow

UNICODE_NAME = "tasse-bleue-ü☕"
HUGE = 2**63


def bomb_png() -> bytes:
    """10000 x 10000 px (100 M pixels) in 12 kB: a 1-bit PNG of one colour."""
    return png(PIL.Image.new("1", (10000, 10000)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    with served(tmp, subjects=(("acme", "mug", 1), ("acme", UNICODE_NAME, 2), ("globex", "vase", 3)),
                max_jobs_per_tenant=1, train_steps=100_000, place_rate=0.5, place_burst=20) as env:
        yield env


def h(env, tenant="acme"):
    return {"X-API-Key": env["keys"][tenant]}


def place_body(env, subject="mug", **extra):
    return {"subject": subject, "room": b64(env["scene"].room), "mask": b64(env["scene"].mask), **extra}


# ------------------------------------------------------------------------------------------------ no 5xx


def test_unicode_subject_names_place_with_a_percent_encoded_header(env):
    r = env["client"].post("/v1/place", json=place_body(env, UNICODE_NAME), headers=h(env))
    assert r.status_code == 200, r.text
    assert r.headers["x-subject"] == quote(f"{UNICODE_NAME}@1", safe="@") and r.headers["x-subject"].isascii()


@pytest.mark.parametrize("call", ["get", "delete", "place", "after"])
def test_versions_past_int64_are_422(env, call):
    client, ref = env["client"], f"mug@{HUGE}"
    r = {"get": lambda: client.get(f"/v1/subjects/{ref}", headers=h(env)),
         "delete": lambda: client.delete(f"/v1/subjects/{ref}", headers=h(env)),
         "place": lambda: client.post("/v1/place", json=place_body(env, ref), headers=h(env)),
         "after": lambda: client.get("/v1/subjects", params={"after": ref}, headers=h(env))}[call]()
    assert r.status_code == 422 and "version" in r.json()["detail"], r.text
    assert client.get(f"/v1/subjects/mug@{HUGE - 1}", headers=h(env)).status_code == 404  # the largest: not there


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_guidance_is_a_422_whose_body_is_json(env, value):
    body = json.dumps(place_body(env)).replace('"mask"', f'"guidance_scale": {value}, "mask"')
    r = env["client"].post("/v1/place", content=body, headers={**h(env), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "guidance_scale"]


def test_storage_faults_are_503_or_507_never_422(env, monkeypatch):
    view = env["state"].registry.for_tenant("acme")

    class Refusing:
        def __init__(self, message):
            self.message = message

        def begin(self):
            raise OperationalError("DELETE ...", {}, sqlite3.OperationalError(self.message))

    for message, status in (("attempt to write a readonly database", 503), ("database or disk is full", 507)):
        monkeypatch.setattr(view, "_write_session", Refusing(message))
        r = env["client"].delete("/v1/subjects/mug@1", headers=h(env))
        assert r.status_code == status and message in r.json()["detail"], r.text
    monkeypatch.undo()
    assert env["client"].get("/v1/subjects/mug@1", headers=h(env)).status_code == 200  # nothing was deleted


def test_a_full_blob_store_is_storage_full_and_writes_no_row(tmp_path, monkeypatch):
    reg = Registry(f"sqlite:///{tmp_path}/r.db", str(tmp_path / "blobs"))
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{module}.lora_A.weight": torch.zeros(4, 8), f"{module}.lora_B.weight": torch.zeros(8, 4)}

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reg.blobs, "put", full)
    with pytest.raises(StorageFull, match="No space left"):
        reg.register("mug", tensors)
    monkeypatch.setattr(reg.blobs, "put", lambda data: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    with pytest.raises(StorageUnavailable):
        reg.register("mug", tensors)
    assert reg.list() == []
    reg.close()


# ------------------------------------------------------------------------------------------------ bombs & files


def test_decompression_bomb_through_sdk_cli_and_http(env, tmp_path, capsys):
    bomb = bomb_png()
    with pytest.raises(InvalidImage, match="10000x10000"):
        load_image(bomb, "room")
    (tmp_path / "bomb.png").write_bytes(bomb)
    scene = env["scene"]
    scene.mask.save(tmp_path / "mask.png")
    scene.exemplar.save(tmp_path / "ex.png")
    out = tmp_path / "out.png"
    code = cli(["inpaint", str(tmp_path / "bomb.png"), str(tmp_path / "mask.png"), str(tmp_path / "ex.png"),
                "-o", str(out), "--base", "tiny", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "InvalidImage" in err and "10000x10000" in err, err
    assert not out.exists()
    r = env["client"].post("/v1/place", json={**place_body(env), "room": base64.b64encode(bomb).decode()},
                           headers=h(env))
    assert r.status_code == 422 and "10000x10000" in r.json()["detail"]
    files = [("photos", ("bomb.png", bomb, "image/png"))]
    r = env["client"].post("/v1/subjects", data={"name": "bomb", "steps": "1"}, files=files, headers=h(env))
    assert r.status_code == 422 and "10000x10000" in r.json()["detail"]


def test_subject_from_a_non_safetensors_file_is_invalid_adapter(tmp_path):
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"\x80\x04\x95" + b"pickle, not safetensors" * 10)
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file"):
        Subject.from_file(path)


@pytest.mark.parametrize("command", ["inpaint", "place"])
def test_an_output_directory_is_refused_before_any_work(tmp_path, capsys, command):
    room = tmp_path / "room.png"
    PIL.Image.new("RGB", (32, 32)).save(room)
    args = [str(room), str(room), str(room)] if command == "inpaint" else ["mug", str(room), str(room)]
    code = cli([command, *args, "-o", str(tmp_path), "--base", "tiny", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "is a directory" in err, err
    assert sorted(os.listdir(tmp_path)) == ["room.png"]


def test_a_corrupt_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    photo = tmp_path / "p.png"
    photos(1)[0].save(photo)
    code = cli(["train", "cup", str(photo), "--workdir", str(work), "--base", "tiny", "--registry",
                f"sqlite:///{tmp_path}/r.db", "--blobs", str(tmp_path / "blobs"), "--no-detr", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "unreadable" in err and "Traceback" not in err, err
    assert not (tmp_path / "r.db").exists()


# ------------------------------------------------------------------------------------------------ keys & pages


def test_operator_pages_need_keys(env):
    client = env["client"]
    for path in ("/metrics", "/info"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=h(env)).status_code == 403  # a tenant's key: not an operator's
        assert client.get(path, headers=h(env, "admin")).status_code == 200
    assert client.get("/openapi.json").status_code == 401
    schema = client.get("/openapi.json", headers=h(env)).json()
    assert "/v1/place" in schema["paths"] and "/metrics" in schema["paths"]
    for path in ("/docs", "/redoc", "/"):
        assert client.get(path).status_code == 404
    assert client.get("/health").status_code == 200  # load balancers probe without a key


def test_keys_are_listed_by_prefix_and_revoked_by_id(env, capsys):
    reg, client = env["reg"], env["client"]
    key = reg.issue_key("globex", label="ops")
    assert client.get("/v1/subjects", headers={"X-API-Key": key}).status_code == 200
    url, blobs = str(reg.engine.url), env["state"].config.blobs
    assert cli(["tenants", "keys", "globex", "--registry", url, "--blobs", blobs]) == 0
    listing = capsys.readouterr().out
    assert key[:11] in listing and key not in listing and "ops" in listing
    key_id = next(k.id for k in reg.keys("globex") if k.prefix == key[:11])
    assert next(k for k in reg.keys("globex") if k.id == key_id).last_used is not None
    assert cli(["tenants", "revoke", str(key_id), "--registry", url, "--blobs", blobs]) == 0
    assert client.get("/v1/subjects", headers={"X-API-Key": key}).status_code == 401
    assert client.get("/v1/subjects", headers=h(env, "globex")).status_code == 200  # the other key still works
    assert cli(["tenants", "revoke", str(key_id), "--registry", url, "--blobs", blobs]) == 1


def test_store_commands_take_a_tenant(env, capsys, tmp_path):
    url, blobs = str(env["reg"].engine.url), env["state"].config.blobs
    assert cli(["list", "--registry", url, "--blobs", blobs]) == 0
    assert capsys.readouterr().out.strip() == "no adapters"  # the default tenant has none
    assert cli(["list", "--tenant", "globex", "--registry", url, "--blobs", blobs]) == 0
    assert capsys.readouterr().out.split()[0] == "vase@1"
    out = tmp_path / "vase.safetensors"
    assert cli(["export", "vase", str(out), "--tenant", "globex", "--registry", url, "--blobs", blobs]) == 0
    assert cli(["export", "vase", str(tmp_path), "--tenant", "globex", "--registry", url, "--blobs", blobs]) == 1
    assert cli(["export", "vase", str(out), "--tenant", "acme", "--registry", url, "--blobs", blobs]) == 1
    assert cli(["import", str(out), "--name", "vase2", "--tenant", "globex", "--registry", url, "--blobs", blobs]) == 0
    assert cli(["rm", "vase2", "--tenant", "globex", "--registry", url, "--blobs", blobs]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------ fairness (last:
# it leaves a long job running until the module's server closes)


def test_one_tenants_burst_never_429s_another(env):
    client = env["client"]
    files = [("photos", ("p.png", png(photos(1)[0]), "image/png"))]
    first = client.post("/v1/subjects", data={"name": "big1", "steps": "100000"}, files=files, headers=h(env))
    assert first.status_code == 202, first.text
    second = client.post("/v1/subjects", data={"name": "big2", "steps": "100000"}, files=files, headers=h(env))
    assert second.status_code == 429 and "acme" in second.json()["detail"] and "retry-after" in second.headers
    other = client.post("/v1/subjects", data={"name": "small", "steps": "1"}, files=files, headers=h(env, "globex"))
    assert other.status_code == 202, other.text

    answers = [client.post("/v1/place", json=place_body(env, "nope"), headers=h(env)).status_code for _ in range(30)]
    assert answers[0] == 404 and answers[-1] == 429 and set(answers) == {404, 429}  # acme's burst is spent...
    r = client.post("/v1/place", json=place_body(env, "vase"), headers=h(env, "globex"))
    assert r.status_code == 200, r.text  # ...globex's is not


# ------------------------------------------------------------------------------------------------ annotation


def busy_photo(seed=0, size=96):
    """A cup-coloured blob on a textured, many-coloured background (no plain backdrop anywhere)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = np.asarray(PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.BILINEAR), dtype=np.float32)
    img += rng.normal(0, 20, img.shape)
    img[30:70, 35:60] = (30, 60, 200)
    return PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_a_busy_photo_is_refused_as_busy_not_as_uniform():
    from trainers.annotate import NoProductFound, foreground_box

    with pytest.raises(NoProductFound, match="busy.*cut-out"):
        foreground_box(busy_photo())
    with pytest.raises(NoProductFound, match="uniform"):
        foreground_box(PIL.Image.new("RGB", (96, 96), (200, 200, 200)))


def test_a_frame_sized_box_on_a_busy_photo_is_not_a_product():
    from trainers.annotate import Annotator, NoProductFound

    annotator = Annotator(None)
    annotator.detect = lambda image: ((5, 10, 88, 78), 0.97, "airplane")  # 86 % x 71 % of the frame, as found
    with pytest.raises(NoProductFound, match="86% x 71%.*cut-out"):
        annotator(busy_photo())
    annotator.detect = lambda image: ((30, 30, 60, 70), 0.97, "cup")  # a product-sized box: kept
    assert annotator(busy_photo()).box == (30, 30, 60, 70)
