"""Subject.train / load / applied end to end on the tiny base; bad input writes nothing; CLI train."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from adapters_store import Registry
from subjectpaint import Studio, Subject
from subjectpaint.base import ExemplarInpainter
from subjectpaint.cli import main
from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene, product_photos
from subjectpaint.errors import (BaseMismatch, InvalidArgument, InvalidImage, InvalidName, SubjectPaintError,
                                 VersionExists)
from subjectpaint.subject import SubjectExists
from trainers.recipe import PRESETS

from .train_helpers import photos, studio  # noqa: F401  (fixtures)

FAST = dict(steps=3, batch_size=2, detector=None, progress=False)


def blobs(tmp_path):
    root = tmp_path / "blobs"
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_train_registers_loads_and_places(studio, photos, tmp_path):
    subject = Subject.train(photos, "blue-mug", studio, rank=4, alpha=8, **FAST)
    assert subject.ref == "blue-mug@1" and studio.registry.count() == 1
    md = subject.metadata
    assert md["annotation_method"] == "background" and float(md["annotation_score"]) > 1
    assert len(subject.annotations) == 3 and md["base_fingerprint"] == studio.base.fingerprint()
    assert md["quantization"].startswith("int8") and subject.record.byte_size < 40_000
    assert subject.exemplar.size == (32, 32)

    loaded = Subject.load("blue-mug", studio)
    assert loaded.version == 1 and loaded.tensors.keys() == subject.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], subject.tensors[k]) for k in subject.tensors)
    assert loaded.exemplar.tobytes() == subject.exemplar.tobytes()

    scene = make_scene(EVAL_SEEDS[0], 32, product=Product.from_seed(HELDOUT_PRODUCT_SEEDS[5]))
    args = (scene.room, scene.mask, loaded.exemplar)
    plain = np.asarray(studio.inpaint(*args, steps=2, seed=0, progress=False).image, dtype=np.int16)
    with loaded.applied(studio):
        placed = np.asarray(studio.inpaint(*args, steps=2, seed=0, progress=False).image, dtype=np.int16)
    again = np.asarray(studio.inpaint(*args, steps=2, seed=0, progress=False).image, dtype=np.int16)
    assert np.abs(placed - plain).max() > 0 and np.array_equal(again, plain)

    second = Subject.train(photos[:2], "blue-mug", studio, new_version=True, **FAST)
    assert second.version == 2 and Subject.load("blue-mug", studio).version == 2
    assert Subject.load("blue-mug@1", studio).version == 1


def test_strength_scales_the_exported_delta(studio, photos):
    # the same run exported at two strengths: A factors equal, B factors (so the weight delta B @ A) in proportion
    full = Subject.train(photos, "mug", studio, "demo", strength=1.0, storage="fp32", **FAST)
    part = Subject.train(photos, "mug", studio, "demo", strength=0.25, storage="fp32", new_version=True, **FAST)
    training = json.loads(part.metadata["training"])
    assert training["strength"] == 0.25 and training["placement_p"] == 1.0
    # the whole data recipe is recorded, so the adapter can be reproduced from its file
    assert training["composite_p"] == 1.0 and training["upright"] is True
    assert training["exposure"] == list(PRESETS["demo"].exposure) and training["accelerator"] == "cpu"
    assert training["shadow_p"] == 0.7 and training["backgrounds"] == 32 and training["lr_schedule"] == "constant"
    b_keys = [k for k in full.tensors if k.endswith("lora_B.weight")]
    assert b_keys and max(full.tensors[k].abs().max().item() for k in b_keys) > 0
    for k, v in full.tensors.items():
        expected = v * 0.25 if k in b_keys else v
        torch.testing.assert_close(part.tensors[k], expected, rtol=1e-6, atol=1e-8)


def test_adapter_for_another_base_is_refused(studio, photos, tmp_path):
    Subject.train(photos[:2], "mug", studio, **FAST)
    other = Studio(ExemplarInpainter.tiny(1), registry=studio.registry)
    with pytest.raises(BaseMismatch):
        Subject.load("mug", other)
    subject = Subject.load("mug", studio)
    with pytest.raises(BaseMismatch):
        with subject.applied(other):
            pass


def corrupt_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    return str(path)


@pytest.mark.parametrize("case", ["zero photos", "corrupt file", "uniform image", "missing file", "bad name",
                                  "bad rank", "bad composite share", "bad shadow share", "empty cut-out",
                                  "bad exposure", "bad strength", "bad placement share", "bad lr schedule"])
def test_bad_input_raises_typed_error_and_writes_nothing(studio, photos, tmp_path, case):
    name, images, kw = "mug", list(photos), {}
    expected = {"zero photos": InvalidArgument, "corrupt file": InvalidImage, "uniform image": InvalidImage,
                "missing file": InvalidImage, "bad name": InvalidName, "bad rank": InvalidArgument,
                "bad composite share": InvalidArgument, "bad shadow share": InvalidArgument,
                "empty cut-out": InvalidImage, "bad exposure": InvalidArgument,
                "bad strength": InvalidArgument, "bad placement share": InvalidArgument,
                "bad lr schedule": InvalidArgument}[case]
    if case == "zero photos":
        images = []
    elif case == "corrupt file":
        images[1] = corrupt_file(tmp_path)
    elif case == "uniform image":
        images[2] = PIL.Image.new("RGB", (32, 32), (230, 230, 230))
    elif case == "missing file":
        images[0] = str(tmp_path / "nope.png")
    elif case == "bad name":
        name = "../etc/passwd"
    elif case == "bad rank":
        kw["rank"] = 0
    elif case == "bad shadow share":
        kw["shadow_p"] = -0.1
    elif case == "bad exposure":
        kw["exposure"] = (1.2, 0.8)
    elif case == "bad strength":
        kw["strength"] = 0.0
    elif case == "bad placement share":
        kw["placement_p"] = 2.0
    elif case == "bad lr schedule":
        kw["lr_schedule"] = "linear"
    elif case == "empty cut-out":
        images[2] = PIL.Image.new("RGBA", (32, 32), (200, 30, 30, 0))  # transparent everywhere
    else:
        kw["composite_p"] = 1.5
    with pytest.raises(expected) as info:
        Subject.train(images, name, studio, **{**FAST, **kw})
    assert isinstance(info.value, (SubjectPaintError, InvalidName))
    if case in ("uniform image", "empty cut-out"):
        assert "photo 2" in str(info.value) and "no product" in str(info.value)
    assert studio.registry.count() == 0 and blobs(tmp_path) == []


def test_cut_outs_train_with_their_own_alpha(studio, tmp_path):
    # transparent PNGs: the alpha is the matte and gives the box; the backdrop fallback is not consulted
    shots = product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[5]), 2, size=32)
    paths = []
    for i, shot in enumerate(shots):
        rgba = shot.image.convert("RGBA")
        rgba.putalpha(shot.alpha)
        paths.append(tmp_path / f"cutout{i}.png")
        rgba.save(paths[-1])
    subject = Subject.train([str(p) for p in paths], "cut-mug", studio, **FAST)
    assert subject.metadata["annotation_method"] == "alpha"
    assert [tuple(a["box"]) for a in subject.annotations] == [shot.box for shot in shots]


def test_name_in_use_without_new_version(studio, photos, tmp_path):
    Subject.train(photos[:2], "mug", studio, **FAST)
    before = blobs(tmp_path)
    with pytest.raises(SubjectExists) as info:
        Subject.train(photos, "mug", studio, **FAST)
    assert isinstance(info.value, VersionExists) and "new_version" in str(info.value)
    assert studio.registry.count() == 1 and blobs(tmp_path) == before


def test_cli_train(tmp_path, photos, capsys):
    paths = []
    for i, photo in enumerate(photos[:2]):
        paths.append(str(tmp_path / f"p{i}.png"))
        photo.save(paths[-1])
    store = ["--registry", f"sqlite:///{tmp_path}/cli.db", "--blobs", str(tmp_path / "cli-blobs")]
    argv = ["train", "lamp", *paths, "--base", "tiny", "--steps", "2", "--no-detr", "-q", *store]
    assert main(argv) == 0
    assert main(argv) == 1  # the name is taken now
    assert "SubjectExists" in capsys.readouterr().err
    assert main(argv + ["--new-version", "--lr", "3e-5", "--strength", "0.8", "--lr-schedule", "cosine"]) == 0
    with Registry(store[1], store[3]) as registry:
        record = registry.get("lamp")
        assert record.version == 2
        training = record.metadata["training"]
        training = json.loads(training) if isinstance(training, str) else training
        assert training["lr"] == 3e-5 and training["steps"] == 2 and training["strength"] == 0.8
        assert training["lr_schedule"] == "cosine"
    assert main(["train", "bad", str(tmp_path / "missing.png"), "--base", "tiny", "-q", *store]) == 1
