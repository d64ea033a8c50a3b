"""SubjectDataModule: a few product photos -> Paint-by-Example training samples (shared/papers/paint-by-example.txt
3.2.2, shared/papers/lora-image-guided-inpainting.txt 4.1/4.3).

Every sample is (target, mask, reference), target and mask as uint8 (`signed_target` gives the VAE's float form; a
batch that Lightning prefetches costs a quarter of float32's memory):
- target: a photo itself, or the product cut out with its foreground matte and composited onto a background
  (any list of images: the user's rooms, or the demo preset's procedural rooms), at a random scale, position and
  brightness; optionally stood upright (the photo's tilt undone, `upright_angle`) and with a soft contact shadow under it, since a
  placement stands the product on a floor or table;
- mask: with probability `placement_p`, the placement box a user draws for the product (`subjectpaint.masks.
  placement_box`: the product's box, a small margin, room below for its shadow); otherwise the paper's augmented
  mask: the box grown by a random margin, as a box mask or the paper's Bezier mask (never cutting into the product);
- reference: a square crop around the product in one of the photos, augmented with torchvision v2 (horizontal
  flip 0.5, rotation up to 20 degrees, blur 0.3, elastic 0.3, as the paper; optionally brightness/contrast jitter,
  since the exemplar a placement gets is another photo, lit differently) and normalised for the image encoder.

Sample `i` is a pure function of `(seed, i)`; `StepSampler` hands step `s` on rank `r` its own ids, starting at
the Trainer's restored step, so data order and augmentation are the same in an interrupted-and-resumed run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import lightning as L
import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

from subjectpaint.masks import bezier_mask, box_mask, contact_shadow, placement_box, shadow_extent

from .annotate import Annotation, decontaminate



def to_uint8(img: PIL.Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 RGB: how a sample carries its target (a quarter of float32's bytes, exact for an 8-bit image)."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())


def to_unit(img: PIL.Image.Image) -> torch.Tensor:
    """(3, H, W) float32 RGB in [0, 1]."""
    return to_uint8(img).float() / 255.0


def signed_target(target: torch.Tensor) -> torch.Tensor:
    """A batch's target as the VAE takes it, a new float32 tensor in [-1, 1]: from uint8 RGB (the samples' form)
    exactly as `to_unit(image) * 2 - 1` computes it, or a copy of a float target already in [-1, 1]."""
    if target.dtype == torch.uint8:
        return target.float() / 255.0 * 2 - 1
    return target.to(torch.float32, copy=True)


@dataclass(frozen=True)
class Cutout:
    """One photo prepared for training: square `image` at the training size, the product `box` in it, its
    `matte` (H, W) in [0, 1] and the backdrop colour (for padding references)."""

    image: PIL.Image.Image
    box: tuple[int, int, int, int]
    matte: np.ndarray
    backdrop: tuple[int, int, int]
    tilt: float = 0.0  # degrees (PIL's counter-clockwise) that stand the product upright: `upright_angle(matte)`
    colors: np.ndarray | None = field(default=None, repr=False, compare=False)  # (H, W, 3) 0-255, edges unmixed

    @property
    def crop(self) -> tuple[np.ndarray, np.ndarray]:
        """The product cut out: its box of the image (H, W, 3 in [0, 1]; on partly covered pixels the product's
        own colour, with the photo's backdrop taken out, when the annotation knew the backdrop) and of the matte."""
        x0, y0, x1, y1 = self.box
        colors = np.asarray(self.image, dtype=np.float32) if self.colors is None else self.colors
        return colors[y0:y1, x0:x1] / 255, self.matte[y0:y1, x0:x1]

    @cached_property
    def upright_crop(self) -> tuple[np.ndarray, np.ndarray]:
        """`crop` with the photo's tilt undone (computed once per photo)."""
        return _rotate_cutout(*self.crop, self.tilt) if self.tilt else self.crop


def upright_angle(matte: np.ndarray, limit: float = 20.0, step: float = 1.0) -> float:
    """The rotation (degrees, counter-clockwise as PIL's `rotate`) within +-`limit` that makes the product's
    axis-aligned box smallest: the usual deskew for an object photographed slightly tilted. Ties go to the
    smaller rotation, so an upright or round product stays as it is."""
    m = PIL.Image.fromarray((np.clip(matte, 0, 1) * 255).astype(np.uint8), "L")
    areas = {}
    for angle in np.arange(-limit, limit + step / 2, step):
        a = np.asarray(m.rotate(float(angle), PIL.Image.BILINEAR, expand=True)) > 127
        rows, cols = np.nonzero(a.any(1))[0], np.nonzero(a.any(0))[0]
        if not len(rows):
            return 0.0
        areas[float(angle)] = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    smallest = min(areas.values())
    return min((a for a, v in areas.items() if v <= 1.02 * smallest), key=abs)  # within resampling noise


def prepare(photo: PIL.Image.Image, note: Annotation, size: int) -> Cutout:
    """Square crop around the product (as large as the photo allows), resized to `size`."""
    photo = photo.convert("RGB")
    w, h = photo.size
    x0, y0, x1, y1 = note.box
    side = max(min(w, h), x1 - x0, y1 - y0)
    left = int(np.clip((x0 + x1) // 2 - side // 2, min(0, w - side), max(0, w - side)))
    top = int(np.clip((y0 + y1) // 2 - side // 2, min(0, h - side), max(0, h - side)))
    arr = np.asarray(photo)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    backdrop = tuple(int(v) for v in np.median(border, axis=0))
    canvas = PIL.Image.new("RGB", (side, side), backdrop)
    canvas.paste(photo, (-left, -top))
    matte = PIL.Image.new("F", (side, side), 0.0)
    matte.paste(PIL.Image.fromarray(note.foreground.astype(np.float32), "F"), (-left, -top))
    colors = None
    if note.backdrop is not None and note.backdrop.shape[:2] == (h, w):
        own = decontaminate(arr.astype(np.float32), note.backdrop, note.foreground.astype(np.float32))
        colors = PIL.Image.new("RGB", (side, side), backdrop)
        colors.paste(PIL.Image.fromarray(own.round().astype(np.uint8), "RGB"), (-left, -top))
    k = size / side
    box = (int(np.floor((x0 - left) * k)), int(np.floor((y0 - top) * k)),
           min(size, int(np.ceil((x1 - left) * k))), min(size, int(np.ceil((y1 - top) * k))))
    if colors is not None:
        colors = np.asarray(colors, dtype=np.float32)
    if side != size:
        canvas = canvas.resize((size, size), PIL.Image.BICUBIC)
        if colors is not None:  # premultiplied: the backdrop around the product stays out of its edge
            shrink = lambda im: im.resize((size, size), PIL.Image.BICUBIC)  # noqa: E731
            colors = _resample(colors / 255, np.asarray(matte), shrink)[0] * 255
        matte = matte.resize((size, size), PIL.Image.BILINEAR)
    matte = np.clip(np.asarray(matte, dtype=np.float32), 0, 1)
    return Cutout(canvas, box, matte, backdrop, upright_angle(matte[box[1]:box[3], box[0]:box[2]]), colors)


def check_exposure(exposure) -> tuple[float, float]:
    """(low, high) of the composited product's brightness factor, 0 < low <= high; ValueError otherwise."""
    try:
        lo, hi = (float(v) for v in exposure)
    except (TypeError, ValueError):
        raise ValueError(f"exposure must be (low, high), got {exposure!r}") from None
    if not 0.0 < lo <= hi:
        raise ValueError(f"exposure must be (low, high) with 0 < low <= high, got {exposure!r}")
    return lo, hi


def _resample(product: np.ndarray, matte: np.ndarray, op) -> tuple[np.ndarray, np.ndarray]:
    """Apply a PIL geometric `op` (image -> image) to a cut-out with premultiplied alpha, so that the pixels
    around the product (whatever colour they hold) never bleed into its edge. Returns (H', W', 3) colours in
    [0, 1] (0 where the matte is 0) and the (H', W') matte."""
    matte = np.clip(np.ascontiguousarray(matte, dtype=np.float32), 0, 1)
    m = np.clip(np.asarray(op(PIL.Image.fromarray(matte, "F")), dtype=np.float32), 0, 1)
    pre = [np.asarray(op(PIL.Image.fromarray(np.ascontiguousarray(product[..., c] * matte, dtype=np.float32), "F")),
                      dtype=np.float32) for c in range(3)]
    rgb = np.stack(pre, -1) / np.maximum(m, 1e-3)[..., None]
    return np.where(m[..., None] > 1e-3, np.clip(rgb, 0, 1), 0.0).astype(np.float32), m


def _rotate_cutout(product: np.ndarray, matte: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a product crop (H, W, 3 in [0, 1]) and its matte by `angle` degrees, cropped to the rotated matte."""
    rgb, m = _resample(product, matte, lambda im: im.rotate(angle, PIL.Image.BICUBIC, expand=True))
    rows, cols = np.nonzero((m > 0.05).any(1))[0], np.nonzero((m > 0.05).any(0))[0]
    if not len(rows):
        return product, matte
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return rgb[sl], m[sl]


def reference_augment(jitter: bool = True) -> v2.Compose:
    """Paint by Example's reference augmentation (flip 0.5, rotation 20, blur 0.3, elastic 0.3), and with `jitter`
    brightness/contrast jitter (not in the paper: a placement's exemplar is another photo, lit differently)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomRotation(20, fill=1.0),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3),
        v2.RandomApply([v2.ElasticTransform(alpha=20.0, sigma=5.0, fill=1.0)], p=0.3),
        *([v2.ColorJitter(brightness=0.2, contrast=0.1)] if jitter else []),
    ])


class SubjectData(Dataset):
    """Item i (any int >= 0) is a pure function of (seed, i). `len()` is nominal (one epoch's worth)."""

    def __init__(self, cutouts: list[Cutout], backgrounds: list[PIL.Image.Image] | None = None, *,
                 size: int, reference_size: int | None = None, seed: int = 0, composite_p: float = 0.6,
                 bezier_p: float = 0.5, placement_p: float = 0.0, upright: bool = False, shadow_p: float = 0.0,
                 exposure=(0.85, 1.15), reference_jitter: bool = True, mean=CLIP_MEAN, std=CLIP_STD,
                 length: int = 1 << 30):
        if not cutouts:
            raise ValueError("SubjectData needs at least one photo")
        self.reference_augment = reference_augment(reference_jitter)
        self.cutouts, self.size, self.seed, self.length = cutouts, size, seed, length
        self.backgrounds = [b.convert("RGB").resize((size, size), PIL.Image.BICUBIC) for b in backgrounds or []]
        self.composite_p = composite_p if self.backgrounds else 0.0
        self.reference_size = reference_size or size
        self.bezier_p, self.placement_p, self.mean, self.std = bezier_p, float(placement_p), tuple(mean), tuple(std)
        self.upright, self.shadow_p = bool(upright), float(shadow_p)
        self.exposure = check_exposure(exposure)

    def __len__(self):
        return self.length

    # -------------------------------------------------------------------------------------- pieces

    def composite(self, cut: Cutout, rng: np.random.Generator):
        """The product from `cut` pasted onto a random background: height 25-60% of the frame, standing in the
        lower part, random horizontal flip and brightness (a factor drawn from `exposure`). With `upright`, the
        photo's tilt is undone first; with probability `shadow_p` a soft contact shadow is laid under it (as a
        product standing on a floor has).
        Returns the image, the product box and the box the mask must cover (product and shadow)."""
        S = self.size
        product, matte = cut.upright_crop if self.upright else cut.crop
        if rng.random() < 0.5:
            product, matte = product[:, ::-1], matte[:, ::-1]
        ph, pw = matte.shape
        k = min(rng.uniform(0.25, 0.6) * S / ph, 0.8 * S / pw)
        nw, nh = max(2, round(pw * k)), max(2, round(ph * k))
        product, matte = _resample(product, matte, lambda im: im.resize((nw, nh), PIL.Image.BICUBIC))
        product = product * rng.uniform(*self.exposure)
        matte = matte[..., None]
        x = int(rng.integers(0, S - nw + 1))
        bottom = int(rng.integers(min(S, max(nh, int(0.55 * S))), S + 1))
        y = bottom - nh
        room = np.asarray(self.backgrounds[int(rng.integers(len(self.backgrounds)))], dtype=np.float32) / 255
        room = room.copy()
        extent = (x, y, x + nw, bottom)
        if self.shadow_p and rng.random() < self.shadow_p:  # a soft ellipse centred on the base line
            # the demo scenes' shadow, inside the placement box
            shade = rng.uniform(0.45, 0.7) * contact_shadow(extent, S, (0, 0, S, S))
            room *= 1 - shade[..., None]
            extent = shadow_extent(extent, S, S)
        win = room[y:y + nh, x:x + nw]
        room[y:y + nh, x:x + nw] = win * (1 - matte) + np.clip(product, 0, 1) * matte
        image = PIL.Image.fromarray((room * 255).round().clip(0, 255).astype(np.uint8), "RGB")
        return image, (x, y, x + nw, y + nh), extent

    def mask(self, box, rng: np.random.Generator, extent=None) -> torch.Tensor:
        """With probability `placement_p` the product's placement box (`placement_box`: a small margin and room
        for its shadow; what a user draws to place the product, and what the demo scenes use). Otherwise the box
        grown by a random margin (covering `extent` too: the product's shadow), as a box mask or the paper's Bezier
        mask that never cuts into the product."""
        S = self.size
        if self.placement_p and rng.random() < self.placement_p:
            return box_mask((S, S), placement_box((S, S), box))
        x0, y0, x1, y1 = box if extent is None else (min(box[0], extent[0]), min(box[1], extent[1]),
                                                      max(box[2], extent[2]), max(box[3], extent[3]))
        m = [int(rng.integers(0, max(1, round(0.08 * S)) + 1)) for _ in range(4)]
        grown = (max(0, x0 - m[0]), max(0, y0 - m[1]), min(S, x1 + m[2]), min(S, y1 + m[3]))
        if rng.random() < self.bezier_p:
            sub = np.random.default_rng(int(rng.integers(2**31)))
            mask = bezier_mask((S, S), grown, sub, max_offset=max(1, round(5 * S / 512) + 1))
            return torch.maximum(mask, box_mask((S, S), (x0, y0, x1, y1)))  # never cut into the product
        return box_mask((S, S), grown)

    def reference(self, cut: Cutout) -> torch.Tensor:
        """Square crop with a 25% margin around the product, backdrop-padded (what a retailer exemplar shows)."""
        x0, y0, x1, y1 = cut.box
        side = int(max(x1 - x0, y1 - y0) * 1.25) + 2
        left, top = (x0 + x1) // 2 - side // 2, (y0 + y1) // 2 - side // 2
        canvas = PIL.Image.new("RGB", (side, side), cut.backdrop)
        canvas.paste(cut.image, (-left, -top))
        return to_unit(canvas.resize((self.reference_size, self.reference_size), PIL.Image.BICUBIC))

    # ---------------------------------------------------------------------------------------- item

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)])
        cut = self.cutouts[int(rng.integers(len(self.cutouts)))]
        if rng.random() < self.composite_p:
            image, box, extent = self.composite(cut, rng)
        else:
            image, box, extent = cut.image, cut.box, None
        mask = self.mask(box, rng, extent)
        ref_cut = self.cutouts[int(rng.integers(len(self.cutouts)))]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**31)))
            reference = self.reference_augment(self.reference(ref_cut)).clamp(0, 1)
        reference = v2.functional.normalize(reference, self.mean, self.std)
        return {"target": to_uint8(image), "mask": mask[None].to(torch.uint8), "reference": reference,
                "index": torch.tensor(int(i))}


class StepSampler(Sampler[int]):
    """The sample ids of optimizer step s on rank r of W are ((s * W + r) * batch + j for j < batch), from
    `start_step` on, without end and without a length (Lightning treats the loader as infinite; `max_steps` stops it). The data module starts it at the Trainer's
    (restored) global step, so a resumed run sees exactly the samples an uninterrupted one would."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0):
        self.batch_size, self.rank, self.world_size, self.start_step = batch_size, rank, world_size, start_step

    def __iter__(self):
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)
            step += 1


class SubjectDataModule(L.LightningDataModule):
    """Photos + their annotations -> an endless training DataLoader of `batch_size` per process (one epoch; the
    Trainer's `max_steps` ends it). Use with `Trainer(use_distributed_sampler=False)` (`trainers.lora_module.
    make_trainer` does): the sampler splits data by rank and starts at the Trainer's restored global step."""

    def __init__(self, photos: list[PIL.Image.Image], annotations: list[Annotation], *, size: int,
                 reference_size: int | None = None, backgrounds: list[PIL.Image.Image] | None = None,
                 batch_size: int = 8, seed: int = 0, composite_p: float = 0.6, bezier_p: float = 0.5,
                 placement_p: float = 0.0, upright: bool = False, shadow_p: float = 0.0, exposure=(0.85, 1.15),
                 reference_jitter: bool = True, mean=CLIP_MEAN, std=CLIP_STD, num_workers: int = 0):
        super().__init__()
        if len(photos) != len(annotations) or not photos:
            raise ValueError("need one annotation per photo and at least one photo")
        self.cutouts = [prepare(p, a, size) for p, a in zip(photos, annotations)]
        self.dataset = SubjectData(self.cutouts, backgrounds, size=size, reference_size=reference_size, seed=seed,
                                   composite_p=composite_p, bezier_p=bezier_p, placement_p=placement_p,
                                   upright=upright, shadow_p=shadow_p, exposure=exposure,
                                   reference_jitter=reference_jitter, mean=mean, std=std)
        self.batch_size, self.num_workers = batch_size, num_workers

    @classmethod
    def for_base(cls, base, photos, annotations, **kw) -> "SubjectDataModule":
        """Sizes and normalisation from an `ExemplarInpainter` (its resolution and CLIP feature extractor)."""
        fe = base.feature_extractor
        crop = fe.crop_size
        ref = int(crop["height"]) if not isinstance(crop, (int, float)) else int(crop)
        return cls(photos, annotations, size=base.resolution, reference_size=ref, mean=fe.image_mean,
                   std=fe.image_std, **kw)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world, step = (trainer.global_rank, trainer.world_size, trainer.global_step) if trainer else (0, 1, 0)
        # with gradient accumulation a "step" of the sampler is one micro-batch
        step *= trainer.accumulate_grad_batches if trainer else 1
        sampler = StepSampler(self.batch_size, rank, world, start_step=step)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)
