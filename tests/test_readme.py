"""The README is read as a newcomer reads it: every ```python and ```bash block runs as written, top to bottom, in one
folder that holds the files the blocks name (room.jpg, mask.png, mug.jpg, mug1-3.jpg: a demo scene and a demo
product's photos) and a registry of its own ($SUBJECTPAINT_HOME).

Not run: the first bash block (install and test: CI runs those itself), and a block right after a line
`<!-- not run: REASON -->` (servers that run until stopped, hub ids, a GPU); each reason names the test that covers
what the block shows. To keep this under a couple of minutes, the demo training preset's 300 steps are cut to 4
here (a `sitecustomize` on the path); nothing else is changed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow

FAST_TRAINING = """
import dataclasses
import trainers.recipe as recipe

recipe.PRESETS["demo"] = dataclasses.replace(recipe.PRESETS["demo"], steps=4)
"""


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, reason not run) for each fenced block, in order."""
    out = []
    skip = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"<!-- not run: (.+?) -->", line.strip()):
            skip = m.group(1)
        elif m := re.match(r"```(\w*)\s*$", line):
            lang, body = m.group(1), []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((lang, "\n".join(body), skip))
            skip = None
        elif line.strip():
            skip = None if not line.startswith("<!--") else skip
        i += 1
    return out


def test_the_reader_finds_blocks_and_skips():
    text = "x\n```bash\na\n```\n<!-- not run: a server -->\n```python\nb\n```\n\n```python\nc\n```\n"
    assert blocks(text) == [("bash", "a", None), ("python", "b", "a server"), ("python", "c", None)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from subjectpaint.demo.scenes import EVAL_SEEDS, Product, make_scene, product_photos

    root = tmp_path_factory.mktemp("readme")
    scene = make_scene(EVAL_SEEDS[0], 64)
    scene.room.convert("RGB").save(root / "room.jpg")
    scene.mask.save(root / "mask.png")
    scene.exemplar.convert("RGB").save(root / "mug.jpg")
    for i, photo in enumerate(product_photos(Product.from_seed(7), 3), 1):
        photo.image.save(root / f"mug{i}.jpg")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(FAST_TRAINING)
    return root


def run(folder: Path, lang: str, code: str):
    env = {**os.environ, "SUBJECTPAINT_HOME": str(folder / "home"), "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(folder / "site"), os.environ.get("PYTHONPATH", "")])}
    env.pop("SUBJECTPAINT_REGISTRY_URL", None), env.pop("SUBJECTPAINT_BLOBS", None)
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    else:  # each line a command, `subjectpaint` as this interpreter's module
        script = "\n".join(re.sub(r"^subjectpaint\b", shlex.quote(sys.executable) + " -m subjectpaint.cli", line)
                           for line in code.splitlines())
        cmd = ["bash", "-euo", "pipefail", "-c", script]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def test_every_readme_block_runs_as_written(folder):
    found = blocks(README.read_text())
    assert found[0][0] == "bash" and "pip install" in found[0][1]  # the install/test block CI runs
    ran = 0
    for lang, code, reason in found[1:]:
        if lang not in ("python", "bash") or reason:
            continue
        out = run(folder, lang, code)
        assert out.returncode == 0, f"README block failed:\n{textwrap.indent(code, '  ')}\n{out.stderr[-3000:]}"
        ran += 1
    assert ran >= 4
    # what the quickstart says it leaves
    for name in ("placed.png", "before_after.png", "placed_progressive.png", "placed_dual.png",
                 "demo-out/demo_grid.png"):
        assert (folder / name).stat().st_size > 0, name
