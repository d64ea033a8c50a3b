"""The papers' own evaluation protocols: `subjectpaint eval PROTOCOL DATA_DIR` (metrics in `evaluate.py`).

Each protocol reads a folder the user brings (layouts below; files are matched by stem, .png / .jpg / .webp),
places every sample with the studio's base, scores it with the paper's metric definitions and returns one row
per metric set (a table) and a summary (the JSON line).

- ``cocoee`` (Paint by Example, sec. 4.1, COCOEE): ``source/``, ``mask/`` (the box), ``reference/``; optional
  ``real/`` (FID's real set; the paper takes the COCO test set, default here: the sources). FID on CLIP
  features (ViT-B/32 in the paper's ablations), CLIP score = 100 x cosine of the CLIP image embeddings of the
  edited region (the mask's box) and the reference, both at 224 x 224. QS (GIQA's quality score) needs a model
  fitted to COCO that has no offline release: not computed (None).
- ``pixels`` (PIXELS, Table 1a): ``source/``, ``map/`` (soft edit maps, white = edit), ``exemplar/``. CLIP-I =
  100 x cosine(edited region, exemplar); FID of the edits against the sources (Inception features, as Heusel
  et al.; CLIP features when no Inception weights are installed, said in the summary).
- ``lora`` (LoRA image-guided inpainting, sec. 5.1: N objects x M backgrounds): ``objects/NAME/*`` (the
  object's photos; the first is the exemplar), ``backgrounds/`` with ``backgrounds/masks/`` (same stems).
  Every object is placed into every background. DINO (ViT-S/16) and CLIP: cosine between the generated
  region and each of the object's photos, averaged (pairwise), x 100 as the paper's table; FID against ``real/``
  (default: the backgrounds). ``subjects={NAME: Subject}`` places an object with its trained adapter.
- ``pie`` (ViMAEdit's PIE-Bench metrics, App. B): ``source/``, ``mask/``, ``reference/`` (our edit is an exemplar,
  so it stands where PIE-Bench has the target prompt: CLIP similarity is image-image, 100 x cosine, whole image
  and edited region (outside the mask blacked out)); optional ``silhouette/`` (the true edited region) for the
  grounding IoU of the dual-branch session. Structure distance (x 10^3): MSE between the cosine self-similarity
  matrices of the last block's keys of a DINO ViT (Tumanyan et al., as PIE-Bench's code computes it with DINO
  ViT-B/8 at 224 px; give those weights for comparable numbers) of the source and the edit; background PSNR,
  LPIPS (x 10^3), MSE (x 10^4), SSIM (x 10^2) outside the mask.

Encoders are given as local weights, nothing is fetched: CLIP a transformers `CLIPVisionModelWithProjection`
directory, DINO a timm ViT ``.safetensors``. Without CLIP weights the CLIP columns use the base's own exemplar
encoder (labelled `exemplar-encoder`); without DINO weights the DINO / structure columns are None. LPIPS needs
torchvision's SqueezeNet weights (PIE-Bench's LPIPS net) in the torch hub cache (`torch.hub.get_dir()/checkpoints`),
Inception FID torch-fidelity and its weights there; without them LPIPS is None and FID uses CLIP features (said in
the summary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm.auto import tqdm

from . import evaluate as ev
from .errors import InvalidArgument

PROTOCOLS = ("cocoee", "pixels", "lora", "pie")
SESSIONS = {"cocoee": "plain", "pixels": "progressive", "lora": "plain", "pie": "dual"}
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Encoders:
    """What the metrics embed with: `clip` a CLIPVisionModelWithProjection (None: the base's exemplar encoder),
    `dino` a timm ViT (None: DINO metrics skipped), `lpips` a torchmetrics LPIPS module (None: skipped)."""

    clip: object = None
    dino: object = None
    lpips: object = None
    notes: list = field(default_factory=list)

    @classmethod
    def load(cls, clip_dir=None, dino_weights=None, dino_arch: str = ev.DINO_MODEL, lpips: bool = True):
        enc = cls()
        if clip_dir is not None:
            enc.clip = ev.load_clip(str(clip_dir), local_files_only=True)
        else:
            enc.notes.append("no CLIP weights given: CLIP columns use the base's exemplar encoder")
        if dino_weights is not None:
            enc.dino = ev.load_dino(dino_arch, weights=dino_weights)
        else:
            enc.notes.append("no DINO weights given: DINO and structure distance skipped")
        if lpips and _cached(SQUEEZENET):  # never downloaded here: torchvision would fetch it on construction
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            enc.lpips = LearnedPerceptualImagePatchSimilarity(net_type="squeeze").eval()  # PIE-Bench's
        elif lpips:
            enc.notes.append(f"LPIPS skipped: put torchvision's {SQUEEZENET} into {_hub_checkpoints()}")
        return enc


SQUEEZENET = "squeezenet1_1-b8a52dc0.pth"  # torchvision's SqueezeNet: PIE-Bench's LPIPS backbone (heads: torchmetrics)
INCEPTION = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cached(filename: str) -> bool:
    return (_hub_checkpoints() / filename).is_file()


# ------------------------------------------------------------------------------------------ metrics


def cosine100(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """100 x the cosine similarity of matching rows (the papers' CLIP score / CLIP-I scale)."""
    return 100.0 * F.cosine_similarity(a.double(), b.double(), dim=-1).float()


def embed(images, encoders: Encoders, base, kind: str = "clip") -> torch.Tensor:
    if kind == "dino":
        return ev.dino_embed(images, encoders.dino)
    if encoders.clip is not None:
        return ev.clip_embed(images, encoders.clip)
    return ev.exemplar_embed(images, base)


def edited_region(image, mask) -> torch.Tensor:
    """The edited region for embedding metrics: the mask's bounding box crop, (3, h, w) in [0, 1]."""
    m = ev.mask_to_bool(mask)
    ys, xs = torch.nonzero(m, as_tuple=True)
    return ev.to_tensor01(image)[:, int(ys.min()): int(ys.max()) + 1, int(xs.min()): int(xs.max()) + 1]


def blacked_out(image, mask) -> torch.Tensor:
    """The image with every pixel outside the mask black (PIE-Bench's edited-region CLIP input)."""
    return ev.to_tensor01(image) * ev.mask_to_bool(mask).float()


def background_metrics(pred, source, mask, lpips=None) -> dict:
    """ViMAEdit App. B: PSNR, MSE (x 10^4), SSIM (x 10^2), LPIPS (x 10^3) between the background (outside the
    mask) of the edit and of the source. As PIE-Bench's code (PnP Inversion, evaluation/matrics_calculator.py)
    computes them: the edited area is blacked out in both, then the whole-image metric (the MSE is a mean over
    every pixel, the blacked ones included)."""
    a, b = ev._pair(pred, source)
    keep = (~ev.mask_to_bool(mask, a.shape[1:])).to(a.dtype)
    a, b = a * keep, b * keep
    mse = float(((a - b) ** 2).mean())
    out = {"bg_psnr": 10 * math.log10(1.0 / mse) if mse > 0 else math.inf, "bg_mse_e4": mse * 1e4}
    out["bg_ssim_e2"] = 100 * float(structural_similarity_index_measure(a[None].float(), b[None].float(),
                                                                         data_range=1.0))
    out["bg_lpips_e3"] = None
    if lpips is not None:
        with torch.no_grad():
            out["bg_lpips_e3"] = 1000 * float(lpips(a[None].float() * 2 - 1, b[None].float() * 2 - 1))
    return out


def dino_keys_self_similarity(image, model) -> torch.Tensor:
    """(N, N) cosine self-similarity of the last block's attention keys (all heads concatenated, CLS included)."""
    keys = {}
    attn = model.blocks[-1].attn
    hook = attn.qkv.register_forward_hook(lambda m, i, o: keys.__setitem__("qkv", o))
    try:
        ev.dino_embed(image, model)
    finally:
        hook.remove()
    qkv = keys["qkv"][0]  # (N, 3 * dim)
    k = qkv.reshape(qkv.shape[0], 3, -1)[:, 1]  # (N, dim): heads concatenated
    k = F.normalize(k.double(), dim=-1)
    return k @ k.T


def structure_distance(pred, source, model) -> float:
    """PIE-Bench's structure distance: MSE between the DINO key self-similarity matrices of edit and source."""
    return float(F.mse_loss(dino_keys_self_similarity(pred, model), dino_keys_self_similarity(source, model)))


def fid_features(encoders: Encoders, base, prefer: str):
    """The feature module for FID: "clip" (the CLIP encoder, or the base's exemplar encoder) or "inception"
    (torchmetrics' 2048-d Inception, when its weights are installed; else CLIP, said in the note)."""
    if prefer == "inception" and _cached(INCEPTION):
        try:
            import torch_fidelity  # noqa: F401  (torchmetrics' Inception needs it)

            return 2048, "inception"
        except ImportError:
            pass
    module = _Features(encoders, base)
    return module, "clip" if encoders.clip is not None else "exemplar-encoder"


class _Features(torch.nn.Module):
    def __init__(self, encoders, base):
        super().__init__()
        self.encoders, self.base = encoders, base
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives FID a device
        self.num_features = int(embed([torch.zeros(3, 16, 16)], encoders, base).shape[-1])

    def forward(self, x):
        return embed(list(x.float()), self.encoders, self.base).double()


# ------------------------------------------------------------------------------------------ datasets


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InvalidArgument(f"missing folder {folder}")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in EXTENSIONS}
    if not files:
        raise InvalidArgument(f"no images in {folder}")
    return files


def _open(path: Path, mode: str = "RGB") -> PIL.Image.Image:
    with PIL.Image.open(path) as im:
        return im.convert(mode)


def samples(protocol: str, root) -> list[dict]:
    """The dataset's samples: dicts of room, mask (L), exemplar, references [...], name, silhouette (or None)."""
    root = Path(root)
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "lora":
        objects = sorted(p for p in (root / "objects").iterdir() if p.is_dir()) if (root / "objects").is_dir() else []
        if not objects:
            raise InvalidArgument(f"no object folders in {root / 'objects'}")
        rooms, masks = _images(root / "backgrounds"), _images(root / "backgrounds" / "masks")
        out = []
        for obj in objects:
            photos = [_open(p) for p in _images(obj).values()]
            for stem, path in rooms.items():
                if stem not in masks:
                    raise InvalidArgument(f"background {path.name} has no mask in backgrounds/masks/")
                out.append(dict(name=f"{obj.name}/{stem}", object=obj.name, room=_open(path),
                                mask=_open(masks[stem], "L"), exemplar=photos[0], references=photos, silhouette=None))
        return out
    mask_dir, ref_dir = ("map", "exemplar") if protocol == "pixels" else ("mask", "reference")
    sources, masks, refs = _images(root / "source"), _images(root / mask_dir), _images(root / ref_dir)
    sil = _images(root / "silhouette") if (root / "silhouette").is_dir() else {}
    out = []
    for stem, path in sources.items():
        if stem not in masks or stem not in refs:
            raise InvalidArgument(f"source {path.name} needs {mask_dir}/{stem}.* and {ref_dir}/{stem}.*")
        ref = _open(refs[stem])
        out.append(dict(name=stem, room=_open(path), mask=_open(masks[stem], "L"), exemplar=ref, references=[ref],
                        silhouette=_open(sil[stem], "L") if stem in sil else None))
    return out


def real_images(protocol: str, root, items: list[dict]) -> list:
    real = Path(root) / "real"
    if real.is_dir():
        return [_open(p) for p in _images(real).values()]
    if protocol == "lora":
        return [_open(p) for p in _images(Path(root) / "backgrounds").values()]
    return [s["room"] for s in items]


# ------------------------------------------------------------------------------------------ running


def place(studio, session: str, sample: dict, subject=None, seed: int = 0, steps: int | None = None) -> dict:
    """One placement with the protocol's session: {"image", "grounded" (dual only, or None)}."""
    what = subject if subject is not None else sample["exemplar"]
    if session == "plain":
        out = studio.inpaint(sample["room"], sample["mask"], what, seed=seed, steps=steps, progress=False)
        return {"image": out.image, "grounded": None}
    if session == "progressive":
        out = studio.progressive(seed=seed, steps=steps, progress=False).place(what, sample["room"], sample["mask"])
        return {"image": out.image, "grounded": None}
    if session == "dual":
        out = studio.dual_branch(seed=seed, steps=steps).place(what, sample["room"], sample["mask"])
        return {"image": out.image, "grounded": out.grounded_mask}
    raise InvalidArgument(f"session must be one of plain, progressive, dual; got {session!r}")


def run_protocol(protocol: str, root, studio, encoders: Encoders, *, session: str | None = None, subjects=None,
                 seed: int = 0, steps: int | None = None, limit: int | None = None, progress: bool = True):
    """Place and score a dataset. Returns (rows: one dict per sample, summary: dict of the protocol's figures)."""
    items = samples(protocol, root)[:limit]
    session = session or SESSIONS[protocol]
    subjects = subjects or {}
    base = studio.base
    rows, generated = [], []
    for i, sample in enumerate(tqdm(items, desc=f"eval {protocol}", disable=not progress)):
        out = place(studio, session, sample, subjects.get(sample.get("object", sample["name"])), seed + i, steps)
        image, mask = out["image"], sample["mask"]
        generated.append(image)
        row = {"sample": sample["name"]}
        region = edited_region(image, mask)
        refs = sample["references"]
        sims = cosine100(embed([region] * len(refs), encoders, base), embed(refs, encoders, base))
        row["clip"] = float(sims.mean())
        if protocol == "lora" and encoders.dino is not None:
            row["dino"] = float(cosine100(ev.dino_embed([region] * len(refs), encoders.dino),
                                          ev.dino_embed(refs, encoders.dino)).mean())
        if protocol == "pie":
            row["clip_whole"] = float(cosine100(embed([image], encoders, base), embed(refs[:1], encoders, base))[0])
            row["clip_edited"] = float(cosine100(embed([blacked_out(image, mask)], encoders, base),
                                                 embed(refs[:1], encoders, base))[0])
            del row["clip"]
            row.update(background_metrics(image, sample["room"], mask, encoders.lpips))
            row["structure_e3"] = None if encoders.dino is None else \
                1000 * structure_distance(image, sample["room"], encoders.dino)
            if out["grounded"] is not None and sample["silhouette"] is not None:
                g, t = ev.mask_to_bool(out["grounded"]), ev.mask_to_bool(sample["silhouette"])
                row["iou"] = float((g & t).sum()) / max(1, int((g | t).sum()))
        rows.append(row)
    summary = {"protocol": protocol, "session": session, "samples": len(rows)}
    for key in rows[0]:
        if key == "sample":
            continue
        values = [r[key] for r in rows if r.get(key) is not None]
        summary[key] = float(np.mean(values)) if values else None
    if protocol in ("cocoee", "pixels", "lora"):
        feature, kind = fid_features(encoders, base, "clip" if protocol == "cocoee" else "inception")
        real = real_images(protocol, root, items)
        summary["fid"] = ev.fid(real, generated, feature=feature, size=224 if kind != "inception" else 299) \
            if len(real) >= 2 and len(generated) >= 2 else None
        summary["fid_features"] = kind
    if protocol == "cocoee":
        summary["qs"] = None  # GIQA's quality score: no offline model (see the module's docstring)
    if protocol == "lora":
        summary["clip_i"] = summary.pop("clip")
    elif protocol in ("cocoee",):
        summary["clip_score"] = summary.pop("clip")
    elif protocol == "pixels":
        summary["clip_i"] = summary.pop("clip")
    summary["clip_encoder"] = "clip" if encoders.clip is not None else "exemplar-encoder"
    summary["notes"] = list(encoders.notes)
    return rows, summary
