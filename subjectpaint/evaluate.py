"""Quality metrics for placement: pixel fidelity against a known truth, subject fidelity by embeddings,
and set-level realism (FID).

Images may be PIL images, numpy arrays (HxWx3 uint8, or float in [0, 1]) or torch tensors (3xHxW or
HxWx3; float in [0, 1] or uint8); `to_tensor01` turns any of them into a float (3, H, W) tensor in [0, 1].
A mask marks the evaluated (edited) region: a pixel counts when its value is > 0.

- `masked_psnr` returns `inf` for images identical inside the mask (pass `cap=` for a finite ceiling).
- Embedding metrics take the encoder as an argument, so tests use tiny random ones; `load_clip` /
  `load_dino` load real ones from a local directory / file or the hub, and raise `WeightsNotFound` with a
  clear message when offline. Nothing here downloads on import or by default in tests.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from transformers.image_utils import OPENAI_CLIP_MEAN as _CLIP_MEAN, OPENAI_CLIP_STD as _CLIP_STD

from .errors import InvalidArgument, InvalidImage, InvalidMask, WeightsNotFound

__all__ = [
    "to_tensor01", "mask_to_bool", "masked_psnr", "masked_ssim", "background_error", "BackgroundError",
    "pixel_metrics", "clip_i", "dino", "exemplar_embed", "exemplar_i", "box_crop", "fid", "load_clip", "load_dino",
    "format_table",
    "CLIP_MODEL", "DINO_MODEL",
]

CLIP_MODEL = "openai/clip-vit-large-patch14"
DINO_MODEL = "vit_small_patch16_224.dino"


# ------------------------------------------------------------------------------------------ inputs


def to_tensor01(image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PIL / numpy / tensor image -> float tensor (3, H, W) in [0, 1] (float32 unless `dtype`).

    Tensors and arrays may be CxHxW or HxWxC (C in 1, 3, 4; a leading batch dim of 1 is dropped); a
    3-dim input whose first dim is 1, 3 or 4 is read as channels-first. uint8 is divided by 255; floats
    must already lie in [0, 1]. Grey is repeated to 3 channels; alpha is dropped.
    """
    if isinstance(image, PIL.Image.Image):
        t = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 2:
            t = t[None]
        elif t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise InvalidImage(f"image must be HxW, HxWxC or CxHxW with C in 1, 3, 4; got {tuple(image.shape)}")
        t = t[:3] if t.shape[0] != 1 else t.expand(3, -1, -1)
    else:
        raise InvalidImage(f"image must be a PIL image, numpy array or tensor, not {type(image).__name__}")
    if t.dtype == torch.uint8:
        return t.to(dtype) / 255.0
    if t.dtype == torch.bool:
        return t.to(dtype)
    t = t.to(dtype)
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise InvalidImage("float image values must lie in [0, 1]")
    return t.contiguous()


def mask_to_bool(mask, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Mask (PIL / array / tensor, HxW or 1xHxW, any dtype) -> bool tensor (H, W): True where > 0.

    size=(H, W): the mask must have that size (no silent resizing in a metric)."""
    if isinstance(mask, PIL.Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L")).copy())
    else:
        m = torch.as_tensor(np.asarray(mask)) if isinstance(mask, np.ndarray) else mask.detach().cpu()
        while m.ndim > 2 and m.shape[0] == 1:
            m = m[0]
        if m.ndim == 3 and m.shape[-1] == 1:
            m = m[..., 0]
        if m.ndim != 2:
            raise InvalidMask(f"mask must be HxW; got shape {tuple(mask.shape)}")
    m = m > 0
    if size is not None and tuple(m.shape) != tuple(size):
        raise InvalidMask(f"mask is {tuple(m.shape)} (HxW) but the images are {tuple(size)}")
    return m


def _pair(pred, truth) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = to_tensor01(pred, torch.float64), to_tensor01(truth, torch.float64)  # exact for 8-bit inputs
    if a.shape != b.shape:
        raise InvalidImage(f"images differ in size: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])} (HxW)")
    return a, b


# ---------------------------------------------------------------------------------- pixel metrics


def masked_psnr(pred, truth, mask, cap: float | None = None) -> float:
    """PSNR (dB, data range 1) over the pixels where mask > 0, all three channels.

    Identical masked regions give `inf`, or `cap` when given; the result is never above `cap`."""
    a, b = _pair(pred, truth)
    m = mask_to_bool(mask, a.shape[1:])
    if not m.any():
        raise InvalidMask("mask is empty: no pixel to evaluate")
    value = float(peak_signal_noise_ratio(a[:, m], b[:, m], data_range=1.0))
    return value if cap is None else min(value, float(cap))


def masked_ssim(pred, truth, mask, region: str = "mask") -> float:
    """Mean of torchmetrics' SSIM map (gaussian 11x11, data range 1) inside the mask (`region="mask"`)
    or inside the mask's bounding box (`region="box"`). Images smaller than 11 px are refused."""
    a, b = _pair(pred, truth)
    m = mask_to_bool(mask, a.shape[1:])
    if not m.any():
        raise InvalidMask("mask is empty: no pixel to evaluate")
    if min(a.shape[1:]) < 11:
        raise InvalidImage("SSIM needs images of at least 11x11 pixels")
    _, full = structural_similarity_index_measure(
        a[None], b[None], data_range=1.0, return_full_image=True
    )
    full = full[0].mean(0)  # (H, W), averaged over channels
    if region == "box":
        ys, xs = torch.nonzero(m, as_tuple=True)
        return float(full[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].mean())
    if region != "mask":
        raise InvalidArgument(f"region must be 'mask' or 'box', got {region!r}")
    return float(full[m].mean())


class BackgroundError(NamedTuple):
    """Absolute error outside the mask, in uint8 levels (0..255): mean over pixels and channels, max."""

    mean: float
    max: float


def background_error(pred, ref, mask) -> BackgroundError:
    """How much `pred` changed the pixels it should have kept (where mask == 0)."""
    a, b = _pair(pred, ref)
    keep = ~mask_to_bool(mask, a.shape[1:])
    if not keep.any():
        raise InvalidMask("mask covers the whole image: there is no background to compare")
    diff = (a[:, keep] - b[:, keep]).abs() * 255.0
    return BackgroundError(float(diff.mean()), float(diff.max()))


def pixel_metrics(pred, truth, mask, cap: float | None = None) -> dict:
    """One evaluation row: masked PSNR/SSIM against the truth and the background error."""
    bg = background_error(pred, truth, mask)
    return {
        "psnr": masked_psnr(pred, truth, mask, cap=cap),
        "ssim": masked_ssim(pred, truth, mask),
        "bg_mean": bg.mean,
        "bg_max": bg.max,
    }


# ----------------------------------------------------------------------------- embedding metrics


def _batch(images, size: tuple[int, int], mean, std, device, dtype) -> torch.Tensor:
    if isinstance(images, (PIL.Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
        images = [images]
    elif isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    if len(images) == 0:
        raise InvalidArgument("no images given")
    x = torch.stack([
        F.interpolate(to_tensor01(im)[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
        for im in images
    ]).clamp(0, 1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.to(device=device, dtype=dtype)


def _cosine(e1: torch.Tensor, e2: torch.Tensor, reduction: str):
    if e1.shape != e2.shape:
        raise InvalidArgument(f"pred and ref need the same number of images: {e1.shape[0]} vs {e2.shape[0]}")
    e1, e2 = F.normalize(e1.double(), dim=-1), F.normalize(e2.double(), dim=-1)
    cos = (e1 * e2).sum(-1)
    if reduction == "none":
        return cos.float()
    if reduction != "mean":
        raise InvalidArgument(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return float(cos.mean())


def _param(model: torch.nn.Module) -> torch.Tensor:
    return next(model.parameters())


@torch.no_grad()
def clip_embed(images, encoder) -> torch.Tensor:
    """CLIP image embeddings (N, D) of `images` with a transformers `CLIPVisionModelWithProjection`."""
    size = int(encoder.config.image_size)
    p = _param(encoder)
    x = _batch(images, (size, size), _CLIP_MEAN, _CLIP_STD, p.device, p.dtype)
    return encoder(pixel_values=x).image_embeds


def clip_i(pred_crops, ref_crops, encoder, reduction: str = "mean"):
    """CLIP-I: cosine similarity of CLIP image embeddings, pairwise (pred[i] vs ref[i]), averaged."""
    return _cosine(clip_embed(pred_crops, encoder), clip_embed(ref_crops, encoder), reduction)


@torch.no_grad()
def dino_embed(images, model) -> torch.Tensor:
    """Pre-logits features (N, D) of a timm ViT (the CLS token for DINO ViTs)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    native = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if native is not None:  # the size the ViT was built for (a bare model has no pretrained config)
        h, w = native
    p = _param(model)
    x = _batch(images, (h, w), cfg["mean"], cfg["std"], p.device, p.dtype)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def dino(pred, ref, model, reduction: str = "mean"):
    """DINO: cosine similarity of timm ViT features, pairwise (pred[i] vs ref[i]), averaged."""
    return _cosine(dino_embed(pred, model), dino_embed(ref, model), reduction)


@torch.no_grad()
def exemplar_embed(images, base) -> torch.Tensor:
    """Embeddings (N, D) of `images` by an `ExemplarInpainter`'s own exemplar encoder (CLIP image encoder + mapper,
    the vector the UNet is conditioned on)."""
    side = int(base.image_encoder.config.image_size)
    p = _param(base.image_encoder)
    x = _batch(images, (side, side), base.feature_extractor.image_mean, base.feature_extractor.image_std, p.device,
               p.dtype)
    return base.encode_exemplar(x)[0][:, 0]


def exemplar_i(pred_crops, ref_crops, base, reduction: str = "mean"):
    """Like CLIP-I, with the inpainting base's own exemplar encoder: cosine similarity, pairwise, averaged. The
    appearance metric at hand where no CLIP or DINO weights are (the demo base): its encoder tells products apart
    (bench/subject_fidelity.py reports how well), but it is also what the base is conditioned on, so read it
    beside CLIP-I/DINO when those are available."""
    return _cosine(exemplar_embed(pred_crops, base), exemplar_embed(ref_crops, base), reduction)


def box_crop(image, box: tuple[int, int, int, int], pad: float = 0.15) -> torch.Tensor:
    """A square crop (3, S, S) of `image` centred on `box` (x0, y0, x1, y1), its longer side plus `pad` on each
    side; what lies outside the image is black. For embedding metrics on a placed product."""
    x = to_tensor01(image)
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise InvalidArgument(f"box must have x1 > x0 and y1 > y0, got {box}")
    side = max(1, round(max(x1 - x0, y1 - y0) * (1 + 2 * pad)))
    left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
    _, h, w = x.shape
    out = torch.zeros(3, side, side, dtype=x.dtype)
    sy0, sx0, sy1, sx1 = max(top, 0), max(left, 0), min(top + side, h), min(left + side, w)
    if sy1 > sy0 and sx1 > sx0:
        out[:, sy0 - top:sy1 - top, sx0 - left:sx1 - left] = x[:, sy0:sy1, sx0:sx1]
    return out


# ---------------------------------------------------------------------------------------------- FID


def fid(real, fake, feature: torch.nn.Module | int | None = None, size: int | None = None) -> float:
    """Frechet distance between the feature statistics of two image sets (torchmetrics' FID).

    feature: an nn.Module mapping float images (N, 3, H, W) in [0, 1] to (N, D) features (give it a
    `num_features` attribute, or it is probed once), or an int (64, 192, 768, 2048) for torchmetrics'
    Inception, which needs `torch-fidelity` and its downloaded weights. Images are resized to `size`
    (default: the first real image's size). Both sets need at least 2 images; meaningful FID needs many
    more images than feature dimensions.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise InvalidArgument("FID needs at least 2 images in each set")
    first = to_tensor01(real[0])
    hw = (size, size) if size else tuple(first.shape[1:])
    if feature is None:
        feature = 2048
    try:
        kwargs = dict(normalize=True, input_img_size=(3, *hw))
        metric = FrechetInceptionDistance(feature=feature, **kwargs)
    except (ModuleNotFoundError, OSError, RuntimeError) as exc:
        raise WeightsNotFound(
            f"FID with the Inception feature extractor is unavailable ({exc}); pass feature=<nn.Module> "
            "(any image encoder returning (N, D) features) to compute FID offline"
        ) from None
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), 64):
            chunk = torch.stack([
                F.interpolate(to_tensor01(im)[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
                for im in images[i: i + 64]
            ]).clamp(0, 1)
            with torch.no_grad():
                metric.update(chunk.to(_param(metric.inception).device), real=is_real)
    return max(float(metric.compute()), 0.0)


# ------------------------------------------------------------------------------------- real models


def load_clip(id_or_dir: str = CLIP_MODEL, local_files_only: bool = False):
    """A `CLIPVisionModelWithProjection` from a local directory or a hub id (safetensors only), in eval mode.
    Raises `WeightsNotFound` when the weights are neither local nor reachable."""
    from transformers import CLIPVisionModelWithProjection

    name = str(id_or_dir)
    local = Path(name).expanduser()
    if local.is_dir():
        source, local_files_only = str(local), True
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise WeightsNotFound(f"CLIP encoder directory not found: {local}")
    else:
        source = name  # a hub id
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(
            source, use_safetensors=True, local_files_only=local_files_only
        )
    except Exception as exc:  # missing files, offline hub, connection errors
        where = "the local cache" if local_files_only else "the hub (no network access?)"
        raise WeightsNotFound(
            f"could not load the CLIP vision encoder {name!r} from a local directory or {where}: "
            f"{exc.__class__.__name__}. Download it where the hub is reachable and pass its directory."
        ) from None
    return model.eval()


def load_dino(name: str = DINO_MODEL, weights: str | os.PathLike | None = None):
    """A timm ViT (no classifier head) with DINO weights: from `weights` (a local .safetensors file) or
    from the hub. Raises `WeightsNotFound` when neither works."""
    import timm

    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file() or path.suffix != ".safetensors":
            raise WeightsNotFound(f"DINO weights must be an existing .safetensors file, got {path}")
        from safetensors.torch import load_file

        try:
            model = timm.create_model(name, pretrained=False, num_classes=0)
        except RuntimeError as exc:
            raise InvalidArgument(f"unknown timm model {name!r}: {exc}") from None
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("head.")}
        model.load_state_dict(state)
        return model.eval()
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise InvalidArgument(f"unknown timm model {name!r}") from None
        raise WeightsNotFound(f"could not load DINO weights for {name!r}: {exc}") from None
    except Exception as exc:  # hub errors: connection, offline mode, missing files
        raise WeightsNotFound(
            f"could not download DINO weights for {name!r} (no network access?): {exc.__class__.__name__}. "
            "Pass weights=<file.safetensors> to load them from disk."
        ) from None
    return model.eval()


# ------------------------------------------------------------------------------------------- table


def _cell(value, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (float, np.floating)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        v = float(value)
        return "inf" if v == math.inf else "-inf" if v == -math.inf else "nan" if v != v else format(v, floatfmt)
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> str:
    """Aligned plain-text table: one line per row dict; columns in order of first appearance (or given).
    Numbers are right-aligned, text left-aligned; missing values print as '-'."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    if not columns:
        return ""
    cells = [[_cell(row.get(c), floatfmt) for c in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), (int, float, np.number, type(None))) and not isinstance(row.get(c), bool)
            for row in rows)
        for c in columns
    ]
    widths = [max([len(str(c))] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line([str(c) for c in columns]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)
