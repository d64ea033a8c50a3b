"""TrainRecipe: every setting of a subject adapter's training, in one dataclass (PEFT `LoraConfig` style).

    recipe = TrainRecipe.for_base(base)                      # "demo" for the shipped demo base, else "paint-by-example"
    recipe = TrainRecipe.from_preset("paint-by-example", steps=200, precision="bf16-mixed")
    recipe = recipe.replace(lr=1e-4)                         # unknown field or bad value: InvalidArgument

Presets:
- "paint-by-example" (any base but the demo): shared/papers/lora-image-guided-inpainting.txt 5.1: AdamW at lr 3e-5,
  batch 16, 40 epochs over the photos, LoRA dropout 0.2; the paper's self-reference targets (the photos themselves,
  references their augmented crops, Paint by Example's flip/rotation/blur/elastic augmentation and its enlarged box
  and Bezier masks, paint-by-example.txt 3.2.2); full strength. Composites only onto rooms the user gives.
- "demo": the values chosen on the 64-px demo base (bench/subject_fidelity.py --validate; docs/experiments.md):
  lr 4e-3 for 300 steps, exported at strength 0.6, composites onto the demo's procedural rooms, which the demo
  registers with `register_background_source` (trainers never imports the demo).

The resolved recipe (`to_dict`) is stored in the adapter's metadata; `from_dict` reads it back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from subjectpaint.base import DEMO_FINGERPRINT
from subjectpaint.errors import InvalidArgument

PRECISIONS = ("32", "16-mixed", "bf16-mixed", "auto")
STORAGE = ("int8", "fp16", "fp32")
LR_SCHEDULES = ("constant", "cosine")
USER_BACKGROUNDS = "user"  # composites only onto rooms the caller passes; without them, self-reference only


@dataclass(frozen=True)
class TrainRecipe:
    """Every training setting. `steps=None` trains `epochs` passes over the photos: ceil(epochs * photos / batch)."""

    preset: str = "custom"
    # the LoRA (PEFT LoraConfig)
    rank: int = 4
    alpha: float | None = None  # None: = rank
    dropout: float = 0.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # the optimisation (AdamW; Lightning)
    steps: int | None = 300
    epochs: float = 40.0
    batch_size: int = 8  # samples per optimizer step
    accumulate: int = 1  # micro-batches per optimizer step (batch_size / accumulate per forward pass)
    lr: float = 4e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    cond_drop: float = 0.2  # share of references replaced by the learned unconditional vector (Paint by Example)
    precision: str = "32"  # Lightning's; "auto": bf16-mixed on a CUDA bf16 GPU, 16-mixed on other CUDA, else 32
    gradient_checkpointing: bool = False
    seed: int = 0
    # the data (trainers.data)
    background_source: str = USER_BACKGROUNDS  # or a name registered with `register_background_source`
    backgrounds: int = 32  # rooms a registered source provides
    composite_p: float = 0.0  # share of targets composited onto a room (0 when there are no rooms)
    placement_p: float = 0.0  # share of masks that are the placement box (the rest: enlarged box / Bezier)
    bezier_p: float = 0.5
    upright: bool = False
    shadow_p: float = 0.0
    exposure: tuple[float, float] = (1.0, 1.0)
    reference_jitter: bool = False  # brightness/contrast jitter of references, beyond the paper's augmentation
    # the export
    strength: float = 1.0  # fraction of the trained weight delta folded into the exported factors
    storage: str = "int8"
    energy: float | None = None  # optional SVD truncation keeping this share of each module's energy

    def __post_init__(self):
        _check(self)

    # ------------------------------------------------------------------------------------- presets

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainRecipe":
        if name not in PRESETS:
            raise InvalidArgument(f"unknown recipe {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    @classmethod
    def for_base(cls, base, **overrides) -> "TrainRecipe":
        """"demo" for the shipped demo base (by its weights' fingerprint), "paint-by-example" for any other."""
        name = "demo" if base.fingerprint() == DEMO_FINGERPRINT else "paint-by-example"
        return cls.from_preset(name, **overrides)

    @classmethod
    def resolve(cls, recipe: "TrainRecipe | Mapping | str | None", base, **overrides) -> "TrainRecipe":
        """A recipe from what a caller passes: None (the base's preset), a preset name, a TrainRecipe, or a dict of
        fields (a full `to_dict`, or overrides of the base's preset); then `overrides` on top."""
        if recipe is None:
            return cls.for_base(base, **overrides)
        if isinstance(recipe, str):
            return cls.from_preset(recipe, **overrides)
        if isinstance(recipe, TrainRecipe):
            return recipe.replace(**overrides)
        if isinstance(recipe, Mapping):
            fields = dict(recipe)
            name = fields.pop("preset", None)
            start = cls.for_base(base) if name is None else cls.from_preset(name) if name in PRESETS else cls()
            return start.replace(**fields, **overrides)
        raise InvalidArgument(f"recipe must be a TrainRecipe, a preset name or a dict, got {type(recipe).__name__}")

    def replace(self, **overrides) -> "TrainRecipe":
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise InvalidArgument(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
        return dataclasses.replace(self, **{k: _coerce(k, v) for k, v in overrides.items()})

    # ----------------------------------------------------------------------------------- resolved

    def steps_for(self, photos: int) -> int:
        """Optimizer steps: `steps`, or `epochs` passes over `photos` samples at `batch_size` per step."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * photos / self.batch_size))

    def precision_for(self, device) -> str:
        if self.precision != "auto":
            return self.precision
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            return "32"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.accumulate

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainRecipe":
        return cls().replace(**data)


FIELDS = tuple(f.name for f in dataclasses.fields(TrainRecipe))


def _coerce(name: str, value):
    if name in ("targets", "exposure") and isinstance(value, list):
        return tuple(value)
    return value


def _check(r: TrainRecipe) -> None:
    def bad(what: str, value, rule: str):
        raise InvalidArgument(f"{what} must be {rule}, got {value!r}")

    for name in ("rank", "batch_size", "accumulate", "backgrounds"):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "backgrounds" else 1):
            bad(name, v, "a positive int")
    if r.steps is not None and (isinstance(r.steps, bool) or not isinstance(r.steps, int) or r.steps < 1):
        bad("steps", r.steps, "a positive int or None (epochs)")
    if r.batch_size % r.accumulate:
        bad("batch_size", r.batch_size, f"a multiple of accumulate ({r.accumulate})")
    for name, lo, hi, open_lo in (("dropout", 0, 1, False), ("composite_p", 0, 1, False), ("placement_p", 0, 1, False),
                                  ("bezier_p", 0, 1, False), ("shadow_p", 0, 1, False), ("cond_drop", 0, 1, False),
                                  ("strength", 0, 2, True), ("lr", 0, 1, True), ("epochs", 0, 1e6, True),
                                  ("weight_decay", 0, 1, False)):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v <= hi if open_lo else lo <= v <= hi):
            bad(name, v, f"a number in {'(' if open_lo else '['}{lo}, {hi}]")
    if r.alpha is not None and (not isinstance(r.alpha, (int, float)) or r.alpha <= 0):
        bad("alpha", r.alpha, "a positive number or None")
    if r.energy is not None and (not isinstance(r.energy, (int, float)) or not 0 < r.energy <= 1):
        bad("energy", r.energy, "in (0, 1] or None")
    if not isinstance(r.targets, tuple) or not r.targets or not all(isinstance(t, str) and t for t in r.targets):
        bad("targets", r.targets, "a non-empty list of module names")
    try:
        lo, hi = (float(v) for v in r.exposure)
    except (TypeError, ValueError):
        bad("exposure", r.exposure, "(low, high)")
    if not 0.0 < lo <= hi:
        bad("exposure", r.exposure, "(low, high) with 0 < low <= high")
    for name, choices in (("precision", PRECISIONS), ("storage", STORAGE), ("lr_schedule", LR_SCHEDULES)):
        if getattr(r, name) not in choices:
            bad(name, getattr(r, name), f"one of {choices}")
    for name in ("gradient_checkpointing", "upright", "reference_jitter"):
        if not isinstance(getattr(r, name), bool):
            bad(name, getattr(r, name), "true or false")
    if isinstance(r.seed, bool) or not isinstance(r.seed, int) or r.seed < 0:
        bad("seed", r.seed, "a non-negative int")
    if not isinstance(r.background_source, str) or not r.background_source:
        bad("background_source", r.background_source, f"{USER_BACKGROUNDS!r} or a registered source")


PRESETS: dict[str, TrainRecipe] = {
    # shared/papers/lora-image-guided-inpainting.txt 5.1 (AdamW, 3e-5, batch 16, 40 epochs, dropout 0.2) with Paint by
    # Example's augmentation and masks (paint-by-example.txt 3.2.2, 3.2.4: 20% condition drop). Not in the paper:
    # rank (4: the storage target; the paper trains "0.0002%" of the parameters), weight decay (AdamW's default
    # 1e-2), composites when the user gives rooms (half the targets, at neutral exposure).
    "paint-by-example": TrainRecipe(
        preset="paint-by-example", rank=4, dropout=0.2, steps=None, epochs=40.0, batch_size=16, lr=3e-5,
        lr_schedule="constant", weight_decay=1e-2, precision="auto", background_source=USER_BACKGROUNDS,
        composite_p=0.5, placement_p=0.0, strength=1.0),
    # chosen on the demo base's validation products, bench/subject_fidelity.py --validate (the measurements:
    # docs/experiments.md, "Subject training on the demo base")
    "demo": TrainRecipe(
        preset="demo", rank=4, dropout=0.0, batch_size=8, weight_decay=0.0, precision="32",
        steps=300, lr=4e-3,  # a CPU budget; 1e-3 / 2e-3 / 4e-3: -0.09 / +0.55 / +0.90 dB, 8e-3 worse
        lr_schedule="constant",  # cosine: no better at strength 0.6, no steadier
        background_source="demo-rooms", backgrounds=32, composite_p=1.0, upright=True, shadow_p=0.7,
        exposure=(0.65, 1.1),  # product photos are lit brighter than rooms; lowest validation loss of three ranges
        placement_p=1.0,  # placement-box masks: +1.62 dB against +1.43 with the paper's masks only
        reference_jitter=True,
        strength=0.6),  # WiSE-FT-style export at 0.6 of the delta: +1.43 dB against +0.90 at full strength
}

# ------------------------------------------------------------------------------------ background sources

_BACKGROUND_SOURCES: dict[str, Callable] = {}
ENTRY_POINT_GROUP = "subjectpaint.background_sources"


def register_background_source(name: str, make: Callable) -> None:
    """Make `background_source=name` available: `make(base, recipe)` returns the rooms (PIL images) to composite
    onto."""
    _BACKGROUND_SOURCES[name] = make


def background_source(name: str) -> Callable:
    """The source registered under `name`, or else the one an installed package declares under the entry-point
    group "subjectpaint.background_sources" (the demo declares "demo-rooms" in pyproject.toml, so training on the
    demo base needs no import of the demo, and trainers never names it)."""
    if name not in _BACKGROUND_SOURCES:
        from importlib.metadata import entry_points

        for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
            _BACKGROUND_SOURCES[name] = entry.load()
            break
    if name not in _BACKGROUND_SOURCES:
        raise InvalidArgument(f"no background source {name!r} is registered; registered: "
                              f"{', '.join(sorted(_BACKGROUND_SOURCES)) or 'none'}")
    return _BACKGROUND_SOURCES[name]
