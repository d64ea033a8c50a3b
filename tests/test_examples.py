"""The examples run end to end (random tiny base, a few steps) and leave what they say they leave."""

import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from adapters_store import Registry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


def run(tmp_path, script, *args):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_register_then_place_with_the_sdk(tmp_path):
    assert "registered blue-mug@1" in run(tmp_path, "register_product.py", "--tiny", "--steps", "2")
    with Registry(f"sqlite:///{tmp_path}/example-registry/registry.db", tmp_path / "example-registry/blobs") as reg:
        assert [r.ref for r in reg.list()] == ["blue-mug@1"] and reg.verify() == []
    out = run(tmp_path, "place_in_room.py", "--tiny", "--steps", "2")
    for label in ("progressive", "dual"):
        assert f"{label}: wrote" in out
        image = PIL.Image.open(tmp_path / f"example-out/placed_{label}.png")
        assert image.size == (32, 32) and len(set(image.getdata())) > 10   # a real image, not a blank


def test_http_client_registers_and_places_through_the_api(tmp_path):
    pytest.importorskip("litserve")
    out = run(tmp_path, "http_client.py", "--serve", "--tiny", "--steps", "2", "--port", "8791")
    assert "training blue-mug: done 100%" in out and "placed blue-mug@1" in out
    assert PIL.Image.open(tmp_path / "example-out/placed_http.png").size == (64, 64)
