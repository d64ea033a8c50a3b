"""Subject: a product the retailer registered, as a LoRA adapter for the studio's base.

    mug = Subject.train(["mug1.jpg", "mug2.jpg", "mug3.jpg"], name="blue-mug", studio=studio)
    mug = Subject.load("blue-mug", studio)                 # or "blue-mug@2"
    with mug.applied(studio):                              # LoRA in the UNet for the duration
        placed = studio.inpaint(room, mask, mug.exemplar)

`train`: validate everything (name, photos, base) -> annotate (DETR, backdrop fallback) -> Lightning LoRA fit
(shared/papers/lora-image-guided-inpainting.txt, Paint-by-Example augmentation) -> interchange file tensors +
metadata -> registry. Bad input raises a typed error before anything is written.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import PIL.Image
import torch
from adapters_store import adapter_file

from .errors import BaseMismatch, InvalidArgument, InvalidImage, VersionExists, SubjectPaintError
from .images import load_cutout, load_image

DEFAULT_STEPS = 300
# 300 steps at 4e-3: chosen on the demo base's validation products for a CPU budget (bench/subject_fidelity.py
# --validate: 1e-3 -0.09 dB, 2e-3 +0.55, 4e-3 +0.90, 8e-3 worse). The paper's 3e-5 (batch 16, 40 epochs on a GPU) is
# the setting for a full-size base.
DEFAULT_LR = 4e-3
# lr_schedule="cosine" (decay to 0 at the last step), 12 validation products x 10 scenes, training seeds 0 and 1:
# +0.91 dB at strength 0.6 (constant: +0.98), +0.67 at 1.0 (constant: +0.61); seed to seed a product moves by 0.20 dB
# on average with either schedule. Not the default: no better at the default strength, and no steadier.
# The adapter is exported at this fraction of its trained weight delta (folded into B; the LoRA scale that diffusers
# users set by hand). Interpolating toward the base is WiSE-FT's remedy for a fine-tune whose training images differ
# from where it is used. At full strength the 300-step adapter overshoots. Validation products
# (bench/subject_fidelity.py --validate), strength 0.3 / 0.5 / 0.6 / 0.75 / 1.0: +0.99 / +1.32 / +1.43 / +1.35 /
# +0.90 dB; lr 8e-3 peaks at +0.94 (0.5), 600 steps at +1.31 (0.75), a cosine decay of the lr at +0.95 (0.5).
# With placement masks and reference jitter (below), 0.5 / 0.6 / 0.7: +1.71 / +1.77 / +1.70 (lr 2e-3: +1.65 at 0.6,
# +1.20 at 1.0; an EMA of the factors, decay 0.99: +1.74 at 0.6, +1.16 at 1.0: not noise, so not averaged away).
DEFAULT_STRENGTH = 0.6
# The brightness factor range on the composited product (product photos are lit brighter than rooms): chosen on the
# validation products' masked denoising loss (0.2096 with this range, 0.2165 with (0.85, 1.15), 0.2122 with
# (0.5, 1.05)).
DEFAULT_EXPOSURE = (0.65, 1.1)
# The share of training masks that are the placement box a user draws (`subjectpaint.masks.placement_box`); the rest
# are the paper's augmented masks (random margins, Bezier outlines). Validation products, strength 0.6: 0.0 +1.43 dB,
# 0.5 +1.45, 1.0 +1.62 (best strength 0.5: +1.32 / +1.53 / +1.67). A box that fits the product tells the adapter where
# the product's edges are; an app that lets users draw loose or free-form masks may want a lower share.
DEFAULT_PLACEMENT_P = 1.0
STORAGE = ("int8", "fp16", "fp32")


class SubjectExists(VersionExists, SubjectPaintError):
    """`Subject.train(name=...)` for a name already in the registry, without `new_version=True`."""


def _crop_uri(image: PIL.Image.Image, box, size: int) -> str:
    """A square crop around the product (25% margin, backdrop-padded) as a data URI: PNG up to 128 px, JPEG above
    (it lives in the adapter's metadata, so it must stay small next to the ~0.9 MB SD-size adapter)."""
    x0, y0, x1, y1 = box
    side = int(max(x1 - x0, y1 - y0) * 1.25) + 2
    left, top = (x0 + x1) // 2 - side // 2, (y0 + y1) // 2 - side // 2
    border = [image.getpixel((x, y)) for x in (0, image.width - 1) for y in (0, image.height - 1)]
    backdrop = tuple(sorted(c[i] for c in border)[len(border) // 2] for i in range(3))
    canvas = PIL.Image.new("RGB", (side, side), backdrop)
    canvas.paste(image, (-left, -top))
    buf = io.BytesIO()
    fmt = "png" if size <= 128 else "jpeg"
    canvas.resize((size, size), PIL.Image.BICUBIC).save(buf, format=fmt, **({"quality": 90} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
        *,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        steps: int = DEFAULT_STEPS,
        batch_size: int = 8,
        lr: float = DEFAULT_LR,
        lr_schedule: str = "constant",
        strength: float = DEFAULT_STRENGTH,
        seed: int = 0,
        new_version: bool = False,
        detector="facebook/detr-resnet-50",
        min_score: float = 0.7,
        labels: set[str] | None = None,
        backgrounds: Sequence | None = None,
        composite_p: float = 1.0,
        placement_p: float = DEFAULT_PLACEMENT_P,
        upright: bool = True,
        shadow_p: float = 0.7,
        exposure: tuple[float, float] = DEFAULT_EXPOSURE,
        storage: str = "int8",
        energy: float | None = None,
        workdir: str | os.PathLike | None = None,
        registry=None,
        progress: bool = True,
        trainer_kwargs: Mapping[str, Any] | None = None,
    ) -> "Subject":
        """Train, export and register an adapter for the product shown in `images` (2-4 photos recommended):
        photos on a plain backdrop (the product is found with DETR or the backdrop's colour), or cut-outs with
        a transparent background (RGBA PNGs: their alpha is the product's matte).

        `storage`: "int8" (default; ~0.8 MB at SD1.5 shape, rank 4), "fp16" or "fp32"; `energy`: optional SVD
        truncation keeping that fraction of each module's energy. `workdir`: keep Lightning checkpoints there
        (rerunning with the same arguments resumes an interrupted run). `backgrounds`: images to composite the
        product onto (default: 32 procedural demo rooms); `composite_p`: the share of training targets that are such
        composites (the rest are the photos themselves); `placement_p`: the share of training masks that are the
        product's placement box (`subjectpaint.masks.placement_box`; the rest are the paper's augmented masks);
        `upright`: stand a tilted photo's product upright in the composites (`trainers.data.upright_angle`);
        `shadow_p`: the share of composites with a contact shadow under the product (painted inside the mask, as a
        placement must); `exposure`: the range of the brightness factor on the composited product (product photos
        are usually lit brighter than the rooms they go into);
        `lr_schedule`: "constant" (default) or "cosine" (decays to 0 at the last step; no better at the default
        strength on the demo base: see the note at DEFAULT_LR);
        `strength`: the fraction of the trained weight delta that is exported (folded into the LoRA B factors;
        DEFAULT_STRENGTH was chosen on the demo base's validation products). Training runs where the base lives
        (its CUDA device, MPS or the CPU; `trainer_kwargs` go to Lightning's Trainer and override that), and the base
        is left on its device afterwards. The training recipe is recorded in the adapter's metadata. Raises
        InvalidName, InvalidArgument, InvalidImage (corrupt file, no product found), SubjectExists before any
        training or writing.
        """
        from adapters_store.naming import validate_name
        from trainers.annotate import Annotator, NoProductFound, from_alpha
        from trainers import export
        from trainers.data import SubjectDataModule, check_exposure
        from trainers.lora_module import SubjectLoRAModule, accelerator_for, check_lr_schedule, fit

        # 1. Check inputs: nothing is trained or written on bad input
        validate_name(name)
        if isinstance(images, (str, os.PathLike, PIL.Image.Image)) or not isinstance(images, Sequence):
            raise InvalidArgument("images must be a list of product photos (paths, PIL images or arrays)")
        if len(images) == 0:
            raise InvalidArgument("Subject.train needs at least one product photo (2-4 recommended)")
        if storage not in STORAGE:
            raise InvalidArgument(f"storage must be one of {STORAGE}, got {storage!r}")
        check_lr_schedule(lr_schedule)
        for what, p in (("composite_p", composite_p), ("placement_p", placement_p), ("shadow_p", shadow_p)):
            if not 0.0 <= float(p) <= 1.0:
                raise InvalidArgument(f"{what} must be in [0, 1], got {p}")
        try:
            exposure = check_exposure(exposure)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 2.0:
            raise InvalidArgument(f"strength must be in (0, 2], got {strength}")
        if energy is not None and not 0.0 < float(energy) <= 1.0:
            raise InvalidArgument(f"energy must be in (0, 1], got {energy}")
        for what, value in (("rank", rank), ("steps", steps), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{what} must be a positive int, got {value!r}")
        loaded = [load_cutout(img, f"photo {i}") for i, img in enumerate(images)]
        photos = [rgb for rgb, _ in loaded]
        registry = _registry(studio, registry)
        if registry.exists(name) and not new_version:
            raise SubjectExists(f"subject {name!r} is already registered (latest {registry.get(name).ref}); "
                                "pass new_version=True to add a version")
        base = _base(studio)
        fingerprint = base.fingerprint()

        # 2. Annotate: the product's box and matte in every photo
        annotator = detector if isinstance(detector, Annotator) else Annotator(detector, labels=labels,
                                                                                min_score=min_score)
        notes = []
        for i, (photo, matte) in enumerate(loaded):
            try:  # a cut-out (transparent PNG) carries its own matte; a photo on a backdrop is annotated
                notes.append(from_alpha(matte) if matte is not None else annotator(photo))
            except NoProductFound as exc:
                raise InvalidImage(f"photo {i}: no product found ({exc})") from None

        # 3. Fit the LoRA (Lightning; checkpoints in workdir)
        if backgrounds is None:
            from .demo.scenes import TRAIN_SEEDS, make_room

            backgrounds = [make_room(TRAIN_SEEDS[(seed * 7919 + k) % len(TRAIN_SEEDS)], base.resolution)
                           for k in range(32)]
        backgrounds = [load_image(b, "background") for b in backgrounds]
        data = SubjectDataModule.for_base(base, photos, notes, backgrounds=backgrounds, batch_size=batch_size,
                                          seed=seed, composite_p=composite_p, placement_p=placement_p,
                                          upright=upright, shadow_p=shadow_p,
                                          exposure=exposure)
        module = SubjectLoRAModule(base, rank=rank, alpha=alpha, dropout=dropout, targets=targets, lr=lr, seed=seed,
                                   lr_schedule=lr_schedule)
        accelerator, devices = accelerator_for(base.device)  # train where the base lives (trainer_kwargs override)
        trainer_kwargs = {"accelerator": accelerator, "devices": devices, **dict(trainer_kwargs or {})}
        with tempfile.TemporaryDirectory(prefix="subjectpaint-train-") as tmp:
            trainer = fit(module, data, steps, workdir if workdir is not None else tmp, progress=progress,
                          label=f"training {name}", **trainer_kwargs)
            loss = trainer.callback_metrics.get("loss")

        # 4. Export: interchange tensors + metadata, then register
        alpha_used = float(alpha if alpha is not None else rank)
        best = max(range(len(notes)), key=lambda i: notes[i].score if notes[i].method == "background"
                   else 100.0 * notes[i].score)
        crop = _crop_uri(photos[best], notes[best].box, min(base.resolution, 224))
        methods = sorted({n.method for n in notes})
        meta = export.build_metadata(
            rank=rank, alpha=alpha_used, targets=targets, base_fingerprint=fingerprint, subject=name,
            dropout=dropout,
            extra={"annotation_method": "+".join(methods),
                   "annotation_score": min(float(n.score) for n in notes),
                   "annotations": [n.as_metadata() for n in notes],
                   "exemplar": crop,
                   "training": {"steps": steps, "batch_size": batch_size, "lr": lr,
                                "lr_schedule": lr_schedule, "strength": float(strength),
                                "seed": seed, "placement_p": float(placement_p), "composite_p": float(composite_p),
                                "shadow_p": float(shadow_p), "upright": bool(upright),
                                "exposure": list(exposure),
                                "backgrounds": len(backgrounds),
                                "accelerator": str(trainer_kwargs.get("accelerator")),
                                "dropout": dropout, "photos": len(photos), "base": base.name,
                                "detector_error": annotator.detector_error}})
        tensors = export.fold_scale(module.lora_state_dict(), rank, alpha_used * float(strength))
        stored, meta = export.compress(tensors, meta, dtype=torch.float32 if storage == "fp32" else torch.float16,
                                       energy=energy, int8=storage == "int8")
        if registry.exists(name) and not new_version:  # a concurrent trainer got there first
            raise SubjectExists(f"subject {name!r} was registered while training; pass new_version=True")
        record = registry.register(name, stored, meta, fingerprint,
                                   training={"steps": steps, "final_loss": None if loss is None else float(loss)})
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
