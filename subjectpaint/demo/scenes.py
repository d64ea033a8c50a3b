"""Procedural product-in-room scenes whose true composite is known (numpy + PIL only).

Everything is a pure function of its arguments: `Product.from_seed(seed)`, `product_photos(product, n,
size, seed)`, `make_room(seed, size)` and `make_scene(seed, size, product)` return the same bytes on every
call. Geometry is defined relative to the frame, so one seed gives the same layout at every size.

Seed conventions (enforced by `make_scene` and `scene_split`):

- scene seeds: `TRAIN_SEEDS` = range(0, 1_000_000) for training, `EVAL_SEEDS` = range(10_000_000,
  10_001_000) for held-out evaluation; any other scene seed is refused.
- product seeds: a training scene draws its product from `TRAIN_PRODUCT_SEEDS`; an evaluation scene uses
  `HELDOUT_PRODUCT_SEEDS[i % 100]` (i = seed - EVAL_SEEDS.start), so each of the 100 held-out products
  appears in 10 evaluation scenes (`heldout_scene_seeds(product_seed)`) and never in a training scene.

Boxes are (x0, y0, x1, y1) ints with x1, y1 exclusive (PIL's crop convention). Masks are "L" 0/255.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ..errors import InvalidArgument
from ..masks import contact_shadow, placement_box, placement_margin

__all__ = [
    "SHAPES", "PATTERNS", "TRAIN_SEEDS", "EVAL_SEEDS", "TRAIN_PRODUCT_SEEDS", "HELDOUT_PRODUCT_SEEDS",
    "Product", "Photo", "Scene", "product_photos", "make_room", "make_scene", "scene_split",
    "product_split", "heldout_scene_seeds", "preview",
]

SHAPES = ("mug", "bottle", "box", "lamp", "vase", "chair", "can")
PATTERNS = ("solid", "stripes_h", "stripes_v", "stripes_d", "dots", "checks", "gradient", "two_tone")

TRAIN_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(10_000_000, 10_001_000)
TRAIN_PRODUCT_SEEDS = range(0, 100_000)
HELDOUT_PRODUCT_SEEDS = range(50_000_000, 50_000_100)

SS = 4  # products are rasterised at 4x and box-downsampled (antialiasing)

# stream tags: independent random streams derived from one seed
_PRODUCT, _ROOM, _PLACE, _EXEMPLAR, _PHOTO, _PICK = 1, 2, 3, 4, 5, 6


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _check_seed(seed, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidArgument(f"{what} must be a non-negative int, got {seed!r}")
    return int(seed)


# ------------------------------------------------------------------------------------------ splits


def scene_split(seed: int) -> str:
    """'train' for a seed in TRAIN_SEEDS, 'eval' for one in EVAL_SEEDS; any other seed is refused."""
    seed = _check_seed(seed)
    if seed in TRAIN_SEEDS:
        return "train"
    if seed in EVAL_SEEDS:
        return "eval"
    raise InvalidArgument(
        f"scene seed {seed} is in no split: use TRAIN_SEEDS {TRAIN_SEEDS} or EVAL_SEEDS {EVAL_SEEDS}"
    )


def product_split(seed: int) -> str:
    """'train' for TRAIN_PRODUCT_SEEDS, 'heldout' for HELDOUT_PRODUCT_SEEDS, 'other' otherwise."""
    seed = _check_seed(seed)
    return "train" if seed in TRAIN_PRODUCT_SEEDS else "heldout" if seed in HELDOUT_PRODUCT_SEEDS else "other"


def heldout_scene_seeds(product_seed: int) -> list[int]:
    """The evaluation scene seeds that show held-out product `product_seed` (10 of them)."""
    if _check_seed(product_seed, "product_seed") not in HELDOUT_PRODUCT_SEEDS:
        raise InvalidArgument(f"product seed {product_seed} is not in HELDOUT_PRODUCT_SEEDS")
    k = product_seed - HELDOUT_PRODUCT_SEEDS.start
    return [s for s in EVAL_SEEDS[k:: len(HELDOUT_PRODUCT_SEEDS)]]


def _scene_product_seed(seed: int) -> int:
    if scene_split(seed) == "eval":
        return HELDOUT_PRODUCT_SEEDS[(seed - EVAL_SEEDS.start) % len(HELDOUT_PRODUCT_SEEDS)]
    return int(_rng(seed, _PICK).integers(TRAIN_PRODUCT_SEEDS.start, TRAIN_PRODUCT_SEEDS.stop))


# ----------------------------------------------------------------------------------------- product


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _ellipse(cx, cy, rx, ry, t0=0.0, t1=2 * math.pi, n=28):
    t = np.linspace(t0, t1, n)
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _rounded_bottom(x0, y0, x1, y1, r):
    """Rectangle whose bottom edge is an elliptic arc of height r."""
    cx, rx = (x0 + x1) / 2, (x1 - x0) / 2
    return [(x0, y0), (x1, y0)] + _ellipse(cx, y1 - r, rx, r, 0.0, math.pi, 14)


def _profile(ys, half_widths, cx=0.5):
    """Body of revolution seen from the side: right edge top->bottom, left edge bottom->top."""
    right = [(cx + w, y) for y, w in zip(ys, half_widths)]
    left = [(cx - w, y) for y, w in zip(ys[::-1], half_widths[::-1])]
    return right + left


def _parts(shape: str, ws: float):
    """Parts of a silhouette in unit coords (y down): (polygon, holes, material, shading).

    material: 'body' (colour + pattern), 'accent', 'inside', 'metal', 'wood'. shading: 'cyl' (round) or
    a float (flat face brightness).
    """
    if shape == "mug":
        w, cx = 0.25 * ws, 0.45
        handle = _ellipse(cx + w, 0.55, 0.15, 0.18)
        hole = _ellipse(cx + w, 0.55, 0.085, 0.11)
        return [
            (handle, [hole], "body", 0.8),
            (_rounded_bottom(cx - w, 0.24, cx + w, 0.9, 0.05), [], "body", "cyl"),
            (_ellipse(cx, 0.24, w, 0.055), [], "body", 1.15),
            (_ellipse(cx, 0.245, w * 0.86, 0.04), [], "inside", 1.0),
        ]
    if shape == "bottle":
        w, n = 0.15 * ws, 0.055
        ys = [0.17, 0.28, 0.38, 0.44, 0.86, 0.9]
        return [
            (_profile(ys, [n, n, w * 0.8, w, w, w * 0.8]), [], "body", "cyl"),
            (_rect(0.5 - n * 1.2, 0.1, 0.5 + n * 1.2, 0.19), [], "accent", "cyl"),
        ]
    if shape == "box":
        x0, x1, d = 0.5 - 0.25 * ws, 0.5 + 0.17 * ws, 0.12
        return [
            (_rect(x0, 0.36, x1, 0.9), [], "body", 1.0),
            ([(x0, 0.36), (x1, 0.36), (x1 + d, 0.24), (x0 + d, 0.24)], [], "body", 1.3),
            ([(x1, 0.36), (x1 + d, 0.24), (x1 + d, 0.78), (x1, 0.9)], [], "body", 0.62),
        ]
    if shape == "lamp":
        return [
            (_rect(0.48, 0.4, 0.52, 0.86), [], "metal", "cyl"),
            ([(0.5 - 0.18 * ws, 0.9), (0.5 - 0.13 * ws, 0.84), (0.5 + 0.13 * ws, 0.84), (0.5 + 0.18 * ws, 0.9)],
             [], "accent", 0.9),
            ([(0.5 - 0.13 * ws, 0.1), (0.5 + 0.13 * ws, 0.1), (0.5 + 0.28 * ws, 0.44), (0.5 - 0.28 * ws, 0.44)],
             [], "body", "cyl"),
        ]
    if shape == "vase":
        ys = np.linspace(0.1, 0.9, 18)
        t = (ys - 0.1) / 0.8
        hw = ws * (0.08 + 0.2 * np.sin(np.pi * np.clip(t - 0.05, 0, 1) ** 0.75) + 0.06 * np.exp(-t * 25))
        hw[-1] *= 0.8
        return [(_profile(list(ys), list(hw)), [], "body", "cyl")]
    if shape == "chair":
        a, b = 0.5 - 0.24 * ws, 0.5 + 0.24 * ws
        return [
            (_rect(a + 0.08, 0.6, a + 0.12, 0.84), [], "wood", 0.6),
            (_rect(b - 0.12, 0.6, b - 0.08, 0.84), [], "wood", 0.6),
            (_rect(a + 0.02, 0.1, b - 0.02, 0.5), [], "body", 0.9),
            ([(a + 0.02, 0.5), (b - 0.02, 0.5), (b, 0.6), (a, 0.6)], [], "body", 1.15),
            (_rect(a, 0.6, b, 0.64), [], "body", 0.7),
            (_rect(a + 0.01, 0.64, a + 0.06, 0.9), [], "wood", 0.85),
            (_rect(b - 0.06, 0.64, b - 0.01, 0.9), [], "wood", 0.85),
        ]
    if shape == "can":
        w = 0.17 * ws
        return [
            (_rounded_bottom(0.5 - w, 0.2, 0.5 + w, 0.9, 0.04), [], "body", "cyl"),
            (_ellipse(0.5, 0.2, w, 0.045), [], "metal", 1.2),
            (_ellipse(0.5, 0.2, w * 0.8, 0.03), [], "metal", 0.8),
        ]
    raise InvalidArgument(f"unknown product shape {shape!r}; one of {SHAPES}")


@dataclass(frozen=True)
class Product:
    """A product: silhouette, colours and surface pattern. Deterministic from `seed` via `from_seed`."""

    shape: str
    color: tuple[int, int, int]
    pattern: str
    color2: tuple[int, int, int]  # the pattern's second colour
    accent: tuple[int, int, int]  # cap / lamp base / trim
    period: float  # pattern period, fraction of the product's layout height
    phase: float  # pattern offset, fraction of a period
    width_scale: float  # silhouette width variation
    seed: int

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise InvalidArgument(f"unknown product shape {self.shape!r}; one of {SHAPES}")
        if self.pattern not in PATTERNS:
            raise InvalidArgument(f"unknown pattern {self.pattern!r}; one of {PATTERNS}")
        if not 0.02 <= self.period <= 1.0:
            raise InvalidArgument(f"pattern period must lie in [0.02, 1], got {self.period}")

    @classmethod
    def from_seed(cls, seed: int) -> "Product":
        seed = _check_seed(seed)
        r = _rng(seed, _PRODUCT)
        hue = r.random()
        color = _hsv(hue, r.uniform(0.35, 0.9), r.uniform(0.45, 0.95))
        kind = r.integers(3)
        if kind == 0:  # complementary
            color2 = _hsv(hue + 0.5 + r.uniform(-0.1, 0.1), r.uniform(0.4, 0.9), r.uniform(0.5, 1.0))
        elif kind == 1:  # near white / near black
            color2 = _hsv(hue, r.uniform(0, 0.12), 0.96 if r.random() < 0.6 else 0.15)
        else:  # another hue
            color2 = _hsv(hue + r.uniform(0.15, 0.4), r.uniform(0.4, 0.9), r.uniform(0.4, 0.95))
        accent = _hsv(r.random(), r.uniform(0, 0.5), r.uniform(0.15, 0.85))
        return cls(
            shape=SHAPES[r.integers(len(SHAPES))], color=color, pattern=PATTERNS[r.integers(len(PATTERNS))],
            color2=color2, accent=accent, period=float(r.uniform(0.07, 0.22)), phase=float(r.random()),
            width_scale=float(r.uniform(0.85, 1.15)), seed=seed,
        )

    def render(self, size: int, rotation: float = 0.0, lighting: float = 1.0) -> PIL.Image.Image:
        """The product on a transparent size x size canvas (alpha = silhouette), in its unit layout."""
        if int(size) < 4:
            raise InvalidArgument(f"size must be >= 4, got {size}")
        size = int(size)
        rgba, (ox, oy) = _raster(self, size, rotation, lighting, 0.0)
        canvas = np.zeros((size, size, 4), np.float32)
        _paste(canvas, rgba, int(round(size / 2 - ox)), int(round(size / 2 - oy)))
        return PIL.Image.fromarray(_u8(canvas), "RGBA")

    def _pattern(self, u: np.ndarray, v: np.ndarray):
        """How much of color2 (0..1) at unit coords (u, v); None for a solid product."""
        p, ph = self.period, self.phase
        kind = self.pattern
        if kind == "solid":
            return None
        if kind == "stripes_h":
            return _stripe(v * (1 / p) + ph)
        if kind == "stripes_v":
            return _stripe(u * (1 / p) + ph)
        if kind == "stripes_d":
            return _stripe((u + v) * (1 / (p * 1.41)) + ph)
        if kind == "dots":
            fu, fv = (u * (1 / p) + ph) % 1 - 0.5, (v * (1 / p) + ph) % 1 - 0.5
            return np.clip((0.33 - np.sqrt(fu * fu + fv * fv)) * (p * 1.0e3) + 0.5, 0, 1)
        if kind == "checks":
            return ((np.floor(u * (1 / p) + ph) + np.floor(v * (1 / p) + ph)) % 2).astype(np.float32)
        if kind == "gradient":
            return np.clip((v - 0.1) * (1 / 0.8), 0, 1)
        return (v > 0.4 + 0.25 * ph).astype(np.float32)  # two_tone


def _stripe(x: np.ndarray) -> np.ndarray:
    return ((x % 1.0) < 0.5).astype(np.float32)


_T = np.linspace(0, 1, 256, dtype=np.float32)
_CYL = 0.6 + 0.5 * np.abs(np.sin(np.pi * _T)) ** 0.7 + 0.35 * np.exp(-(((_T - 0.32) / 0.07) ** 2))  # round-body shading
_MATERIALS = {"metal": (0.62, 0.63, 0.66), "wood": (0.45, 0.3, 0.17)}


def _raster(product: Product, scale: float, rotation: float, lighting: float, light_side: float):
    """Rasterise at SS x and box-downsample. Returns (rgba float HxWx4 in [0,1], (ox, oy)): the canvas and
    where the unit layout's centre (0.5, 0.5) lands in canvas pixels."""
    parts = _parts(product.shape, product.width_scale)
    th = math.radians(rotation)
    cos, sin = math.cos(th), math.sin(th)

    def fwd(pts):
        a = np.asarray(pts, np.float64) - 0.5
        return np.stack([a[:, 0] * cos - a[:, 1] * sin, a[:, 0] * sin + a[:, 1] * cos], 1) * scale

    allpts = np.concatenate([fwd(poly) for poly, _, _, _ in parts])
    lo = np.floor(allpts.min(0)) - 1
    hi = np.ceil(allpts.max(0)) + 1
    w, h = int(hi[0] - lo[0]), int(hi[1] - lo[1])
    W, H = w * SS, h * SS
    # unit coords of every supersampled pixel centre (inverse rotation)
    xs = (np.arange(W, dtype=np.float32) + 0.5) / SS + lo[0]
    ys = (np.arange(H, dtype=np.float32) + 0.5) / SS + lo[1]
    u = (xs[None, :] * (cos / scale) + ys[:, None] * (sin / scale)) + 0.5
    v = (ys[:, None] * (cos / scale) - xs[None, :] * (sin / scale)) + 0.5
    pattern = product._pattern(u, v)
    c1, c2 = np.array(product.color, np.float32) / 255, np.array(product.color2, np.float32) / 255
    rgb = np.zeros((3, H, W), np.float32)  # planar: long inner loops
    alpha = np.zeros((H, W), np.float32)
    for poly, holes, material, shading in parts:
        pts = (fwd(poly) - lo) * SS
        img = PIL.Image.new("L", (W, H), 0)
        draw = PIL.ImageDraw.Draw(img)
        draw.polygon([tuple(p) for p in pts], fill=255)
        for hole in holes:
            draw.polygon([tuple(p) for p in (fwd(hole) - lo) * SS], fill=0)
        # work only inside the part's bounding box
        x0, y0 = (max(int(c), 0) for c in pts.min(0))
        x1, y1 = min(int(pts[:, 0].max()) + 2, W), min(int(pts[:, 1].max()) + 2, H)
        win = (slice(y0, y1), slice(x0, x1))
        m = np.asarray(img.crop((x0, y0, x1, y1)), np.float32) * (1 / 255)
        uw = u[win]
        if shading == "cyl":
            px = np.asarray(poly)[:, 0]
            t = (uw - (px.min() + 0.25 * light_side * (px.max() - px.min()))) * (
                (len(_CYL) - 1) / max(px.max() - px.min(), 1e-6))
            shade = _CYL[np.clip(t, 0, len(_CYL) - 1).astype(np.intp)]
        else:
            shade = float(shading) * (1.0 + 0.1 * light_side * (uw - 0.5))
        shade = shade * lighting
        for c in range(3):
            if material == "body":
                col = c1[c] if pattern is None else c1[c] + pattern[win] * (c2[c] - c1[c])
            elif material == "inside":
                col = c1[c] * 0.4
            elif material == "accent":
                col = product.accent[c] / 255
            else:
                col = _MATERIALS[material][c]
            plane = rgb[c][win]
            plane += m * (np.minimum(col * shade, 1.0) - plane)
        np.maximum(alpha[win], m, out=alpha[win])
    # premultiplied box downsample, then un-premultiply
    pre = _downsample(np.concatenate([rgb * alpha, alpha[None]], 0), SS)
    a = np.round(pre[3] * 255) * (1 / 255)  # 8-bit coverage: boxes agree with the "L" silhouettes
    rgb = np.where(a > 0, pre[:3] / np.maximum(a, 1e-8), 0)
    out = np.concatenate([rgb, a[None]], 0).transpose(1, 2, 0)
    return np.clip(out, 0, 1), (-lo[0], -lo[1])


def _downsample(a: np.ndarray, k: int) -> np.ndarray:
    """Box filter of a planar (C, H, W) array by an integer factor k (sums of strided slices: much faster
    than reshape().mean())."""
    C, H, W = a.shape
    rows = a.reshape(C, H // k, k, W)
    acc = rows[:, :, 0].copy()
    for i in range(1, k):
        acc += rows[:, :, i]
    cols = acc.reshape(C, H // k, W // k, k)
    out = cols[..., 0].copy()
    for i in range(1, k):
        out += cols[..., i]
    return out * (1.0 / (k * k))


def _paste(canvas: np.ndarray, rgba: np.ndarray, x: int, y: int) -> None:
    """Copy rgba into canvas (same channel count) at integer (x, y), clipped to the canvas."""
    H, W = canvas.shape[:2]
    h, w = rgba.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = rgba[y0 - y: y1 - y, x0 - x: x1 - x]


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.round(a * 255), 0, 255).astype(np.uint8)


def _alpha_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _unit_extent(product: Product, rotation: float) -> tuple[float, float]:
    pts = np.concatenate([np.asarray(p) for p, _, _, _ in _parts(product.shape, product.width_scale)]) - 0.5
    th = math.radians(rotation)
    x = pts[:, 0] * math.cos(th) - pts[:, 1] * math.sin(th)
    y = pts[:, 0] * math.sin(th) + pts[:, 1] * math.cos(th)
    return float(x.max() - x.min()), float(y.max() - y.min())


# ------------------------------------------------------------------------------------------ photos


@dataclass(frozen=True)
class Photo:
    """A retailer photo: `image` (RGB), `box` (tight product box), `alpha` (L, product coverage),
    `background` (the plain backdrop's base colour)."""

    image: PIL.Image.Image
    box: tuple[int, int, int, int]
    alpha: PIL.Image.Image
    background: tuple[int, int, int]


def _photo(product: Product, size: int, r: np.random.Generator, extent=(0.4, 0.8), centred=False) -> Photo:
    base = r.uniform(205, 248) + r.uniform(-8, 8, 3)
    ang = r.uniform(0, 2 * np.pi)
    g = np.linspace(-1, 1, size, dtype=np.float32)
    ramp = np.cos(ang) * g[None, :] + np.sin(ang) * g[:, None]
    bg = base[None, None, :] + r.uniform(4, 14) * ramp[..., None] + r.normal(0, 1.5, (size, size, 1))
    bg = np.clip(bg, 0, 255).astype(np.float32) / 255
    rotation = float(r.uniform(-15, 15))
    lighting = float(r.uniform(0.85, 1.2))
    uw, uh = _unit_extent(product, rotation)
    scale = r.uniform(*extent) * (size - 2) / max(uw, uh)
    rgba, _ = _raster(product, scale, rotation, lighting, float(r.uniform(-1, 1)))
    bx0, by0, bx1, by1 = _alpha_box(rgba[..., 3])
    w, h = bx1 - bx0, by1 - by0
    if centred:  # room for a square crop with a margin all round
        x, y = (size - w) // 2 + int(r.integers(-1, 2)) - bx0, (size - h) // 2 + int(r.integers(-1, 2)) - by0
    else:
        x = int(r.integers(0, size - w + 1)) - bx0
        y = int(r.integers(0, size - h + 1)) - by0
    layer = np.zeros((size, size, 4), np.float32)
    _paste(layer, rgba, x, y)
    a = layer[..., 3:]
    image = _u8(bg * (1 - a) + layer[..., :3] * a)
    alpha = _u8(a[..., 0])
    return Photo(PIL.Image.fromarray(image, "RGB"), _alpha_box(alpha), PIL.Image.fromarray(alpha, "L"),
                 tuple(int(round(c)) for c in base))


def product_photos(product: Product, n: int, size: int = 64, seed: int = 0) -> list[Photo]:
    """n retailer-style photos: plain light backdrop, product at 40-80% of the frame, rotation <= 15 deg."""
    if n < 0 or size < 16:
        raise InvalidArgument(f"need n >= 0 and size >= 16, got n={n}, size={size}")
    seed = _check_seed(seed)
    return [_photo(product, size, _rng(product.seed, seed, i, _PHOTO)) for i in range(n)]


# ------------------------------------------------------------------------------------------- rooms

_WALLS = [(0.08, 0.18, 0.9), (0.1, 0.08, 0.93), (0.58, 0.2, 0.8), (0.3, 0.2, 0.78), (0.0, 0.0, 0.85),
          (0.95, 0.15, 0.88), (0.13, 0.35, 0.7), (0.55, 0.05, 0.6)]


def _room(seed: int, size: int):
    """Room as float HxWx3 in [0,1], plus (horizon y, light side in [-1, 1], brightness)."""
    r = _rng(seed, _ROOM)
    S = size * 2  # edges and textures antialiased by a 2x render
    hz = float(r.uniform(0.42, 0.66))
    hs = int(round(hz * S))  # first floor row
    light_side = float(r.uniform(-1, 1))
    bright = float(r.uniform(0.8, 1.1))
    x = (np.arange(S, dtype=np.float32) + 0.5) / S
    # wall: rows [0, hs)
    yw = x[:hs, None]
    h, s, v = _WALLS[r.integers(len(_WALLS))]
    wall_col = np.array(colorsys.hsv_to_rgb((h + r.uniform(-0.04, 0.04)) % 1, min(s * r.uniform(0.6, 1.4), 1),
                                            v * r.uniform(0.85, 1.05)), np.float32)
    shade = np.ones((hs, S), np.float32)
    kind = r.integers(5)
    if kind == 1:  # wallpaper stripes
        shade = shade * (1 - r.uniform(0.06, 0.15) * _stripe(x / r.uniform(0.04, 0.12)))
    elif kind == 2:  # bricks
        bh = r.uniform(0.04, 0.08)
        row = np.floor(yw / bh)
        bx = (x + (row % 2) * bh) / (bh * 2)
        mortar = ((yw / bh) % 1 < 0.12) | (bx % 1 < 0.06)
        shade = np.where(mortar, 1.12, 0.92 + 0.08 * np.sin(row * 7 + np.floor(bx) * 3))
    elif kind == 3:  # dotted wallpaper
        p = r.uniform(0.06, 0.12)
        shade = 1 - 0.12 * (np.hypot((x / p) % 1 - 0.5, (yw / p) % 1 - 0.5) < 0.18)
    elif kind == 4:  # wood panelling
        wall_col = wall_col * 0.6 + np.array([0.2, 0.13, 0.07], np.float32)
        shade = shade * (1 - 0.25 * ((x / r.uniform(0.08, 0.16)) % 1 < 0.06))
    shade = shade * (1 + 0.25 * light_side * (x - 0.5))
    wall = wall_col[:, None, None] * shade
    # floor: rows [hs, S), perspective depth z = 1 / (y - horizon), world x = (x - vx) z
    yf = x[hs:, None]
    z = 0.3 / np.maximum(yf - hz, 1e-3)
    wx = (x - float(r.uniform(0.3, 0.7))) * z * 2
    fkind = r.integers(4)
    if fkind == 0:  # wood planks running into depth
        col = np.array(colorsys.hsv_to_rgb(r.uniform(0.05, 0.1), r.uniform(0.45, 0.7), r.uniform(0.35, 0.7)), np.float32)
        pw = r.uniform(0.25, 0.45)
        idx = np.floor(wx / pw)
        seam = ((wx / pw) % 1 < 0.06 / np.maximum(z, 1)) | (((z + (idx * 0.618 % 1) * 3) / 3) % 1 < 0.02)
        fshade = (0.85 + 0.15 * np.sin(idx * 12.9898) + 0.05 * np.sin(z * 9 + idx)) * np.where(seam, 0.7, 1.0)
    elif fkind == 1:  # tiles
        col = np.array(colorsys.hsv_to_rgb(r.random(), r.uniform(0, 0.25), r.uniform(0.6, 0.9)), np.float32)
        t = r.uniform(0.4, 0.8)
        chk = (np.floor(wx / t) + np.floor(z / t)) % 2
        grout = ((wx / t) % 1 < 0.04 / np.maximum(z, 1)) | ((z / t) % 1 < 0.04)
        fshade = np.where(chk > 0, 1.0, r.uniform(0.6, 0.95)) * np.where(grout, 0.75, 1.0)
    else:  # carpet / concrete
        col = np.array(colorsys.hsv_to_rgb(r.random(), r.uniform(0.05, 0.5), r.uniform(0.3, 0.75)), np.float32)
        fshade = 1 + r.normal(0, 0.04 if fkind == 2 else 0.02, (S - hs, S)).astype(np.float32)
    far = np.clip((z - 2.5) / 5, 0, 1)  # fade texture detail towards the horizon (no aliasing)
    fshade = fshade * (1 - far) + float(np.mean(fshade)) * far
    floor = col[:, None, None] * (fshade * (0.75 + 0.3 * np.clip((yf - hz) / (1 - hz), 0, 1)))
    img = np.concatenate([wall, floor.astype(np.float32)], 1)  # planar (3, S, S)
    img[:, max(hs - max(S // 40, 1), 0):hs] = (wall_col * 0.5 + 0.45)[:, None, None]  # skirting board
    _decor(img, r, S, hz)
    img = _downsample(img, 2).transpose(1, 2, 0) * bright + r.normal(0, 0.006, (size, size, 1))
    img = np.clip(img, 0, 1).astype(np.float32)
    return img, hz, light_side, bright


def _box_fill(img, x0, y0, x1, y1, col, grad=0.0):
    S = img.shape[1]
    a, b, c, d = (int(round(t * S)) for t in (x0, y0, x1, y1))
    a, b, c, d = max(a, 0), max(b, 0), min(c, S), min(d, S)
    if c > a and d > b:
        col = np.minimum(np.asarray(col, np.float32), 1.0)
        if grad:
            ramp = np.arange(d - b, dtype=np.float32) * (-2 * grad / max(d - b - 1, 1)) + (1 + grad)
            img[:, b:d, a:c] = np.minimum(col[:, None, None] * ramp[None, :, None], 1.0)
        else:
            img[:, b:d, a:c] = col[:, None, None]


def _decor(img, r, S, hz):
    """Window / picture on the wall, then 0-3 furniture blocks standing on the floor (in place, planar)."""
    if r.random() < 0.6:
        x = r.uniform(0.05, 0.7)
        w, h = r.uniform(0.15, 0.28), r.uniform(0.15, 0.3)
        y = r.uniform(0.05, max(0.06, hz - h - 0.1))
        if r.random() < 0.5:  # window: frame, sky, cross bars
            _box_fill(img, x, y, x + w, y + h, (0.95, 0.95, 0.93))
            _box_fill(img, x + 0.015, y + 0.015, x + w - 0.015, y + h - 0.015, (0.62, 0.8, 0.95), 0.15)
            _box_fill(img, x + w / 2 - 0.007, y, x + w / 2 + 0.007, y + h, (0.95, 0.95, 0.93))
        else:  # picture
            _box_fill(img, x, y, x + w, y + h, (0.2, 0.15, 0.1))
            _box_fill(img, x + 0.02, y + 0.02, x + w - 0.02, y + h - 0.02, r.uniform(0.2, 0.9, 3), 0.3)
    for _ in range(r.integers(0, 4)):
        kind = r.integers(3)
        x = r.uniform(-0.1, 0.8)
        base = hz + r.uniform(0.03, 0.12)
        col = np.array(colorsys.hsv_to_rgb(r.random(), r.uniform(0.15, 0.7), r.uniform(0.3, 0.8)), np.float32)
        w = r.uniform(0.2, 0.45)
        _box_fill(img, x - 0.01, base - 0.01, x + w + 0.02, base + 0.02, img[:, min(int(base * S), S - 1), S // 2] * 0.6)
        if kind == 0:  # sofa: back, seat, arms
            _box_fill(img, x + 0.03, base - 0.24, x + w - 0.03, base - 0.1, col * 0.85, 0.1)
            _box_fill(img, x + 0.03, base - 0.12, x + w - 0.03, base - 0.03, col, 0.15)
            _box_fill(img, x, base - 0.16, x + 0.05, base - 0.02, col * 0.75, 0.1)
            _box_fill(img, x + w - 0.05, base - 0.16, x + w, base - 0.02, col * 0.75, 0.1)
            _box_fill(img, x + 0.02, base - 0.03, x + w - 0.02, base, col * 0.4)
        elif kind == 1:  # table: top and legs
            wood = np.array([0.5, 0.33, 0.18], np.float32) * r.uniform(0.7, 1.3)
            _box_fill(img, x, base - 0.15, x + w, base - 0.13, wood * 1.1)
            _box_fill(img, x + 0.01, base - 0.13, x + 0.03, base, wood * 0.7)
            _box_fill(img, x + w - 0.03, base - 0.13, x + w - 0.01, base, wood * 0.7)
        else:  # shelf with books
            w, h = min(w, 0.25), r.uniform(0.3, 0.5)
            wood = np.array([0.45, 0.3, 0.17], np.float32) * r.uniform(0.6, 1.4)
            _box_fill(img, x, base - h, x + w, base, wood)
            _box_fill(img, x + 0.015, base - h + 0.015, x + w - 0.015, base - 0.015, wood * 0.45)
            n = 3
            for k in range(n):
                top = base - h + (k + 1) * h / n
                _box_fill(img, x + 0.015, top - 0.012, x + w - 0.015, top, wood)
                bx = x + 0.02
                while bx < x + w - 0.04:
                    bw = r.uniform(0.012, 0.025)
                    _box_fill(img, bx, top - 0.012 - h / n * r.uniform(0.5, 0.8), bx + bw, top - 0.012,
                              r.uniform(0.15, 0.85, 3))
                    bx += bw + 0.004


def make_room(seed: int, size: int = 64) -> PIL.Image.Image:
    """An empty room: textured wall and perspective floor, light gradient, window/picture, furniture."""
    seed = _check_seed(seed)
    if size < 16:
        raise InvalidArgument(f"size must be >= 16, got {size}")
    return PIL.Image.fromarray(_u8(_room(seed, size)[0]), "RGB")


# ------------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class Scene:
    """`room` without the product; `composite` the truth; `mask` the inpainting box (L 0/255);
    `silhouette` the product's alpha in room coords; `box` its tight box; `exemplar` a retailer-style
    crop of the same product (the Paint-by-Example reference)."""

    seed: int
    room: PIL.Image.Image
    composite: PIL.Image.Image
    mask: PIL.Image.Image
    silhouette: PIL.Image.Image
    box: tuple[int, int, int, int]
    mask_box: tuple[int, int, int, int]
    product: Product
    exemplar: PIL.Image.Image

    @property
    def split(self) -> str:
        return scene_split(self.seed)


def make_scene(seed: int, size: int = 64, product: Product | None = None) -> Scene:
    """A product standing on the floor of a room (25-55% of the frame height) with a contact shadow."""
    scene_split(seed)  # refuses seeds in no split
    if size < 32:
        raise InvalidArgument(f"size must be >= 32, got {size}")
    if product is None:
        product = Product.from_seed(_scene_product_seed(seed))
    room, hz, light_side, bright = _room(seed, size)
    room_u8 = _u8(room)
    r = _rng(seed, _PLACE)
    # the product
    rotation = float(r.uniform(-4, 4))
    uw, uh = _unit_extent(product, rotation)
    height = r.uniform(0.25, 0.55) * size
    scale = min(height / uh, 0.8 * size / uw)
    rgba, _ = _raster(product, scale, rotation, float(r.uniform(0.8, 1.1) * bright), light_side)
    bx0, by0, bx1, by1 = _alpha_box(rgba[..., 3])
    w, h = bx1 - bx0, by1 - by0
    margin = placement_margin(size)
    lo_base = max(int(hz * size) + round(0.1 * size), h + margin)
    base = int(r.integers(lo_base, size - 2 * margin)) if lo_base < size - 2 * margin else size - 2 * margin
    x = int(r.integers(margin, size - w - margin + 1))
    y = base - h
    layer = np.zeros((size, size, 4), np.float32)
    _paste(layer, rgba, x - bx0, y - by0)
    box = (x, y, x + w, y + h)
    # the inpainting mask: the box, a margin, and room below for the contact shadow
    mx0, my0, mx1, my1 = placement_box((size, size), box)
    mask = np.zeros((size, size), np.uint8)
    mask[my0:my1, mx0:mx1] = 255
    # soft contact shadow, compact support, clipped to the mask
    win = (slice(my0, my1), slice(mx0, mx1))
    shadow = r.uniform(0.45, 0.7) * contact_shadow(box, size, (mx0, my0, mx1, my1))
    a = layer[..., 3:]
    comp = room_u8[win].astype(np.float32) / 255 * (1 - shadow[..., None]) * (1 - a[win]) + layer[win][..., :3] * a[win]
    composite = room_u8.copy()
    composite[win] = _u8(comp)  # the only pixels that change: outside the mask, composite == room
    # the exemplar: a retailer photo of the same product, cropped square around it
    ex = _photo(product, size, _rng(seed, _EXEMPLAR), extent=(0.55, 0.72), centred=True)
    exemplar = _square_crop(ex, size)
    return Scene(
        seed=seed, room=PIL.Image.fromarray(room_u8, "RGB"), composite=PIL.Image.fromarray(composite, "RGB"),
        mask=PIL.Image.fromarray(mask, "L"), silhouette=PIL.Image.fromarray(_u8(a[..., 0]), "L"), box=box,
        mask_box=(mx0, my0, mx1, my1), product=product, exemplar=exemplar,
    )


def _square_crop(photo: Photo, size: int) -> PIL.Image.Image:
    """A square crop around the product (25% margin), backdrop-padded, resized to size x size."""
    x0, y0, x1, y1 = photo.box
    side = int(max(x1 - x0, y1 - y0) * 1.25) + 2
    left, top = (x0 + x1) // 2 - side // 2, (y0 + y1) // 2 - side // 2
    canvas = PIL.Image.new("RGB", (side, side), photo.background)
    canvas.paste(photo.image, (-left, -top))
    return canvas.resize((size, size), PIL.Image.BICUBIC)


# ----------------------------------------------------------------------------------------- preview


def preview(path, n: int = 16, size: int = 64, seeds=None, per_row: int = 2, scale: int = 4) -> Path:
    """Write a grid PNG, one scene per group of 4 tiles: room | composite | mask | exemplar."""
    seeds = list(seeds) if seeds is not None else [EVAL_SEEDS[i] if i % 2 else TRAIN_SEEDS[i] for i in range(n)]
    rows = math.ceil(len(seeds) / per_row)
    gap = 2
    tile = size + gap
    grid = PIL.Image.new("RGB", (per_row * 4 * tile + (per_row - 1) * 4 * gap, rows * tile), (255, 255, 255))
    for i, s in enumerate(seeds):
        sc = make_scene(s, size)
        x0, y0 = (i % per_row) * (4 * tile + 4 * gap), (i // per_row) * tile
        for k, im in enumerate([sc.room, sc.composite, sc.mask.convert("RGB"), sc.exemplar]):
            grid.paste(im, (x0 + k * tile, y0))
    grid = grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return path
