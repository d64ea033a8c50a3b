"""train_subject: a few product photos -> LoRA adapter tensors + interchange metadata (nothing is registered here).

    tensors, metadata = train_subject(base, photos, TrainRecipe.for_base(base), name="blue-mug")

1. photos -> RGB + matte (a transparent PNG's alpha), 2. annotate (DETR, backdrop fallback), 3. rooms (the user's, or
the recipe's registered background source), 4. data + LoRA module + Lightning fit (precision, gradient accumulation
and checkpointing from the recipe; checkpoints in `workdir`, resumed from there), 5. export: fold the scale and the
strength, compress to the recipe's storage, metadata with the resolved recipe.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from typing import Any, Mapping, Sequence

import PIL.Image
import torch

from subjectpaint.errors import InvalidArgument, InvalidImage
from subjectpaint.images import load_cutout, load_image

from . import export
from .annotate import Annotator, NoProductFound, from_alpha
from .data import SubjectDataModule
from .lora_module import SubjectLoRAModule, accelerator_for, fit
from .recipe import FIELDS, USER_BACKGROUNDS, TrainRecipe, background_source


def load_photos(images: Sequence) -> list[tuple[PIL.Image.Image, Any]]:
    """(RGB, matte or None) per photo; InvalidArgument / InvalidImage on bad input."""
    if isinstance(images, (str, os.PathLike, PIL.Image.Image)) or not isinstance(images, Sequence):
        raise InvalidArgument("images must be a list of product photos (paths, PIL images or arrays)")
    if len(images) == 0:
        raise InvalidArgument("training needs at least one product photo (2-4 recommended)")
    return [load_cutout(img, f"photo {i}") for i, img in enumerate(images)]


def annotate(loaded, detector="facebook/detr-resnet-50", min_score: float = 0.7, labels=None):
    """Each photo's product box and matte; returns (annotations, annotator). InvalidImage when none is found."""
    annotator = detector if isinstance(detector, Annotator) else Annotator(detector, labels=labels,
                                                                            min_score=min_score)
    notes = []
    for i, (photo, matte) in enumerate(loaded):
        try:  # a cut-out (transparent PNG) carries its own matte; a photo on a backdrop is annotated
            notes.append(from_alpha(matte) if matte is not None else annotator(photo))
        except NoProductFound as exc:
            raise InvalidImage(f"photo {i}: no product found ({exc})") from None
    return notes, annotator


def rooms_for(base, recipe: TrainRecipe, backgrounds: Sequence | None) -> list[PIL.Image.Image]:
    """The rooms to composite onto: the caller's, else the recipe's registered source, else none (self-reference)."""
    if backgrounds is None and recipe.background_source != USER_BACKGROUNDS:
        backgrounds = background_source(recipe.background_source)(base, recipe)
    return [load_image(b, "background") for b in backgrounds or ()]


def train_subject(base, photos: Sequence, recipe: TrainRecipe, *, name: str = "subject", backgrounds=None,
                  detector="facebook/detr-resnet-50", min_score: float = 0.7, labels=None,
                  workdir: str | os.PathLike | None = None, progress: bool = True, callbacks: Sequence = (),
                  trainer_kwargs: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Train an adapter for the product in `photos` on `base` with `recipe`; returns the stored tensors (the
    recipe's storage: int8 factors + scales, fp16 or fp32) and the interchange metadata (the resolved recipe under
    "training"). `callbacks` and `trainer_kwargs` go to Lightning's Trainer (they override the recipe's device and
    precision). The base's modules are left on the device and in the dtype they had."""
    if not isinstance(recipe, TrainRecipe):
        raise InvalidArgument(f"recipe must be a TrainRecipe, got {type(recipe).__name__}")
    trainer_kwargs = dict(trainer_kwargs or {})
    if "max_steps" in trainer_kwargs:
        raise InvalidArgument("trainer_kwargs may not set max_steps (the recipe's steps do)")
    callbacks = [*callbacks, *trainer_kwargs.pop("callbacks", ())]
    # 1-3. Inputs: photos, annotations, rooms (all checked before any training)
    loaded = load_photos(photos)
    notes, annotator = annotate(loaded, detector, min_score, labels)
    rgb = [p for p, _ in loaded]
    rooms = rooms_for(base, recipe, backgrounds)
    steps = recipe.steps_for(len(rgb))
    accelerator, devices = accelerator_for(base.device)  # train where the base lives (trainer_kwargs override)
    precision = recipe.precision_for(base.device)
    resolved = recipe.replace(steps=steps, precision=precision)

    # 4. Fit the LoRA (Lightning; checkpoints in workdir)
    data = SubjectDataModule.for_base(base, rgb, notes, backgrounds=rooms, batch_size=recipe.micro_batch,
                                      seed=recipe.seed, composite_p=recipe.composite_p, bezier_p=recipe.bezier_p,
                                      placement_p=recipe.placement_p, upright=recipe.upright,
                                      shadow_p=recipe.shadow_p, exposure=recipe.exposure,
                                      reference_jitter=recipe.reference_jitter)
    module = SubjectLoRAModule(base, rank=recipe.rank, alpha=recipe.alpha, dropout=recipe.dropout,
                               targets=recipe.targets, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               drop=recipe.cond_drop, seed=recipe.seed, lr_schedule=recipe.lr_schedule,
                               gradient_checkpointing=recipe.gradient_checkpointing, accumulate=recipe.accumulate)
    kwargs = {"accelerator": accelerator, "devices": devices, "precision": precision,
              "accumulate_grad_batches": recipe.accumulate, **trainer_kwargs}
    with tempfile.TemporaryDirectory(prefix="subjectpaint-train-") as tmp:
        trainer = fit(module, data, steps, workdir if workdir is not None else tmp, progress=progress,
                      label=f"training {name}", callbacks=callbacks, **kwargs)
        loss = trainer.callback_metrics.get("loss")

    # 5. Export: interchange tensors + metadata
    best = max(range(len(notes)), key=lambda i: notes[i].score if notes[i].method == "background"
               else 100.0 * notes[i].score)
    training = {**resolved.to_dict(), "rooms": len(rooms), "photos": len(rgb), "base": base.name,
                "accelerator": str(kwargs["accelerator"]), "final_loss": None if loss is None else float(loss),
                "detector_error": annotator.detector_error}
    meta = export.build_metadata(
        rank=recipe.rank, alpha=recipe.lora_alpha, targets=recipe.targets, base_fingerprint=base.fingerprint(),
        subject=name, dropout=recipe.dropout,
        extra={"annotation_method": "+".join(sorted({n.method for n in notes})),
               "annotation_score": min(float(n.score) for n in notes),
               "annotations": [n.as_metadata() for n in notes],
               "exemplar": crop_uri(rgb[best], notes[best].box, min(base.resolution, 224)),
               "training": training})
    tensors = export.fold_scale(module.lora_state_dict(), recipe.rank, recipe.lora_alpha * float(recipe.strength))
    return export.compress(tensors, meta, dtype=torch.float32 if recipe.storage == "fp32" else torch.float16,
                           energy=recipe.energy, int8=recipe.storage == "int8")


def recipe_from_metadata(metadata: Mapping[str, Any]) -> TrainRecipe:
    """The resolved recipe an adapter was trained with (its metadata's "training" entry, a dict or JSON)."""
    import json

    training = metadata.get("training") or {}
    if isinstance(training, str):
        training = json.loads(training)
    return TrainRecipe.from_dict({k: v for k, v in training.items() if k in FIELDS})


def crop_uri(image: PIL.Image.Image, box, size: int) -> str:
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
