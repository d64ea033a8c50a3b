"""Masks: paste-back alpha, box masks, Paint-by-Example Bezier masks.

All masks are float tensors in [0, 1] with 1 = edit / regenerate, 0 = keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

from .errors import InvalidArgument


@dataclass(frozen=True)
class PasteBack:
    """Keep every pixel of the input outside the (grown) mask.

    Pixels within `dilate` px of the mask (Chebyshev distance) take the generated image; a seam `feather` px
    wide blends generated into input; every pixel farther than `dilate + feather` px from the mask is the
    input's own value, bit for bit. `enabled=False` returns the generated image unchanged (diffusers parity).
    Left as None, both scale with the image: dilate = long side / 256 (at least 1), feather = long side / 128
    (at least 2), i.e. 2 and 4 px at 512 px.
    """

    enabled: bool = True
    dilate: int | None = None
    feather: int | None = None

    def __post_init__(self):
        if (self.dilate is not None and self.dilate < 0) or (self.feather is not None and self.feather < 0):
            raise InvalidArgument("paste-back dilate and feather must be >= 0")

    def resolved(self, size: tuple[int, int]) -> tuple[int, int]:
        """(dilate, feather) in pixels for an image of `size` = (W, H)."""
        long = max(size)
        dilate = self.dilate if self.dilate is not None else max(1, round(long / 256))
        feather = self.feather if self.feather is not None else max(2, round(long / 128))
        return dilate, feather

    def alpha(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (..., H, W) -> blend weight of the generated image, same shape; 0 beyond dilate + feather."""
        shape = mask.shape
        dilate, feather = self.resolved((shape[-1], shape[-2]))
        m = (mask.reshape(-1, 1, *shape[-2:]) > 0).float()
        r = feather // 2
        grow = dilate + r
        if grow:
            m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
        if r:
            m = F.avg_pool2d(m, 2 * r + 1, stride=1, padding=r, count_include_pad=False)
        return m.reshape(shape)

    def apply(self, generated: PIL.Image.Image, original: PIL.Image.Image, mask: torch.Tensor) -> PIL.Image.Image:
        """Blend `generated` into `original` (same size) under the grown, feathered mask (H, W)."""
        if not self.enabled:
            return generated
        gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
        inp = np.asarray(original.convert("RGB"), dtype=np.float32)
        a = self.alpha(mask).cpu().numpy()[..., None].astype(np.float32)
        out = np.where(a > 0, np.rint(a * gen + (1.0 - a) * inp), inp)
        return PIL.Image.fromarray(out.clip(0, 255).astype(np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """A rectangle mask (H, W) for `size` = (width, height) and `box` = (x0, y0, x1, y1), x1/y1 exclusive."""
    width, height = size
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        raise InvalidArgument(f"box {box} is empty inside a {width}x{height} image")
    m = torch.zeros(height, width)
    m[y0:y1, x0:x1] = 1.0
    return m


def placement_margin(height: int, margin: float = 0.04) -> int:
    """The pixels a placement box leaves around the product: `margin` of the image height, at least 1."""
    return max(1, round(margin * height))


def shadow_radii(box: tuple[int, int, int, int], height: int) -> tuple[float, float]:
    """(rx, ry) of the soft contact shadow under a product standing at `box` in an image `height` tall: 0.6 of the
    product's width, kept inside its placement box, and 0.1 of its height (at least 1.5 px). The shadow reaches
    0.7 * ry below the box, which `placement_box` leaves room for."""
    w, h = box[2] - box[0], box[3] - box[1]
    return min(0.6 * w, 0.5 * w + placement_margin(height) - 0.5), max(1.5, 0.1 * h)


def contact_shadow(box: tuple[int, int, int, int], height: int, window: tuple[int, int, int, int]) -> np.ndarray:
    """The soft contact shadow under a product standing at `box`, before its strength: an ellipse with
    `shadow_radii`, centred on the box's base line and reaching 0.7 ry below it, with a compact (1 - r^2)^1.5
    falloff; float32 in [0, 1] over `window` = (x0, y0, x1, y1) of an image `height` tall (pixel centres)."""
    rx, ry = shadow_radii(box, height)
    wx0, wy0, wx1, wy1 = window
    yy = np.arange(wy0, wy1, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(wx0, wx1, dtype=np.float32)[None, :] + 0.5
    q = 1 - ((xx - (box[0] + (box[2] - box[0]) / 2)) / rx) ** 2 - ((yy - box[3] + 0.3 * ry) / ry) ** 2
    return np.clip(q, 0, 1) ** 1.5


def shadow_extent(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) that a product standing at `box` covers together with its `contact_shadow`, clipped
    to a `width` x `height` image: the shadow's ellipse is wider than the product and reaches 0.7 ry below it."""
    rx, ry = shadow_radii(box, height)
    cx = box[0] + (box[2] - box[0]) / 2
    return (max(0, int(cx - rx)), box[1], min(width, int(np.ceil(cx + rx))),
            min(height, int(np.ceil(box[3] + 0.7 * ry))))


def placement_box(size: tuple[int, int], box: tuple[int, int, int, int],
                  margin: float = 0.04) -> tuple[int, int, int, int]:
    """The mask box for placing a product at `box` (x0, y0, x1, y1; x1/y1 exclusive) in an image of `size` =
    (width, height): the box grown by `placement_margin` on every side, and further down by the room its contact
    shadow needs (0.7 of its `shadow_radii` ry), clipped to the image. This is the demo scenes' mask
    convention, and what `Subject.train`'s placement masks teach the adapter to fill."""
    width, height = size
    x0, y0, x1, y1 = (int(v) for v in box)
    m = placement_margin(height, margin)
    shadow = math.ceil(0.7 * shadow_radii((x0, y0, x1, y1), height)[1])
    return max(x0 - m, 0), max(y0 - m, 0), min(x1 + m, width), min(y1 + m + shadow, height)


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """The tight box (x0, y0, x1, y1) around the nonzero pixels of a mask (H, W); x1/y1 exclusive."""
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if ys.numel() == 0:
        raise InvalidArgument("mask is empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def bezier_mask(
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    generator: np.random.Generator | None = None,
    points: int = 20,
    max_offset: int = 5,
) -> torch.Tensor:
    """Paint by Example's irregular mask (sec. 3.2.2): for each edge of the box, fit a Bezier curve, sample
    `points` points on it uniformly, move each by a random 1..max_offset px, and join them with straight lines
    into one polygon.

    The control points of each edge's quadratic Bezier are the edge's ends and its midpoint pushed in or out by
    a random fraction of the edge length, so the outline bulges like the paper's Figure 4.
    """
    rng = generator if generator is not None else np.random.default_rng()
    x0, y0, x1, y1 = (float(v) for v in box)
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    outline: list[tuple[float, float]] = []
    for k in range(4):
        (ax, ay), (bx, by) = corners[k], corners[(k + 1) % 4]
        length = math.hypot(bx - ax, by - ay)
        nx, ny = (by - ay) / max(length, 1e-6), -(bx - ax) / max(length, 1e-6)  # outward normal (clockwise box)
        bulge = rng.uniform(-0.15, 0.15) * length
        cx, cy = (ax + bx) / 2 + nx * bulge, (ay + by) / 2 + ny * bulge
        for s in np.linspace(0.0, 1.0, points, endpoint=False):
            px = (1 - s) ** 2 * ax + 2 * (1 - s) * s * cx + s**2 * bx
            py = (1 - s) ** 2 * ay + 2 * (1 - s) * s * cy + s**2 * by
            ox, oy = rng.integers(1, max_offset + 1, size=2) * rng.choice([-1, 1], size=2)
            outline.append((px + ox, py + oy))
    width, height = size
    canvas = PIL.Image.new("L", (width, height), 0)
    PIL.ImageDraw.Draw(canvas).polygon(outline, fill=255)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
