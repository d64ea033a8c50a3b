"""Product boxes for the training photos: DETR (transformers) first, a background-colour foreground box as the
fallback (the LoRA paper annotates with facebook/detr-resnet-50; retail photos have plain backdrops, so when DETR
is unavailable or unsure the backdrop itself tells where the product is).

    annotator = Annotator()                       # DETR from the hub/local dir if it loads, else fallback only
    note = annotator(photo)                       # Annotation(box, foreground, method, score, label)

`foreground_box(image)` is the fallback: fit the backdrop as a colour plane (per-channel a + b*x + c*y, robust to
gradients) to the border pixels, mark pixels far from it (noise-scaled threshold, hysteresis to keep soft edges),
drop specks (an opening, then the far pixels still connected to what is left come back: thin parts stay), fill
holes, and take the box. A photo with no such region raises `NoProductFound`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

DETR_DEFAULT = "facebook/detr-resnet-50"
BUSY_NOISE = 12.0  # backdrop residual (RGB distance, median of the border) above which the backdrop is not plain
MAX_SCENE_BOX = 0.5  # on a photo without a plain backdrop, a box over this fraction of the frame is a scene
ADVICE = "use a cut-out (a PNG with a transparent background) or a photo of the product on a plain backdrop"


class NoProductFound(ValueError):
    """No product could be located in a photo (uniform image, no distinct backdrop)."""


@dataclass(frozen=True)
class Annotation:
    """Where the product is in one photo. `foreground` is an (H, W) float mask in [0, 1] (the product's matte as
    far as the backdrop tells it; the box filled when it cannot)."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive)
    foreground: np.ndarray
    method: str  # "detr" or "background"
    score: float  # DETR class probability, or the backdrop contrast (foreground residual / threshold)
    label: str | None = None
    backdrop: np.ndarray | None = field(default=None, repr=False, compare=False)  # (H, W, 3) backdrop fit, 0-255

    def as_metadata(self) -> dict:
        return {"box": list(self.box), "method": self.method, "score": round(float(self.score), 4),
                "label": self.label}


# ---------------------------------------------------------------------------------------------- fallback


def _border(h: int, w: int, width: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return m


def _plane_residual(img: np.ndarray, width: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Distance of every pixel from the backdrop plane fitted (robustly) to the border; the noise scale; and the
    plane itself (H, W, 3): the backdrop colour behind every pixel."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    design = np.stack([np.ones_like(xx), xx / w, yy / h], -1).reshape(-1, 3)
    pixels = img.reshape(-1, 3).astype(np.float64)
    use = _border(h, w, width).reshape(-1)
    for _ in range(3):  # refit without border pixels the product covers
        coef, *_ = np.linalg.lstsq(design[use], pixels[use], rcond=None)
        resid = np.linalg.norm(pixels - design @ coef, axis=1)
        border = _border(h, w, width).reshape(-1)
        med = np.median(resid[border])
        sigma = 1.4826 * np.median(np.abs(resid[border] - med)) + 1e-6
        use = border & (resid < med + 4 * sigma)
        if use.sum() < 8:
            break
    noise = float(np.median(resid[use])) if use.any() else float(med)
    return resid.reshape(h, w), max(noise, 0.5), (design @ coef).reshape(h, w, 3).astype(np.float32)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    return ~_dilate(~mask, r)


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The pixels of `allowed` 8-connected to `seed` (within `allowed`): a flood fill by repeated 3x3 dilation."""
    grown = seed & allowed
    for _ in range(allowed.sum()):
        nxt = _dilate(grown, 1) & allowed
        if np.array_equal(nxt, grown):
            break
        grown = nxt
    return grown


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The (x0, y0, x1, y1) box of a non-empty boolean mask (x1, y1 exclusive)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background = what a flood fill from the border reaches through non-mask pixels; the rest is product."""
    h, w = mask.shape
    canvas = PIL.Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").copy()  # writable
    border = [(x, y) for x in range(w) for y in (0, h - 1)] + [(x, y) for y in range(h) for x in (0, w - 1)]
    for xy in border:
        if canvas.getpixel(xy) == 0:
            PIL.ImageDraw.floodfill(canvas, xy, 128)
    return np.asarray(canvas) != 128


def foreground_box(image: PIL.Image.Image, min_area: float = 0.002, max_area: float = 0.97) -> Annotation:
    """The product's box from the photo's backdrop colour (border pixels; slight gradients and noise tolerated)."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = img.shape
    if min(h, w) < 8:
        raise NoProductFound(f"photo is too small ({w}x{h})")
    width = max(1, round(0.02 * min(h, w)))
    resid, noise, plane = _plane_residual(img, width)
    if noise > BUSY_NOISE:
        raise NoProductFound(f"the photo's backdrop is busy (its border varies by ~{noise:.0f} levels), so the "
                             f"product cannot be separated from it; {ADVICE}")
    above = resid > max(8.0 * noise, 12.0)
    strong = _dilate(_erode(above, 1), 1) if min(h, w) >= 24 else above  # opening: no isolated noise pixels
    if strong.sum() < max(4, min_area * h * w):
        raise NoProductFound("no region differs from the photo's backdrop (a uniform or near-uniform image?)")
    strong = _grow(strong, above)  # thin parts the opening took (a lamp's stem, chair legs) are still connected
    weak = resid > max(6.0 * noise, 6.0)
    core = strong
    for _ in range(2):  # hysteresis: soft edge pixels adjacent to the core belong to the product
        core = core | (_dilate(core, 1) & weak)
    filled = _fill_holes(core)
    area = filled.mean()
    if area > max_area:
        raise NoProductFound("the whole photo differs from its border: no plain backdrop to find the product on")
    box = _box(filled)
    matte = np.clip((resid - 3.0 * noise) / max(8.0 * noise, 12.0), 0.0, 1.0)
    matte = np.where(_fill_holes(strong), 1.0, matte) * filled
    matte = soft_edges(img, plane, filled, matte, noise)
    score = float(np.median(resid[strong]) / max(8.0 * noise, 12.0))
    return Annotation(box, matte.astype(np.float32), "background", score, backdrop=plane)


def from_alpha(alpha: np.ndarray, backdrop=(255, 255, 255), min_area: float = 0.002) -> Annotation:
    """The annotation a cut-out carries itself: its alpha is the matte, its box the alpha's, and the backdrop
    the colour it was composited on (`load_cutout`: white)."""
    alpha = np.clip(np.asarray(alpha, dtype=np.float32), 0, 1)
    seen = alpha > 0.05
    if seen.mean() < min_area:
        raise NoProductFound("the cut-out's alpha is (nearly) empty: nothing to train on")
    box = _box(seen)
    plane = np.broadcast_to(np.asarray(backdrop, np.float32), alpha.shape + (3,)).copy()
    return Annotation(box, alpha, "alpha", 1.0, backdrop=plane)


def soft_edges(img: np.ndarray, backdrop: np.ndarray, region: np.ndarray, matte: np.ndarray, noise: float,
               radius: int = 2) -> np.ndarray:
    """Partial coverage on the product's outline. A pixel there mixes the product's colour F and the backdrop's
    B: I = a F + (1 - a) B. B is the fitted backdrop; F is the purest product colour nearby (the pixel of
    `region` within `radius` that differs most from its backdrop); a is the projection of I - B on F - B.
    Pixels one step in or out of `region`'s outline get that a; the rest of `matte` is kept."""
    t = torch.from_numpy
    diff = img - backdrop  # (H, W, 3)
    resid = np.linalg.norm(diff, axis=-1) * region  # only product pixels may lend their colour
    k = 2 * radius + 1
    h, w = region.shape
    _, arg = F.max_pool2d(t(resid.astype(np.float32))[None, None], k, stride=1, padding=radius,
                          return_indices=True)
    arg = arg[0, 0].numpy()
    fg_diff = diff.reshape(-1, 3)[arg.reshape(-1)].reshape(h, w, 3)  # F - B of the purest neighbour
    norm2 = (fg_diff**2).sum(-1)
    a = np.clip((diff * fg_diff).sum(-1) / np.maximum(norm2, 1e-6), 0.0, 1.0)
    band = _dilate(region, 1) & ~_erode(region, 1)
    usable = band & (norm2 > (6.0 * noise) ** 2)  # a neighbour that differs clearly from the backdrop
    return np.where(usable, a, matte).astype(np.float32)


def decontaminate(img: np.ndarray, backdrop: np.ndarray, matte: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """The product's own colour under partial coverage: F = B + (I - B) / a (I where a is ~0 or 1), clipped to
    0-255; what compositing the cut-out onto a new background needs, so the old backdrop does not show as a
    halo around it."""
    a = matte[..., None]
    own = backdrop + (img - backdrop) / np.maximum(a, floor)
    return np.clip(np.where((a > floor) & (a < 1.0), own, img), 0, 255).astype(np.float32)


# ------------------------------------------------------------------------------------------------- DETR


class Annotator:
    """DETR boxes with the backdrop fallback.

    `detector`: a hub id or local directory (default facebook/detr-resnet-50), a loaded `DetrForObjectDetection`,
    or None for the fallback only. A detector that cannot be loaded (no network, no weights) is noted in
    `self.detector_error` and the fallback is used. `labels`: only accept DETR classes with these names
    (e.g. {"cup", "vase"}); `min_score`: below it, the fallback decides.
    """

    def __init__(self, detector: str | os.PathLike | torch.nn.Module | None = DETR_DEFAULT, processor=None,
                 labels: set[str] | None = None, min_score: float = 0.7, local_files_only: bool | None = None):
        self.model, self.processor, self.detector_error = None, processor, None
        self.labels = {s.lower() for s in labels} if labels else None
        self.min_score = float(min_score)
        if isinstance(detector, torch.nn.Module):
            self.model = detector.eval()
        elif detector is not None:
            self._load(str(detector), local_files_only)
        if self.model is not None and self.processor is None:
            from transformers import DetrImageProcessor

            self.processor = DetrImageProcessor()

    def _load(self, source: str, local_files_only: bool | None) -> None:
        from transformers import DetrForObjectDetection, DetrImageProcessor

        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            self.model = DetrForObjectDetection.from_pretrained(source, local_files_only=local_files_only,
                                                                use_safetensors=True).eval()
            self.processor = DetrImageProcessor.from_pretrained(source, local_files_only=local_files_only)
        except Exception as exc:  # no network / no weights / not safetensors: the fallback will do
            self.model, self.detector_error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    @torch.no_grad()
    def detect(self, image: PIL.Image.Image) -> tuple[tuple[int, int, int, int], float, str] | None:
        """The most confident non-background DETR box (of an accepted class), or None."""
        if self.model is None:
            return None
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt")
        outputs = self.model(**inputs)
        found = self.processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width)])[0]
        names = self.model.config.id2label
        best = None
        for score, label, box in zip(found["scores"].tolist(), found["labels"].tolist(), found["boxes"].tolist()):
            name = str(names.get(int(label), label)).lower()
            if self.labels is not None and name not in self.labels:
                continue
            x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
            x1, y1 = min(image.width, int(np.ceil(box[2]))), min(image.height, int(np.ceil(box[3])))
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            if best is None or score > best[1]:
                best = ((x0, y0, x1, y1), float(score), name)
        return best

    def __call__(self, image: PIL.Image.Image) -> Annotation:
        """Annotate one photo; raises NoProductFound when neither DETR nor the backdrop finds a product."""
        detected = self.detect(image)
        if detected is not None and detected[1] >= self.min_score:
            box, score, label = detected
            x0, y0, x1, y1 = box
            fg = np.zeros((image.height, image.width), np.float32)
            backdrop = None
            try:  # the backdrop's matte inside the DETR box, when there is a backdrop
                found = foreground_box(image)
                fg[y0:y1, x0:x1] = found.foreground[y0:y1, x0:x1]
                backdrop = found.backdrop
            except NoProductFound:
                pass
            if fg[y0:y1, x0:x1].mean() < 0.2:
                fg[y0:y1, x0:x1] = 1.0
                backdrop = None
            bw, bh = (x1 - x0) / image.width, (y1 - y0) / image.height
            if backdrop is None and bw * bh > MAX_SCENE_BOX:
                raise NoProductFound(f"the {label} found covers {bw:.0%} x {bh:.0%} of a busy photo: a scene, not a "
                                     f"product that can be separated from its background; {ADVICE}")
            return Annotation(box, fg, "detr", score, label, backdrop=backdrop)
        return foreground_box(image)
