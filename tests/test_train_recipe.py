"""TrainRecipe: presets resolved from the base, overrides with typed errors, the recipe in the adapter's metadata;
the paint-by-example preset never draws procedural rooms; precision, accumulation and gradient checkpointing."""

import json
import subprocess
import sys

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch

import subjectpaint.demo.preset
import subjectpaint.demo.scenes
from adapters_store import Registry
from subjectpaint import Studio, Subject
from subjectpaint.base import DEMO_FINGERPRINT, ExemplarInpainter
from subjectpaint.cli import main
from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene
from subjectpaint.errors import InvalidArgument
from trainers.recipe import FIELDS, PRESETS, TrainRecipe, background_source
from trainers.train import recipe_from_metadata

from .train_helpers import photos, studio  # noqa: F401  (fixtures)

FAST = dict(steps=2, batch_size=2, detector=None, progress=False)


def written(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file() and "registry.db" not in p.name)


# ------------------------------------------------------------------------------------------ presets


def test_for_base_picks_demo_for_the_demo_base_only(tiny_base):
    demo = ExemplarInpainter.demo()
    assert demo.fingerprint() == DEMO_FINGERPRINT  # the constant is the shipped weights'
    assert TrainRecipe.for_base(demo).preset == "demo"
    assert TrainRecipe.for_base(tiny_base).preset == "paint-by-example"
    assert TrainRecipe.for_base(ExemplarInpainter.tiny(1)).preset == "paint-by-example"


def test_paint_by_example_preset_is_the_papers():
    pbe = PRESETS["paint-by-example"]  # shared/papers/lora-image-guided-inpainting.txt 5.1
    assert (pbe.lr, pbe.batch_size, pbe.epochs, pbe.dropout, pbe.strength) == (3e-5, 16, 40, 0.2, 1.0)
    assert pbe.background_source == "user" and pbe.placement_p == 0.0 and not pbe.reference_jitter
    assert pbe.steps is None and pbe.steps_for(3) == 8  # 40 epochs x 3 photos / 16 per step
    demo = PRESETS["demo"]
    assert (demo.lr, demo.steps, demo.strength, demo.background_source) == (4e-3, 300, 0.6, "demo-rooms")


def test_overrides_and_round_trip():
    r = TrainRecipe.from_preset("paint-by-example", steps=5, targets=["to_q", "to_v"], exposure=[0.9, 1.1])
    assert r.steps == 5 and r.targets == ("to_q", "to_v") and r.exposure == (0.9, 1.1)
    assert TrainRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert set(r.to_dict()) == set(FIELDS)


@pytest.mark.parametrize("bad", [{"learning_rate": 1e-4}, {"lr": 0}, {"lr": -1.0}, {"rank": 0}, {"steps": 0},
                                 {"dropout": 1.5}, {"precision": "fp8"}, {"storage": "int4"}, {"batch_size": 6,
                                 "accumulate": 4}, {"exposure": (1.2, 0.8)}, {"gradient_checkpointing": "yes"},
                                 {"strength": 3.0}, {"targets": []}])
def test_bad_override_is_a_typed_error(bad):
    with pytest.raises(InvalidArgument):
        TrainRecipe.from_preset("paint-by-example", **bad)


def test_unknown_override_in_train_writes_nothing(studio, photos, tmp_path):
    with pytest.raises(InvalidArgument, match="unknown training setting"):
        Subject.train(photos, "mug", studio, learning_rate=1e-4, workdir=tmp_path / "ckpt", **FAST)
    with pytest.raises(InvalidArgument, match="unknown training setting"):
        Subject.train(photos, "mug", studio, {"lr": 1e-4, "epochz": 3}, workdir=tmp_path / "ckpt", **FAST)
    with pytest.raises(InvalidArgument, match="unknown recipe"):
        Subject.train(photos, "mug", studio, "sdxl", **FAST)
    assert studio.registry.count() == 0 and written(tmp_path) == [] and not (tmp_path / "ckpt").exists()


def test_cli_recipe_and_set(tmp_path, photos, capsys):
    paths = []
    for i, p in enumerate(photos):
        paths.append(str(tmp_path / f"p{i}.png"))
        p.save(paths[-1])
    store = ["--registry", f"sqlite:///{tmp_path}/r.db", "--blobs", str(tmp_path / "blobs")]
    argv = ["train", "lamp", *paths, "--base", "tiny", "--recipe", "paint-by-example", "--set", "steps=1",
            "--set", "batch_size=2", "--set", "precision=bf16-mixed", "--no-detr", "-q", *store]
    assert main(argv) == 0
    with Registry(store[1], store[3]) as registry:
        training = json.loads(registry.get("lamp").metadata["training"])
    assert training["preset"] == "paint-by-example" and training["precision"] == "bf16-mixed"
    assert training["steps"] == 1 and training["batch_size"] == 2
    assert main(["train", "other", *paths, "--base", "tiny", "--set", "bogus=1", "--no-detr", "-q", *store]) == 1
    assert "unknown training setting" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ what is trained


@pytest.fixture
def no_procedural_rooms(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a procedural demo room was drawn")

    monkeypatch.setattr(subjectpaint.demo.scenes, "make_room", refuse)
    monkeypatch.setattr(subjectpaint.demo.preset, "make_room", refuse)


def test_paint_by_example_never_draws_a_procedural_room(studio, photos, no_procedural_rooms):
    subject = Subject.train(photos, "mug", studio, **FAST)  # the tiny base: the paint-by-example preset
    training = json.loads(subject.metadata["training"])
    assert training["preset"] == "paint-by-example" and training["rooms"] == 0  # self-reference only
    room = PIL.Image.fromarray(np.full((40, 40, 3), (90, 120, 60), np.uint8))
    subject = Subject.train(photos, "mug", studio, backgrounds=[room], new_version=True, **FAST)
    assert json.loads(subject.metadata["training"])["rooms"] == 1  # the user's room, and only it


def test_demo_preset_composites_onto_the_demos_rooms(studio, photos, monkeypatch):
    drawn = []
    make_room = subjectpaint.demo.preset.make_room
    monkeypatch.setattr(subjectpaint.demo.preset, "make_room", lambda *a: drawn.append(a) or make_room(*a))
    subject = Subject.train(photos, "mug", studio, "demo", backgrounds=None, **FAST)
    assert len(drawn) == 32 and json.loads(subject.metadata["training"])["rooms"] == 32


def test_recipe_round_trips_through_the_adapter_metadata(studio, photos, tmp_path):
    recipe = TrainRecipe.from_preset("paint-by-example", rank=2, lr=1e-4, cond_drop=0.1, storage="fp16")
    subject = Subject.train(photos, "mug", studio, recipe, **FAST)
    loaded = Subject.load("mug", studio)
    resolved = recipe.replace(steps=2, batch_size=2, precision="32")  # steps and precision as resolved
    assert recipe_from_metadata(loaded.metadata) == resolved
    path = subject.save(tmp_path / "mug.safetensors")  # the interchange file carries it too
    assert recipe_from_metadata(Subject.from_file(path).metadata) == resolved


# ------------------------------------------------------------------------- precision and memory options


class Seen(L.Callback):
    def on_train_start(self, trainer, module):
        self.precision = trainer.precision
        self.checkpointing = module.unet.is_gradient_checkpointing
        self.lora_dtypes = {p.dtype for p in module.unet.parameters() if p.requires_grad}
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch["target"].shape[0])


@pytest.mark.parametrize("option", [{"precision": "bf16-mixed"}, {"gradient_checkpointing": True},
                                    {"batch_size": 4, "accumulate": 2}, {"base_dtype": torch.bfloat16}])
def test_each_memory_option_trains_exports_and_places(tmp_path, photos, option):
    base = ExemplarInpainter.tiny(0)
    if "base_dtype" in option:  # a frozen base in bf16: the LoRA factors still train in fp32
        base.to(dtype=option.pop("base_dtype"))
    dtype, device = base.dtype, base.device
    studio = Studio(base, registry=Registry(f"sqlite:///{tmp_path}/r.db", str(tmp_path / "blobs")))
    seen = Seen()
    subject = Subject.train(photos, "mug", studio, **{**FAST, **option}, callbacks=[seen])
    assert seen.lora_dtypes == {torch.float32}
    assert seen.precision == option.get("precision", "32-true")
    assert seen.checkpointing == option.get("gradient_checkpointing", False)
    assert seen.batches == [2] * (2 * option.get("accumulate", 1))  # micro-batches of batch_size / accumulate
    assert (base.dtype, base.device) == (dtype, device)  # the studio is left as it was
    assert {next(m.parameters()).dtype for m in (base.vae, base.unet, base.image_encoder)} == {dtype}
    scene = make_scene(EVAL_SEEDS[0], 32, product=Product.from_seed(HELDOUT_PRODUCT_SEEDS[5]))
    with subject.applied(studio):  # the adapter in the UNet through diffusers/PEFT
        placed = studio.inpaint(scene.room, scene.mask, subject.exemplar, steps=2, seed=0, progress=False)
    assert placed.image.size == scene.room.size
    if dtype == torch.float32:  # the progressive session's encode does not take a bf16 VAE on the CPU yet
        placed = studio.progressive(steps=2, progress=False).place(subject, scene.room, scene.mask)
        assert placed.image.size == scene.room.size


def test_gradient_checkpointing_trains_the_same_adapter(tiny_base, photos):
    from trainers.train import train_subject

    recipe = TrainRecipe.from_preset("paint-by-example", steps=2, batch_size=2, storage="fp32", lr=1e-2)
    plain, _ = train_subject(tiny_base, photos, recipe, detector=None, progress=False)
    ckpt, _ = train_subject(tiny_base, photos, recipe.replace(gradient_checkpointing=True), detector=None,
                            progress=False)
    assert plain.keys() == ckpt.keys()
    assert max((plain[k] - ckpt[k]).abs().max().item() for k in plain) <= 1e-6
    assert max(plain[k].abs().max().item() for k in plain if "lora_B" in k) > 0  # it did train


def test_the_demo_rooms_are_found_without_importing_the_demo():
    # the "demo" preset's rooms come through the entry point the package declares: a user who trains on the demo
    # base never imports subjectpaint.demo, and trainers never names it
    code = ("import sys; from trainers.recipe import background_source; "
            "assert 'subjectpaint.demo' not in sys.modules; make = background_source('demo-rooms'); "
            "print(make.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip() == "subjectpaint.demo.preset"
    with pytest.raises(InvalidArgument, match="no background source"):
        background_source("no-such-rooms")
