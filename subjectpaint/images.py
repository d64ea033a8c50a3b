"""Input handling in one place: every image or mask a user hands us goes through here.

Accepted: a PIL image, a path, a numpy array (HxW, HxWxC; uint8, uint16, bool or float in [0, 1]) or a
torch tensor (HxW or CxHxW, float in [0, 1] or uint8). EXIF orientation is applied; RGBA/LA/P images are
composited on white; CMYK, 16-bit and float modes are converted to 8-bit RGB.

Masks: 1 (white) = regenerate, 0 (black) = keep. A mask is binarised with `MASK_THRESHOLD`: a pixel is
edited when its value is *greater than* half of full scale (uint8 > 127.5, float > 0.5), the same rule as
diffusers' Paint-by-Example pipeline. A mask of another size is resized (nearest) only when it has the same
aspect ratio as the image (within `ASPECT_TOLERANCE`); otherwise it is an `InvalidMask`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .errors import InvalidArgument, InvalidImage, InvalidMask

ImageInput = Union[PIL.Image.Image, str, os.PathLike, np.ndarray, torch.Tensor, bytes]

MASK_THRESHOLD = 0.5
ASPECT_TOLERANCE = 0.01
MAX_PIXELS = 64_000_000  # images over this many pixels are refused from their header, before any pixel is decoded


def set_max_pixels(pixels: int) -> None:
    """Change the pixel limit of every image we read (`$SUBJECTPAINT_MAX_PIXELS` sets it at import). PIL's own
    decompression-bomb limit is raised with it when it is lower, so PIL does not refuse what we allow."""
    global MAX_PIXELS
    if not isinstance(pixels, int) or isinstance(pixels, bool) or pixels < 1:
        raise InvalidArgument(f"max pixels must be a positive int, got {pixels!r}")
    MAX_PIXELS = pixels
    if PIL.Image.MAX_IMAGE_PIXELS is not None and PIL.Image.MAX_IMAGE_PIXELS < pixels:
        PIL.Image.MAX_IMAGE_PIXELS = pixels


if os.environ.get("SUBJECTPAINT_MAX_PIXELS"):
    try:
        set_max_pixels(int(os.environ["SUBJECTPAINT_MAX_PIXELS"]))
    except ValueError:
        raise InvalidArgument("$SUBJECTPAINT_MAX_PIXELS must be a positive int") from None


def load_image(image: ImageInput, what: str = "image") -> PIL.Image.Image:
    """Return an 8-bit RGB PIL image, or raise `InvalidImage` saying what is wrong with `what`."""
    return _rgb(_to_pil(image, what, InvalidImage), what)


def load_cutout(image: ImageInput, what: str = "image") -> tuple[PIL.Image.Image, np.ndarray | None]:
    """`load_image`, plus the image's own alpha as an (H, W) float matte in [0, 1] when it has a transparent
    part (a product cut out as an RGBA PNG, say); None for an opaque image. The RGB image is the cut-out
    composited on white, as `load_image` gives it."""
    pil = _to_pil(image, what, InvalidImage)
    alpha = None
    if pil.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (pil.mode == "P" and "transparency" in pil.info):
        a = np.asarray(pil.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
        alpha = a if a.min() < 1.0 else None
    return _rgb(pil, what), alpha


def _rgb(pil: PIL.Image.Image, what: str) -> PIL.Image.Image:
    rgb = _to_rgb(pil)
    if rgb.width == 0 or rgb.height == 0:
        raise InvalidImage(f"{what} has zero size")
    return rgb


def load_exemplar(image: ImageInput) -> PIL.Image.Image:
    """An exemplar (reference product image) must show something: a uniform image is refused."""
    pil = load_image(image, "exemplar")
    extrema = pil.getextrema()
    if all(lo == hi for lo, hi in extrema):
        kind = "all zero (black)" if extrema[0][1] == 0 else "a single uniform colour"
        raise InvalidImage(f"exemplar is {kind}; it must show the product")
    return pil


def load_mask(mask: ImageInput, size: tuple[int, int], what: str = "mask", binary: bool = True) -> torch.Tensor:
    """Return the mask as a float tensor (H, W) for an image of `size` = (width, height).

    binary=True: values in {0, 1} (edit where > MASK_THRESHOLD); binary=False: a soft edit map in [0, 1].
    """
    values = _mask_values(mask, what)
    h, w = values.shape
    width, height = size
    if (w, h) != (width, height):
        if abs((w / h) / (width / height) - 1.0) > ASPECT_TOLERANCE:
            raise InvalidMask(
                f"{what} is {w}x{h} but the image is {width}x{height}: the aspect ratios differ, "
                "so the mask cannot be resized onto the image"
            )
        mode = "nearest-exact" if binary else "bilinear"
        kwargs = {} if binary else {"align_corners": False}
        values = torch.nn.functional.interpolate(values[None, None], size=(height, width), mode=mode, **kwargs)[0, 0]
    if binary:
        values = (values > MASK_THRESHOLD).float()
    if not bool((values > 0).any()):
        raise InvalidMask(f"{what} is empty: no pixel is marked for editing (white = edit, black = keep)")
    return values


def pil_to_tensor(images: PIL.Image.Image | list[PIL.Image.Image]) -> torch.Tensor:
    """RGB PIL image(s) -> float tensor (B, 3, H, W) in [-1, 1], exactly as diffusers' Paint-by-Example
    preprocessing: same steps and the same (channels-last) memory layout, so the VAE's convolutions pick the
    same kernels and the two agree bit for bit."""
    images = [images] if isinstance(images, PIL.Image.Image) else images
    array = np.concatenate([np.asarray(i.convert("RGB"))[None] for i in images], axis=0).transpose(0, 3, 1, 2)
    return torch.from_numpy(array).to(dtype=torch.float32) / 127.5 - 1.0


def tensor_to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """Float tensor (3, H, W) in [0, 1] -> RGB PIL (rounded, as diffusers' postprocess)."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array)


def mask_to_pil(mask: torch.Tensor) -> PIL.Image.Image:
    array = (mask.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array, mode="L")


# --------------------------------------------------------------------------------------------------


def _to_pil(obj, what: str, error: type[Exception]) -> PIL.Image.Image:
    if isinstance(obj, PIL.Image.Image):
        pil = obj
    elif isinstance(obj, (str, os.PathLike, bytes)):
        pil = _open(obj, what, error)
    elif isinstance(obj, np.ndarray):
        pil = _array_to_pil(obj, what, error)
    elif isinstance(obj, torch.Tensor):
        pil = _array_to_pil(_tensor_to_hwc(obj, what, error), what, error)
    else:
        raise error(f"{what} must be a PIL image, a path, a numpy array or a tensor, not {type(obj).__name__}")
    if pil.width * pil.height > MAX_PIXELS:
        raise error(f"{what} is {pil.width}x{pil.height}, over the {MAX_PIXELS:,} pixel limit")
    if pil.width == 0 or pil.height == 0:
        raise error(f"{what} has zero size")
    return pil


def open_header(stream) -> PIL.Image.Image:
    """`PIL.Image.open` (reads the header only) without PIL's DecompressionBombWarning: PIL's limit is kept at or
    above `MAX_PIXELS` (see `set_max_pixels`), and every caller refuses an image over `MAX_PIXELS` itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        return PIL.Image.open(stream)


def _open(source, what: str, error: type[Exception]) -> PIL.Image.Image:
    if isinstance(source, bytes):
        stream, label = io.BytesIO(source), f"{what} (bytes)"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise error(f"{what} file not found: {path}")
        stream, label = path, f"{what} file {path}"
    try:
        with open_header(stream) as opened:
            if opened.width * opened.height > MAX_PIXELS:  # from the header: a decompression bomb is never decoded
                raise error(f"{label} is {opened.width}x{opened.height}, over the {MAX_PIXELS:,} pixel limit "
                            "(a decompression bomb?)")
            opened.load()
            pil = PIL.ImageOps.exif_transpose(opened)
            if pil is opened:
                pil = opened.copy()
    except PIL.Image.DecompressionBombError as exc:
        raise error(f"{label} is refused as a decompression bomb ({exc})") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, error):
            raise
        raise error(f"{label} is not a readable image ({exc})") from None
    return pil


def _tensor_to_hwc(tensor: torch.Tensor, what: str, error: type[Exception]) -> np.ndarray:
    t = tensor.detach().cpu()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif t.ndim != 2:
        raise error(f"{what} tensor must be HxW or CxHxW with C in 1, 3, 4; got shape {tuple(tensor.shape)}")
    if t.dtype.is_floating_point:
        t = t.float()
    return t.numpy()


def _array_to_pil(array: np.ndarray, what: str, error: type[Exception]) -> PIL.Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise error(f"{what} array must be HxW, HxWx3 or HxWx4; got shape {a.shape}")
    if a.size == 0:
        raise error(f"{what} has zero size")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise error(f"{what} contains NaN or infinite values")
        if a.min() < 0 or a.max() > 1:
            raise error(f"{what} float values must lie in [0, 1]; got [{a.min():.3g}, {a.max():.3g}]")
        a = (a * 255.0).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise error(f"{what} integer values must lie in [0, 255]; got dtype {a.dtype}")
        a = a.astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(a))


def _to_rgb(pil: PIL.Image.Image) -> PIL.Image.Image:
    if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(pil, dtype=np.float64)
        scale = 65535.0 if a.max() > 255 else 255.0
        pil = PIL.Image.fromarray((a / scale * 255.0).clip(0, 255).round().astype(np.uint8), mode="L")
    elif pil.mode == "F":
        a = np.asarray(pil, dtype=np.float64)
        pil = PIL.Image.fromarray((a.clip(0, 1) * 255.0).round().astype(np.uint8), mode="L")
    if pil.mode == "P":
        pil = pil.convert("RGBA")
    if pil.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = pil.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pil = PIL.Image.alpha_composite(background, rgba)
    return pil.convert("RGB") if pil.mode != "RGB" else pil


def _mask_values(mask, what: str) -> torch.Tensor:
    """Mask -> float tensor (H, W) in [0, 1], before thresholding."""
    if isinstance(mask, torch.Tensor) and mask.dtype.is_floating_point:
        t = mask.detach().cpu().float()
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise InvalidMask(f"{what} tensor must be HxW (or 1xHxW); got shape {tuple(mask.shape)}")
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise InvalidMask(f"{what} float values must lie in [0, 1]")
        return t
    if isinstance(mask, np.ndarray) and np.issubdtype(mask.dtype, np.floating):
        return _mask_values(torch.from_numpy(np.ascontiguousarray(mask)).float(), what)
    pil = _to_pil(mask, what, InvalidMask)
    if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pil = _to_rgb(pil)
    if pil.mode in ("RGBA", "LA", "PA"):
        # a transparent-background mask: use the alpha channel when the colour channels are constant
        alpha = pil.getchannel("A")
        if pil.convert("L").getextrema()[0] == pil.convert("L").getextrema()[1]:
            pil = alpha
    gray = np.asarray(pil.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(gray.copy())
