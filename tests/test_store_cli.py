"""Registry subcommands, driven through a parser built the way subjectpaint.cli builds its own."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open

from adapters_store import Registry
from adapters_store.cli import add_commands


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTPAINT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUBJECTPAINT_REGISTRY_URL", raising=False)
    monkeypatch.delenv("SUBJECTPAINT_BLOBS", raising=False)
    url, blobs = f"sqlite:///{tmp_path}/cli.db", str(tmp_path / "blobs")
    with Registry(url, blobs) as reg:
        reg.register("blue-mug", {"unet.a.to_q.lora_A.weight": torch.ones(4, 8)}, {"alpha": 4}, "fpA")
        reg.register("blue-mug", {"unet.a.to_q.lora_A.weight": torch.full((4, 8), 2.0)})
        reg.register("lamp", {"unet.a.to_q.lora_A.weight": torch.zeros(4, 8)}, base_fingerprint="fpB")
    return url, blobs


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="subjectpaint")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_list(env, capsys):
    url, blobs = env
    code, out, _ = run(["list", "--registry", url, "--blobs", blobs], capsys)
    assert code == 0 and [l.split()[0] for l in out.splitlines()] == ["blue-mug@1", "blue-mug@2", "lamp@1"]
    code, out, _ = run(["list", "blue", "--latest", "--json", "--registry", url, "--blobs", blobs], capsys)
    rows = [json.loads(l) for l in out.splitlines()]
    assert code == 0 and [(r["name"], r["version"]) for r in rows] == [("blue-mug", 2)]
    code, out, _ = run(["list", "--base", "fpB", "--registry", url, "--blobs", blobs], capsys)
    assert out.split()[0] == "lamp@1"
    code, out, _ = run(["list", "--limit", "1", "--after", "blue-mug@1", "--registry", url,
                        "--blobs", blobs], capsys)
    assert out.split()[0] == "blue-mug@2" and len(out.splitlines()) == 1


def test_rm_and_gc(env, capsys):
    url, blobs = env
    assert run(["rm", "blue-mug@1", "--registry", url, "--blobs", blobs], capsys)[0] == 0
    code, _, err = run(["rm", "blue-mug@1", "--registry", url, "--blobs", blobs], capsys)
    assert code == 1 and "not found" in err
    code, _, err = run(["rm", "../etc", "--registry", url, "--blobs", blobs], capsys)
    assert code == 1 and "path separator" in err
    code, out, _ = run(["gc", "--registry", url, "--blobs", blobs], capsys)
    assert code == 0 and out.startswith("removed 0 blobs")         # default grace keeps young ones
    code, out, _ = run(["gc", "--grace", "0", "--registry", url, "--blobs", blobs], capsys)
    assert code == 0 and out.startswith("removed 1 blobs")
    with Registry(url, blobs) as reg:
        assert [r.ref for r in reg.list()] == ["blue-mug@2", "lamp@1"]
        assert len(list(reg.blobs.blobs())) == 2


def test_export_import_roundtrip_with_env_defaults(env, tmp_path, capsys, monkeypatch):
    url, blobs = env
    monkeypatch.setenv("SUBJECTPAINT_REGISTRY_URL", url)
    monkeypatch.setenv("SUBJECTPAINT_BLOBS", blobs)
    path = tmp_path / "mug.safetensors"
    code, out, _ = run(["export", "blue-mug@1", str(path)], capsys)
    assert code == 0 and "blue-mug@1" in out
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["subject"] == "blue-mug" and f.metadata()["base_fingerprint"] == "fpA"
    code, out, _ = run(["import", str(path)], capsys)
    assert code == 0 and "blue-mug@3" in out
    code, out, _ = run(["import", str(path), "--name", "mug-copy"], capsys)
    assert code == 0 and "mug-copy@1" in out
    code, _, err = run(["import", str(tmp_path / "nope.safetensors")], capsys)
    assert code == 1 and "does not exist" in err
    code, _, err = run(["export", "ghost", str(path)], capsys)
    assert code == 1 and "ghost" in err


def test_tenants_add_key_list(env, capsys):
    url, blobs = env
    store = ["--registry", url, "--blobs", blobs]
    assert run(["tenants", "add", "acme", *store], capsys)[0] == 0
    code, out, _ = run(["tenants", "key", "acme", *store], capsys)
    key = out.strip()
    assert code == 0 and len(key) >= 32
    code, out, _ = run(["tenants", "list", *store], capsys)
    assert code == 0 and "acme" in out.split()
    with Registry(url, blobs) as reg:
        assert reg.tenant_for_key(key) == "acme"
    code, _, err = run(["tenants", "key", "nobody", *store], capsys)
    assert code == 1 and "nobody" in err  # a typed store error, reported, nothing issued
