"""One adapter, every entry point, every form it may come in (subjectpaint.sources): a "name@version" string, a
registry record, a `Subject.load`, a `Subject.from_file`, an in-memory `Subject` built from tensors (what
`Subject.train` returns is a `Subject.load`-like one: record and tensors), and the serve worker's resolve path. Per entry point the placements agree (<= 1 uint8), and the adapter changes the placement."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn
from adapters_store import Registry
from adapters_store.adapter_file import diffusers_metadata

from subjectpaint import Studio, Subject, sources
from subjectpaint.base import LORA_TARGETS as TARGETS
from subjectpaint.errors import InvalidArgument
from subjectpaint.serve.config import ServeConfig
from subjectpaint.serve.worker import PlaceAPI

from .conftest import box_mask_image, random_image

STEPS = 2


def _data_uri(image: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _adapter(unet, rank=4, seed=0) -> dict[str, torch.Tensor]:
    """Random LoRA factors, exactly representable in fp16 (so the fp16 file and blob hold the same values)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
            out[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            out[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    return {k: v.half().float() for k, v in out.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    url, blobs = f"sqlite:///{tmp / 'registry.db'}", str(tmp / "blobs")
    registry = Registry(url, blobs)
    studio = Studio.load("tiny", registry=registry)
    exemplar = random_image(32, 32, 7)
    tensors = _adapter(studio.base.unet)
    metadata = {"rank": "4", "alpha": "4.0", "target_modules": json.dumps(sorted(TARGETS)),
                "base_fingerprint": studio.base.fingerprint(), "subject": "mug", "exemplar": _data_uri(exemplar),
                "lora_adapter_metadata": diffusers_metadata(4, 4.0, TARGETS)}
    registry.register("mug", {k: v.half() for k, v in tensors.items()}, metadata)
    in_memory = Subject("mug", None, metadata, tensors)
    path = in_memory.save(tmp / "mug.safetensors")
    forms = {
        "ref": "mug@1",
        "record": registry.get("mug@latest"),
        "load": Subject.load("mug@1", studio, registry=registry),
        "file": Subject.from_file(path),
        "memory": in_memory,
    }
    room = random_image(48, 40, 1)
    mask = box_mask_image(48, 40, (10, 8, 34, 30))
    other = box_mask_image(48, 40, (36, 4, 46, 16))
    return dict(studio=studio, registry=registry, forms=forms, room=room, mask=mask, other=other,
                exemplar=exemplar, url=url, blobs=blobs)


def _pixels(image) -> np.ndarray:
    if isinstance(image, bytes):
        image = PIL.Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


ENTRY_POINTS = {
    "inpaint": lambda s, subj: s["studio"].inpaint(s["room"], s["mask"], subj, steps=STEPS, seed=3,
                                                   progress=False).image,
    "inpaint_many": lambda s, subj: s["studio"].inpaint_many(
        [(s["room"], s["mask"], s["exemplar"]), (s["room"], s["mask"], subj)], steps=STEPS, seed=3,
        progress=False)[1].image,
    "progressive.place": lambda s, subj: s["studio"].progressive(steps=STEPS, seed=3, progress=False).place(
        subj, s["room"], s["mask"]).image,
    "progressive.place_many": lambda s, subj: s["studio"].progressive(steps=STEPS, seed=3, progress=False).place_many(
        [(subj, s["mask"]), (s["exemplar"], s["other"])], s["room"]).image,
    "dual_branch.place": lambda s, subj: s["studio"].dual_branch(steps=STEPS, seed=3).place(
        subj, s["room"], s["mask"]).image,
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_form_gives_the_same_placement_and_the_adapter_shows(setup, entry):
    place = ENTRY_POINTS[entry]
    placed = {form: _pixels(place(setup, subject)) for form, subject in setup["forms"].items()}
    reference = placed["ref"]
    for form, pixels in placed.items():
        assert np.abs(pixels - reference).max() <= 1, f"{entry}: {form} differs from the registry ref"
    # the same exemplar without the adapter: the adapter must change the placement
    plain = _pixels(place(setup, setup["exemplar"]))
    assert np.abs(plain - reference).max() > 8, f"{entry}: the adapter did not change the placement"


def test_the_serve_worker_resolves_the_same_subject(setup):
    api = PlaceAPI(ServeConfig(base="tiny", registry_url=setup["url"], blobs=setup["blobs"]))
    api.setup("cpu")
    room, mask = io.BytesIO(), io.BytesIO()
    setup["room"].save(room, format="png")
    setup["mask"].save(mask, format="png")
    row = {"tenant": "default", "ref": "mug@1", "room": room.getvalue(), "mask": mask.getvalue(), "steps": STEPS,
           "seed": 3, "guidance_scale": 5.0, "schedule": "linear"}
    out = api.predict([{**row, "session": session} for session in ("batch", "progressive", "dual")])
    assert all("png" in o for o in out), out
    subject = setup["forms"]["load"]
    studio = setup["studio"]
    expected = [
        studio.inpaint(setup["room"], setup["mask"], subject, steps=STEPS, seed=3, progress=False).image,
        studio.progressive(steps=STEPS, seed=3, progress=False).place(subject, setup["room"], setup["mask"]).image,
        studio.dual_branch(steps=STEPS, seed=3).place(subject, setup["room"], setup["mask"]).image,
    ]
    for session, o, e in zip(("batch", "progressive", "dual"), out, expected):
        assert np.abs(_pixels(o["png"]) - _pixels(e)).max() <= 1, session


def test_the_one_adapter_test(setup):
    memory = setup["forms"]["memory"]
    assert sources.adapter_source(None) is None
    assert sources.adapter_source(setup["exemplar"]) is None
    for form in setup["forms"].values():
        assert sources.adapter_source(form) is form
    assert sources.adapter_source(memory.tensors) is memory.tensors
    record = setup["registry"].get("mug@1")
    assert sources.resolve(record, setup["registry"]).name == "mug"
    assert sources.resolve("mug@latest", setup["registry"]).subject.record == record
    with pytest.raises(InvalidArgument):  # an adapter alone has no exemplar to place
        sources.resolve(memory.tensors)


def test_an_adapter_from_tensors_activates_like_its_subject(setup):
    studio, memory = setup["studio"], setup["forms"]["memory"]
    laid = [studio.laid_out(x) for x in (memory, memory.tensors, "mug@1", setup["registry"].get("mug@1"))]
    for other in laid[1:]:
        assert torch.equal(other, laid[0])
