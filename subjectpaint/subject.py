"""Subject: a product the retailer registered, as a LoRA adapter for the studio's base.

    mug = Subject.train(["mug1.jpg", "mug2.jpg", "mug3.jpg"], name="blue-mug", studio=studio)
    mug = Subject.load("blue-mug", studio)                 # or "blue-mug@2"
    with mug.applied(studio):                              # LoRA in the UNet for the duration
        placed = studio.inpaint(room, mask, mug.exemplar)

`train`: validate (name, recipe, photos, registry) -> `trainers.train_subject` (annotate, Lightning LoRA fit with the
base's `TrainRecipe`, interchange tensors + metadata) -> registry. Bad input raises a typed error before anything is
written.
"""

from __future__ import annotations

import base64
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import PIL.Image
import torch
from adapters_store import adapter_file

from .errors import BaseMismatch, SubjectPaintError, VersionExists


class SubjectExists(VersionExists, SubjectPaintError):
    """`Subject.train(name=...)` for a name already in the registry, without `new_version=True`."""


def _registry(studio, registry):
    if registry is not None:
        return registry
    if getattr(studio, "registry", None) is not None:
        return studio.registry
    from adapters_store import Registry

    return Registry()


def _base(target):
    return getattr(target, "base", target)


@dataclass
class Subject:
    """A registered subject: `name`, `version`, the registry `record`, the file `metadata`, the best `exemplar`
    crop and the adapter `tensors` (float32, interchange keys `unet.*.lora_{A,B}.weight`, scale folded in)."""

    name: str
    version: int | None
    metadata: Mapping[str, str]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    record: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------ description

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}" if self.version is not None else self.name

    @property
    def rank(self) -> int:
        return int(self.metadata["rank"])

    @property
    def base_fingerprint(self) -> str:
        return self.metadata["base_fingerprint"]

    @property
    def exemplar(self) -> PIL.Image.Image | None:
        """The best product crop among the training photos (highest annotation score), for placements."""
        uri = self.metadata.get("exemplar")
        if not uri or "base64," not in uri:
            return None
        return PIL.Image.open(io.BytesIO(base64.b64decode(uri.split("base64,", 1)[1]))).convert("RGB")

    @property
    def annotations(self) -> list[dict]:
        return json.loads(self.metadata.get("annotations", "[]"))

    # ------------------------------------------------------------------------------------------ train

    @classmethod
    def train(
        cls,
        images: Sequence,
        name: str,
        studio,
        recipe=None,
        *,
        new_version: bool = False,
        backgrounds: Sequence | None = None,
        detector="facebook/detr-resnet-50",
        min_score: float = 0.7,
        labels: set[str] | None = None,
        workdir: str | os.PathLike | None = None,
        registry=None,
        progress: bool = True,
        callbacks: Sequence = (),
        trainer_kwargs: Mapping[str, Any] | None = None,
        **overrides,
    ) -> "Subject":
        """Train, export and register an adapter for the product shown in `images` (2-4 photos recommended):
        photos on a plain backdrop (the product is found with DETR or the backdrop's colour), or cut-outs with
        a transparent background (RGBA PNGs: their alpha is the product's matte).

        `recipe`: a `trainers.recipe.TrainRecipe`, a preset name ("paint-by-example", "demo") or a dict of its
        fields; default `TrainRecipe.for_base(studio)` ("demo" for the shipped demo base, "paint-by-example" for any
        other). `**overrides` are recipe fields (`steps=`, `lr=`, `precision="bf16-mixed"`, ...); an unknown one
        is an InvalidArgument. `backgrounds`: rooms to composite the product onto (the paint-by-example recipe
        never composites onto anything else). `workdir`: keep Lightning checkpoints there (rerunning with the same
        arguments resumes an interrupted run); `callbacks` and `trainer_kwargs` go to Lightning's Trainer. Training
        runs where the base lives (its CUDA device, MPS or the CPU), and the base is left on its device and in its
        dtype afterwards. The resolved recipe is stored in the adapter's metadata ("training"). Raises
        InvalidName, InvalidArgument, InvalidImage (corrupt file, no product found), SubjectExists before any
        training or writing.
        """
        from adapters_store.naming import validate_name
        from trainers import export
        from trainers.recipe import TrainRecipe
        from trainers.train import load_photos, train_subject

        # 1. Check inputs: nothing is trained or written on bad input
        validate_name(name)
        base = _base(studio)
        recipe = TrainRecipe.resolve(recipe, base, **overrides)
        load_photos(images)
        registry = _registry(studio, registry)
        if registry.exists(name) and not new_version:
            raise SubjectExists(f"subject {name!r} is already registered (latest {registry.get(name).ref}); "
                                "pass new_version=True to add a version")

        # 2. Train: annotate, fit, export (trainers)
        stored, meta = train_subject(base, images, recipe, name=name, backgrounds=backgrounds, detector=detector,
                                     min_score=min_score, labels=labels, workdir=workdir, progress=progress,
                                     callbacks=callbacks, trainer_kwargs=trainer_kwargs)

        # 3. Register
        if registry.exists(name) and not new_version:  # a concurrent trainer got there first
            raise SubjectExists(f"subject {name!r} was registered while training; pass new_version=True")
        training = json.loads(meta["training"]) if isinstance(meta["training"], str) else meta["training"]
        record = registry.register(name, stored, meta, base.fingerprint(),
                                   training={"steps": training["steps"], "final_loss": training["final_loss"]})
        return cls(name, record.version, meta, export.dequantize(stored), record)

    # ------------------------------------------------------------------------------------------- load

    @classmethod
    def load(cls, ref: str, studio=None, *, registry=None) -> "Subject":
        """`name` (latest) or `name@version` from the registry; refuses an adapter for another base."""
        registry = _registry(studio, registry)
        record = registry.get(ref)
        tensors = adapter_file.dequantize(registry.load(record))
        metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in record.metadata.items()}
        metadata.setdefault("base_fingerprint", record.base_fingerprint or "")
        subject = cls(record.name, record.version, metadata, tensors, record)
        if studio is not None:
            subject.check_base(_base(studio))
        return subject

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> "Subject":
        """An interchange file (int8 dequantized)."""
        tensors, metadata = adapter_file.read_file(path)
        return cls(name or metadata.get("subject", os.path.basename(os.fspath(path))), None, metadata, tensors)

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> str:
        """Write the interchange file (plain float factors: loads in diffusers as is)."""
        meta = {k: v for k, v in self.metadata.items() if k != "quantization"}
        return adapter_file.write_file(path, adapter_file.cast(self.tensors, dtype), meta)

    # ------------------------------------------------------------------------------------------ apply

    def check_base(self, base) -> None:
        if self.base_fingerprint and self.base_fingerprint != base.fingerprint():
            raise BaseMismatch(f"adapter {self.ref} was trained for base {self.base_fingerprint[:12]}..., "
                               f"not {base.fingerprint()[:12]}... ({base.name})")

    @contextmanager
    def applied(self, target, scale: float = 1.0, adapter_name: str | None = None):
        """Load this adapter into `target`'s UNet (a Studio or an ExemplarInpainter) through diffusers/PEFT for the
        duration of the block; afterwards the UNet is as before (LoRA layers removed when none were there)."""
        base = _base(target)
        self.check_base(base)
        unet = base.unet
        had_adapters = bool(getattr(unet, "peft_config", None))
        name = adapter_name or f"subject_{self.name}_{self.version}".replace(".", "_").replace("-", "_")
        state = {k: v.to(unet.dtype) for k, v in self.tensors.items() if k.startswith("unet.")}
        config = json.loads(self.metadata.get("lora_adapter_metadata") or "{}") or {
            f"unet.{k}": v for k, v in adapter_file.peft_config_kwargs(self.metadata).items()}
        unet.load_lora_adapter(state, prefix="unet", adapter_name=name, metadata=config)
        try:
            if scale != 1.0:
                unet.set_adapters([name], weights=[scale])
            yield self
        finally:
            if had_adapters:
                unet.delete_adapters([name])
            else:
                unet.unload_lora()
